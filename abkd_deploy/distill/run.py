"""``abkd-deploy distill``: distill a teacher into a student over one or more seeds."""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch_geometric.data import Data

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.distill.evaluate import full_graph_outputs, split_scores
from abkd_deploy.distill.losses import LayerDims
from abkd_deploy.distill.objective import METHODS, Objective
from abkd_deploy.distill.teacher import dataset_ref, train_teacher
from abkd_deploy.distill.trainer import FitResult, TrainConfig, Trainer
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.models import GNN, MODELS, build_model, count_parameters, load_model, save_model
from abkd_deploy.plots import plot_attention, plot_curves
from abkd_deploy.rundir import checkpoint_hashes
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record
from abkd_deploy.utils import seed_everything, sha256_file, write_json

#: Inside the staging dir: where a teacher trained by this run is written first.
WORK_DIR = ".work"


@dataclass
class StudentSpec:
    """Student architecture."""

    arch: str = "gcn"
    layers: int = 2
    hidden: int = 8
    dropout: float = 0.5


@dataclass
class TeacherSpec:
    """Teacher to load (``path``) or to train first (the other fields)."""

    path: str | None = None
    arch: str = "gcnii"
    layers: int = 16
    hidden: int = 64
    dropout: float | None = None
    epochs: int | None = None


@dataclass
class KDSpec:
    """Distillation method and its hyper-parameters (docs/ARCHITECTURE.md section 6)."""

    method: str = "abkd"
    alpha: float = 0.7
    tau: float = 4.0
    beta: float = 1.0
    dissimilarity: str = "feature"
    kd_nodes: int | None = None
    #: None: the objective's default (20 epochs for abkd, else 0).
    warmup_epochs: int | None = None
    normalize: bool | None = None
    teacher_mode: str = "frozen"
    options: dict[str, Any] = field(default_factory=dict)

    def objective(self, dims: LayerDims) -> Objective:
        opts = dict(self.options)
        if self.method == "abkd":
            opts.setdefault("dissimilarity", self.dissimilarity)
            if self.kd_nodes is not None:
                opts.setdefault("kd_nodes", self.kd_nodes)
        return Objective.from_method(
            self.method,
            dims,
            alpha=self.alpha,
            tau=self.tau,
            beta=self.beta,
            normalize=self.normalize,
            warmup_epochs=self.warmup_epochs,
            **opts,
        )


def prepare_teacher(
    spec: TeacherSpec, data: Data, dataset: dict[str, Any], train: TrainConfig, workdir: Path
) -> tuple[GNN, Path]:
    """Loads the teacher of ``spec.path`` (checked against ``data``) or trains one."""
    if spec.path is None:
        teacher_train = replace(train, epochs=spec.epochs or train.epochs, batch_size=0)
        train_teacher(
            dataset["name"],
            dataset["root"],
            dataset["split"],
            spec.arch,
            spec.layers,
            spec.hidden,
            spec.dropout,
            teacher_train,
            workdir / "teacher",
        )
        src = workdir / "teacher"
    else:
        src = Path(spec.path)
        if not src.is_dir():
            raise CheckpointError(f"--teacher {spec.path!r} is not a directory")
    teacher, _ = load_model(src, "teacher")
    if teacher.in_channels != data.num_features or teacher.out_channels != data.num_classes:
        raise CheckpointError(
            f"teacher in {str(src)!r} expects {teacher.in_channels} features and "
            f"{teacher.out_channels} classes, but dataset {dataset['name']!r} has "
            f"{data.num_features} features and {data.num_classes} classes"
        )
    return teacher, src


def distill(
    dataset: str = "csbm",
    root: str | Path | None = None,
    split: str | None = None,
    teacher: TeacherSpec | None = None,
    student: StudentSpec | None = None,
    kd: KDSpec | None = None,
    train: TrainConfig | None = None,
    seeds: int = 1,
    out: str | Path = "runs/distill",
    force: bool = False,
    teacher_record: str | None = None,
) -> dict[str, Any]:
    """Distills a teacher into a student and writes the run directory ``out``.

    Runs ``seeds`` seeds (``train.seed``, ``train.seed + 1``, ...); the saved student is
    the one with the best validation score. See docs/FORMATS.md for the files.

    ``out`` is checked before any training (:mod:`abkd_deploy.staging`: it may not overlap
    the teacher dir; an existing one is replaced only with ``force`` and only
    if this tool wrote it), staged (a teacher trained here is trained inside the staging
    dir) and published whole, ``run.json`` last. ``metrics.json`` and ``config.json``
    record the checkpoints' SHA-256. ``teacher_record``: the teacher path to record
    instead of ``teacher.path`` (compare passes the published location).

    Returns:
        The metrics written to ``out/metrics.json``.
    """
    teacher, student, kd = teacher or TeacherSpec(), student or StudentSpec(), kd or KDSpec()
    train = train or TrainConfig()
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}; expected >= 1")
    METHODS.get(kd.method)  # fail on bad names before any training
    MODELS.get(student.arch)
    sources = [teacher.path]  # a dataset root is protected by the ownership check
    check_out_dir(out, force, sources)
    start = time.perf_counter()
    data = load_dataset(dataset, root, split)
    ref = dataset_ref(dataset, root, split)
    with staged_directory(out, force, sources) as stage:
        work = stage / WORK_DIR  # a teacher trained here; removed before publishing
        teacher_model, teacher_src = prepare_teacher(teacher, data, ref, train, work)
        t_scores = split_scores(
            data,
            full_graph_outputs(
                teacher_model,
                data.x,
                FullGraph.from_edge_index(data.edge_index, data.num_nodes, teacher_model.norm),
            )[0],
        )
        runs = [
            _one_seed(data, teacher_model, student, kd, replace(train, seed=train.seed + s))
            for s in range(seeds)
        ]
        best = max(runs, key=lambda r: r["result"].scores["val"])
        metrics = _metrics(ref, data, kd, teacher_model, t_scores, best["model"], runs, start)
        recorded = teacher if teacher_record is None else replace(teacher, path=teacher_record)
        _write_run(
            stage,
            teacher_src,
            best,
            metrics,
            ref,
            student,
            recorded,
            kd,
            train,
            seeds,
            teacher_model if kd.teacher_mode == "joint" else None,
        )
        shutil.rmtree(work, ignore_errors=True)
        write_run_record(stage, "distill")
    return metrics


