"""``abkd-deploy teacher``: train a teacher GNN and write a run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from abkd_deploy.data import load_dataset
from abkd_deploy.distill.trainer import TrainConfig, Trainer
from abkd_deploy.errors import ConfigError
from abkd_deploy.models import build_model, count_parameters, save_model
from abkd_deploy.plots import plot_curves
from abkd_deploy.rundir import checkpoint_hashes
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record
from abkd_deploy.utils import seed_everything, write_json


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
        The metrics written to ``out/metrics.json``: ``val_acc``/``test_acc`` (the
        dataset's metric, named ``*_acc`` for every metric), ``metric``, ``params``,
        ``best_epoch``, ``seconds_per_epoch``, ``seconds``.
    """
    train = train or TrainConfig()
    start = time.perf_counter()
    check_out_dir(out, force)
    data = load_dataset(dataset, root, split)
    if dropout is None:
        dropout = 0.6 if arch == "gcnii" else 0.5
    seed_everything(train.seed)  # model initialisation is part of the seeded run
    model = build_model(
        arch,
        in_channels=data.num_features,
        hidden=hidden,
        out_channels=data.num_classes,
        num_layers=layers,
        dropout=dropout,
    )
    result = Trainer(model, data, train, desc=f"teacher {arch}").fit()
    ref = dataset_ref(dataset, root, split)
    with staged_directory(out, force) as stage:
        save_model(model.cpu(), stage, "teacher", extra={"dataset": ref})
        hashes = checkpoint_hashes(stage, ("teacher.safetensors",))
        metrics = {
            "dataset": ref,
            "metric": data.metric,
            "arch": arch,
            "params": count_parameters(model),
            "val_acc": result.scores["val"],
            "test_acc": result.scores["test"],
            "train_acc": result.scores["train"],
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "seconds_per_epoch": result.seconds_per_epoch,
            "seconds": time.perf_counter() - start,
            "seed": train.seed,
            "checkpoints": hashes,
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
        plot_curves(result.history, stage / "curves.png", f"teacher {arch} on {dataset}")
        write_run_record(stage, "teacher")
    return metrics


def parse_int_list(value: str, what: str) -> tuple[int, ...]:
    """``"10,10"`` -> ``(10, 10)`` with a clear error."""
    try:
        out = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"bad {what} {value!r}; expected comma-separated integers") from None
    if not out:
        raise ConfigError(f"bad {what} {value!r}; expected comma-separated integers")
    return out


def train_config_from_cli(kw: dict[str, Any]) -> TrainConfig:
    """Pops the shared training options of the CLI into a :class:`TrainConfig`."""
    return TrainConfig(
        epochs=kw.pop("epochs"),
        patience=kw.pop("patience"),
        lr=kw.pop("lr"),
        weight_decay=kw.pop("weight_decay"),
        batch_size=kw.pop("batch_size"),
        fanouts=parse_int_list(kw.pop("fanouts"), "--fanouts"),
        device=kw.pop("device"),
        seed=kw.pop("seed"),
    )


def train_teacher_cli(**kw: Any) -> None:
    """Body of ``abkd-deploy teacher``."""
    train = train_config_from_cli(kw)
    metrics = train_teacher(train=train, **kw)
    click.echo(
        f"teacher {metrics['arch']}: {metrics['params']:,} params, "
        f"val {metrics['metric']} {metrics['val_acc']:.4f}, "
        f"test {metrics['metric']} {metrics['test_acc']:.4f} "
        f"(best epoch {metrics['best_epoch']}, {metrics['seconds']:.1f} s) -> {kw['out']}"
    )
