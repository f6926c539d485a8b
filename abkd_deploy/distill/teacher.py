"""Train a teacher GNN into a run directory; resolve a :class:`TeacherSpec` to one."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from abkd_deploy.data import load_dataset
from abkd_deploy.distill.graphs import build_for_data
from abkd_deploy.distill.specs import TeacherSpec
from abkd_deploy.distill.trainer import FitResult, TrainConfig, Trainer
from abkd_deploy.errors import CheckpointError
from abkd_deploy.files import write_json
from abkd_deploy.models import GNN, save_model
from abkd_deploy.models.typed import parameter_counts
from abkd_deploy.plots import plot_curves
from abkd_deploy.rundir import checkpoint_hashes
from abkd_deploy.seeding import seed_everything
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record


def dataset_ref(name: str, root: str | Path | None, split: str | None) -> dict[str, Any]:
    """How a run records its dataset (absolute root so later stages can reload it)."""
    return {
        "name": name,
        "root": str(Path(root).expanduser().resolve()) if root is not None else None,
        "split": None if split is None else str(split),
    }


def train_teacher(
    dataset: str = "csbm",
    root: str | Path | None = None,
    split: str | None = None,
    arch: str = "gcnii",
    layers: int = 16,
    hidden: int = 64,
    dropout: float | None = None,
    train: TrainConfig | None = None,
    out: str | Path = "runs/teacher",
    force: bool = False,
) -> dict[str, Any]:
    """Trains a teacher and writes the run dir ``out`` (see docs/FORMATS.md).

    ``out`` is checked before training (see :mod:`abkd_deploy.staging`: an existing one is
    replaced only with ``force`` and only if this tool wrote it), staged and published
    whole, with ``run.json`` last.

    Returns:
        The metrics written to ``out/metrics.json``: ``val_score``/``test_score`` (the
        dataset's ``metric``, also under the legacy keys ``val_acc``/``test_acc``:
        :func:`score_keys`), ``metric``, ``params``,
        ``params_without_embeddings`` (typed models' embedding tables left out),
        ``best_epoch``, ``seconds_per_epoch``, ``seconds``.
    """
    train = train or TrainConfig()
    start = time.perf_counter()
    check_out_dir(out, force)
    data = load_dataset(dataset, root, split)
    model = build_teacher(data, dataset, arch, layers, hidden, dropout, train.seed)
    result = Trainer(model, data, train, desc=f"teacher {arch}").fit()
    ref = dataset_ref(dataset, root, split)
    with staged_directory(out, force) as stage:
        metrics = write_teacher_run(stage, model, result, data, ref, train, start)
        write_run_record(stage, "teacher")
    return metrics


def build_teacher(
    data: Any,
    dataset: str,
    arch: str,
    layers: int,
    hidden: int,
    dropout: float | None,
    seed: int,
) -> GNN:
    """A fresh teacher for ``data``, initialised under ``seed`` (``dropout`` ``None``: 0.6
    for gcnii, 0.5 otherwise)."""
    if dropout is None:
        dropout = 0.6 if arch == "gcnii" else 0.5
    seed_everything(seed)  # model initialisation is part of the seeded run
    return build_for_data(
        arch, data, dataset, hidden=hidden, num_layers=layers, dropout=dropout, role="teacher"
    )


def write_teacher_run(
    stage: Path,
    model: GNN,
    result: FitResult,
    data: Any,
    ref: dict[str, Any],
    train: TrainConfig,
    start: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes a teacher run's files (not ``run.json``) into ``stage``; returns its metrics.

    Args:
        stage: The staging directory. model: the trained teacher. result: its fit.
        data: The dataset (its ``metric``). ref: :func:`dataset_ref`. train: the settings.
        start: ``time.perf_counter()`` at the run's start. extra: more metrics keys.
    """
    save_model(model.cpu(), stage, "teacher", extra={"dataset": ref})
    hashes = checkpoint_hashes(stage, ("teacher.safetensors",))
    metrics = {
        "dataset": ref,
        "metric": data.metric,
        "arch": model.arch,
        **parameter_counts(model),  # params, params_without_embeddings
        **score_keys(result.scores),  # val/test/train _score and legacy _acc
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds_per_epoch": result.seconds_per_epoch,
        "seconds": time.perf_counter() - start,
        "seed": train.seed,
        "checkpoints": hashes,
        **(extra or {}),
    }
    write_json(
        stage / "config.json",
        {
            "command": "teacher",
            "dataset": ref,
            "model": model.config,
            "train": vars(train),
            "checkpoints": hashes,
        },
    )
    write_json(stage / "metrics.json", metrics)
    plot_curves(result.history, stage / "curves.png", f"teacher {model.arch} on {ref['name']}")
    return metrics


def score_keys(scores: Mapping[str, float], suffix: str = "") -> dict[str, float]:
    """Split scores under their ``metrics.json`` keys: ``{"val": 0.8}`` ->
    ``{"val_score": 0.8, "val_acc": 0.8}`` (``suffix``: ``"_std"`` -> ``val_score_std`` ...).

    The values are the dataset's ``metric`` (accuracy, or ROC-AUC on some datasets), hence
    ``*_score``; ``*_acc``, the name runs used before, keeps the same value for the readers
    of older layouts (export provenance, scripts).
    """
    out = {f"{split}_score{suffix}": value for split, value in scores.items()}
    out.update({f"{split}_acc{suffix}": value for split, value in scores.items()})
    return out


def resolve_teacher(
    spec: TeacherSpec, dataset: dict[str, Any], train: TrainConfig, workdir: Path
) -> Path:
    """The run dir of the teacher ``spec`` names: ``spec.path``, or one trained now.

    The one train-or-load path of ``distill`` and ``compare``. Without ``spec.path`` a
    teacher is trained full-batch (``spec.epochs``, default ``train.epochs``) into
    ``workdir/teacher``.

    Args:
        spec: The teacher to load or train.
        dataset: The run's dataset record (:func:`dataset_ref`).
        train: The run's training settings.
        workdir: Where a trained teacher is written (inside the caller's staging dir).

    Raises:
        CheckpointError: ``spec.path`` is not a directory.
    """
    if spec.path is not None:
        src = Path(spec.path)
        if not src.is_dir():
            raise CheckpointError(f"--teacher {spec.path!r} is not a directory")
        return src
    train_teacher(
        dataset["name"],
        dataset["root"],
        dataset["split"],
        spec.arch,
        spec.layers,
        spec.hidden,
        spec.dropout,
        replace(train, epochs=spec.epochs or train.epochs, batch_size=0),
        workdir / "teacher",
    )
    return workdir / "teacher"