def _one_seed(
    data: Data, teacher: GNN, spec: StudentSpec, kd: KDSpec, train: TrainConfig
) -> dict[str, Any]:
    seed_everything(train.seed)
    model = build_model(
        spec.arch,
        in_channels=data.num_features,
        hidden=spec.hidden,
        out_channels=data.num_classes,
        num_layers=spec.layers,
        dropout=spec.dropout,
    )
    t = copy.deepcopy(teacher) if kd.teacher_mode == "joint" else teacher
    if kd.method == "ce":
        objective, t_arg = None, None
    else:
        objective = kd.objective(LayerDims(teacher.layer_dims, model.layer_dims, data.num_classes))
        t_arg = t
    result = Trainer(
        model,
        data,
        train,
        objective=objective,
        teacher=t_arg,
        teacher_mode=kd.teacher_mode,
        desc=f"{kd.method} seed {train.seed}",
    ).fit()
    attention = None
    if objective is not None and objective.attention() is not None:
        attention = objective.attention().cpu().tolist()
    return {
        "seed": train.seed,
        "model": model.cpu(),
        "result": result,
        "attention": attention,
        "teacher": t.cpu(),
    }


def _metrics(ref, data, kd, teacher, t_scores, student, runs, start) -> dict[str, Any]:
    tests = [r["result"].scores["test"] for r in runs]
    t_params, s_params = count_parameters(teacher), count_parameters(student)
    per_seed = [
        {
            "seed": r["seed"],
            **{f"{k}_acc": v for k, v in r["result"].scores.items()},
            "best_epoch": r["result"].best_epoch,
            "seconds_per_epoch": r["result"].seconds_per_epoch,
        }
        for r in runs
    ]
    return {
        "dataset": ref,
        "metric": data.metric,
        "method": kd.method,
        "seeds": [r["seed"] for r in runs],
        "teacher": {
            "arch": teacher.arch,
            "params": t_params,
            "test_acc": t_scores["test"],
            "val_acc": t_scores["val"],
        },
        "student": {
            "arch": student.arch,
            "params": s_params,
            "test_acc": statistics.fmean(tests),
            "test_acc_std": statistics.pstdev(tests) if len(tests) > 1 else 0.0,
            "val_acc": statistics.fmean(r["result"].scores["val"] for r in runs),
            "saved_seed": max(runs, key=lambda r: r["result"].scores["val"])["seed"],
        },
        "compression_ratio": t_params / s_params,
        "seconds_per_epoch": statistics.fmean(r["result"].seconds_per_epoch for r in runs),
        "per_seed": per_seed,
        "seconds": time.perf_counter() - start,
    }


def _write_run(
    out: Path,
    teacher_src: Path,
    best: dict[str, Any],
    metrics: dict[str, Any],
    ref,
    student,
    teacher,
    kd,
    train,
    seeds,
    tuned_teacher: GNN | None,
) -> None:
    """Writes the run's files into ``out`` (the staging directory)."""
    if tuned_teacher is not None:  # joint mode: the fine-tuned teacher of the saved seed
        save_model(best["teacher"], out, "teacher", extra={"dataset": ref})
    else:
        for name in ("teacher.safetensors", "teacher.json"):
            shutil.copyfile(teacher_src / name, out / name)
    teacher_info = {
        "source": teacher.path if teacher.path else "trained by this run",
        "sha256": sha256_file(out / "teacher.safetensors"),
    }
    save_model(
        best["model"],
        out,
        "student",
        extra={"dataset": ref, "teacher": teacher_info, "method": kd.method},
    )
    if best["attention"] is not None:
        write_json(
            out / "attention.json",
            {
                "rows": "student layers",
                "columns": "teacher layers",
                "matrix": best["attention"],
                "seed": best["seed"],
            },
        )
        plot_attention(
            best["attention"],
            out / "attention.png",
            f"ABKD attention ({metrics['student']['arch']} <- {metrics['teacher']['arch']})",
        )
        metrics["attention"] = best["attention"]
    plot_curves(
        best["result"].history,
        out / "curves.png",
        f"{kd.method}: {metrics['student']['arch']} student, seed {best['seed']}",
    )
    write_json(out / "history.json", best["result"].history)
    hashes = checkpoint_hashes(out, ("student.safetensors", "teacher.safetensors"))
    metrics["checkpoints"] = hashes
    write_json(
        out / "config.json",
        {
            "command": "distill",
            "dataset": ref,
            "teacher": asdict(teacher),
            "student": asdict(student),
            "kd": asdict(kd),
            "train": asdict(train),
            "seeds": seeds,
            "checkpoints": hashes,
        },
    )
    write_json(out / "metrics.json", metrics)


__all__ = ["FitResult", "KDSpec", "StudentSpec", "TeacherSpec", "distill", "prepare_teacher"]
