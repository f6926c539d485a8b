"""``abkd-deploy distill``: distill a teacher into a student over one or more seeds."""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch_geometric.data import Data

from abkd_deploy.data import load_dataset
from abkd_deploy.distill.evaluate import dataset_outputs, split_scores
from abkd_deploy.distill.graphs import build_for_data, check_arch_for_data, check_model_for_data
from abkd_deploy.distill.losses import LayerDims
from abkd_deploy.distill.objective import METHODS
from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec
from abkd_deploy.distill.teacher import dataset_ref, resolve_teacher, score_keys
from abkd_deploy.distill.trainer import FitResult, TrainConfig, Trainer
from abkd_deploy.errors import ConfigError
from abkd_deploy.files import sha256_file, write_json
from abkd_deploy.models import GNN, MODELS, load_model, save_model
from abkd_deploy.models.typed import parameter_counts
from abkd_deploy.plots import plot_attention, plot_curves
from abkd_deploy.rundir import checkpoint_hashes
from abkd_deploy.seeding import seed_everything
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record

#: Inside the staging dir: where a teacher trained by this run is written first.
WORK_DIR = ".work"


@dataclass
class SeedResult:
    """One seed's training: the student, its fit, attention and the teacher it ends with."""

    seed: int
    model: GNN
    fit: FitResult
    #: ABKD's learned attention matrix (student layers x teacher layers), if any.
    attention: list[list[float]] | None
    #: The teacher after training: the frozen one, or the fine-tuned copy in joint mode.
    teacher: GNN

    @property
    def val_score(self) -> float:
        """Validation score at the best epoch (what picks the saved seed)."""
        return self.fit.scores["val"]


@dataclass
class RunRecord:
    """What a distill run writes into its directory (the inputs of :func:`write_run`)."""

    dataset: dict[str, Any]
    teacher: TeacherSpec  # as recorded (compare records the published teacher path)
    student: StudentSpec
    kd: KDSpec
    train: TrainConfig
    seeds: int
    teacher_src: Path
    best: SeedResult
    metrics: dict[str, Any]


def build_record(
    ref: dict[str, Any],
    teacher: TeacherSpec,
    teacher_record: str | None,
    student: StudentSpec,
    kd: KDSpec,
    train: TrainConfig,
    seeds: int,
    teacher_src: Path,
    runs: list[SeedResult],
    metrics: dict[str, Any],
) -> RunRecord:
    """The :class:`RunRecord` of a run: its best seed by validation, the teacher as recorded.

    ``teacher_record``: the teacher path to record instead of ``teacher.path`` (``None``:
    ``teacher`` as given).
    """
    recorded = teacher if teacher_record is None else replace(teacher, path=teacher_record)
    return RunRecord(
        dataset=ref,
        teacher=recorded,
        student=student,
        kd=kd,
        train=train,
        seeds=seeds,
        teacher_src=teacher_src,
        best=max(runs, key=lambda r: r.val_score),
        metrics=metrics,
    )


def prepare_teacher(
    spec: TeacherSpec, data: Data, dataset: dict[str, Any], train: TrainConfig, workdir: Path
) -> tuple[GNN, Path]:
    """Loads the teacher ``spec`` names (trained first if needed), checked against ``data``."""
    src = resolve_teacher(spec, dataset, train, workdir)
    teacher, _ = load_model(src, "teacher")
    check_model_for_data(teacher, data, dataset["name"], f"teacher in {str(src)!r}")
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
    check_arch_for_data(student.arch, data, dataset, "student")  # typed data, typed archs
    if teacher.path is None:
        check_arch_for_data(teacher.arch, data, dataset, "teacher")
    ref = dataset_ref(dataset, root, split)
    with staged_directory(out, force, sources) as stage:
        work = stage / WORK_DIR  # a teacher trained here; removed before publishing
        teacher_model, teacher_src = prepare_teacher(teacher, data, ref, train, work)
        t_scores = split_scores(data, dataset_outputs(teacher_model, data)[0])
        runs = [
            _one_seed(data, teacher_model, student, kd, replace(train, seed=train.seed + s))
            for s in range(seeds)
        ]
        metrics = run_metrics(ref, data.metric, kd.method, teacher_model, t_scores, runs, start)
        record = build_record(
            ref, teacher, teacher_record, student, kd, train, seeds, teacher_src, runs, metrics
        )
        write_run(stage, record)
        shutil.rmtree(work, ignore_errors=True)
        write_run_record(stage, "distill")
    return record.metrics


def _one_seed(
    data: Data, teacher: GNN, spec: StudentSpec, kd: KDSpec, train: TrainConfig
) -> SeedResult:
    seed_everything(train.seed)
    model = build_for_data(
        spec.arch,
        data,
        getattr(data, "name", None) or "the dataset",
        hidden=spec.hidden,
        num_layers=spec.layers,
        dropout=spec.dropout,
        role="student",
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
    return SeedResult(train.seed, model.cpu(), result, attention, t.cpu())


def run_metrics(
    ref: dict[str, Any],
    metric: str,
    method: str,
    teacher: GNN,
    t_scores: dict[str, float],
    runs: list[SeedResult],
    start: float,
) -> dict[str, Any]:
    """``metrics.json`` of a run (the saved student is the best seed by validation)."""
    best = max(runs, key=lambda r: r.val_score)
    tests = [r.fit.scores["test"] for r in runs]
    # Typed models: the ratio counts without the embedding tables (as the ABKD paper does).
    t_counts, s_counts = parameter_counts(teacher), parameter_counts(best.model)
    t_params, s_params = t_counts["params"], s_counts["params"]
    t_core, s_core = t_counts["params_without_embeddings"], s_counts["params_without_embeddings"]
    per_seed = [
        {
            "seed": r.seed,
            **score_keys(r.fit.scores),
            "best_epoch": r.fit.best_epoch,
            "seconds_per_epoch": r.fit.seconds_per_epoch,
        }
        for r in runs
    ]
    return {
        "dataset": ref,
        "metric": metric,
        "method": method,
        "seeds": [r.seed for r in runs],
        "teacher": {
            "arch": teacher.arch,
            "params": t_params,
            "params_without_embeddings": t_core,
            **score_keys({"test": t_scores["test"], "val": t_scores["val"]}),
        },
        "student": {
            "arch": best.model.arch,
            "params": s_params,
            "params_without_embeddings": s_core,
            **score_keys({"test": statistics.fmean(tests)}),
            **score_keys({"test": statistics.pstdev(tests) if len(tests) > 1 else 0.0}, "_std"),
            **score_keys({"val": statistics.fmean(r.val_score for r in runs)}),
            "saved_seed": best.seed,
        },
        "compression_ratio": t_core / s_core,
        "compression_ratio_with_embeddings": t_params / s_params,
        "seconds_per_epoch": statistics.fmean(r.fit.seconds_per_epoch for r in runs),
        "per_seed": per_seed,
        "seconds": time.perf_counter() - start,
    }


def write_run(out: Path, run: RunRecord) -> None:
    """Writes the run's files into ``out`` (the staging directory)."""
    best, metrics, ref, kd = run.best, run.metrics, run.dataset, run.kd
    if kd.teacher_mode == "joint":  # the fine-tuned teacher of the saved seed
        save_model(best.teacher, out, "teacher", extra={"dataset": ref})
    else:
        for name in ("teacher.safetensors", "teacher.json"):
            shutil.copyfile(run.teacher_src / name, out / name)
    teacher_info = {
        "source": run.teacher.path if run.teacher.path else "trained by this run",
        "sha256": sha256_file(out / "teacher.safetensors"),
    }
    save_model(
        best.model,
        out,
        "student",
        extra={"dataset": ref, "teacher": teacher_info, "method": kd.method},
    )
    if best.attention is not None:
        write_json(
            out / "attention.json",
            {
                "rows": "student layers",
                "columns": "teacher layers",
                "matrix": best.attention,
                "seed": best.seed,
            },
        )
        plot_attention(
            best.attention,
            out / "attention.png",
            f"ABKD attention ({metrics['student']['arch']} <- {metrics['teacher']['arch']})",
        )
        metrics["attention"] = best.attention
    plot_curves(
        best.fit.history,
        out / "curves.png",
        f"{kd.method}: {metrics['student']['arch']} student, seed {best.seed}",
    )
    write_json(out / "history.json", best.fit.history)
    hashes = checkpoint_hashes(out, ("student.safetensors", "teacher.safetensors"))
    metrics["checkpoints"] = hashes
    write_json(
        out / "config.json",
        {
            "command": "distill",
            "dataset": ref,
            "teacher": asdict(run.teacher),
            "student": asdict(run.student),
            "kd": asdict(kd),
            "train": asdict(run.train),
            "seeds": run.seeds,
            "checkpoints": hashes,
        },
    )
    write_json(out / "metrics.json", metrics)


__all__ = [
    "FitResult",
    "KDSpec",
    "RunRecord",
    "SeedResult",
    "StudentSpec",
    "TeacherSpec",
    "build_record",
    "distill",
    "prepare_teacher",
    "run_metrics",
    "write_run",
]
