"""``abkd-deploy compare``: every KD method on the same teacher, seeds and split."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from abkd_deploy.distill.objective import METHODS
from abkd_deploy.distill.run import distill
from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec
from abkd_deploy.distill.teacher import dataset_ref, resolve_teacher
from abkd_deploy.distill.trainer import TrainConfig
from abkd_deploy.errors import ConfigError
from abkd_deploy.files import atomic_path, write_json
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record

DEFAULT_METHODS = ("ce", "kd", "fitnet", "at", "lsp", "gcrd", "abkd")


def compare(
    dataset: str = "csbm",
    root: str | Path | None = None,
    split: str | None = None,
    teacher: TeacherSpec | None = None,
    student: StudentSpec | None = None,
    kd: KDSpec | None = None,
    train: TrainConfig | None = None,
    seeds: int = 5,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    out: str | Path = "runs/compare",
    force: bool = False,
) -> list[dict[str, Any]]:
    """Runs :func:`~abkd_deploy.distill.run.distill` for each method and writes
    ``out/comparison.json`` and ``out/comparison.md`` (one row per method).

    The teacher is trained once (into ``out/teacher``) unless ``teacher.path`` is given;
    ``kd`` supplies the shared hyper-parameters (its ``method`` is replaced). ``out`` is
    checked before any training, staged and published whole (:mod:`abkd_deploy.staging`),
    ``run.json`` last.
    """
    teacher, kd, train = teacher or TeacherSpec(), kd or KDSpec(), train or TrainConfig()
    for m in methods:
        METHODS.get(m)
    if not methods:
        raise ConfigError("compare needs at least one method")
    sources = [teacher.path]  # a dataset root is protected by the ownership check
    check_out_dir(out, force, sources)
    with staged_directory(out, force, sources) as stage:
        record = teacher.path
        if teacher.path is None:  # trained once, published with the comparison
            src = resolve_teacher(teacher, dataset_ref(dataset, root, split), train, stage)
            teacher = replace(teacher, path=str(src))
            record = str(Path(out) / src.name)
        rows = []
        for method in methods:
            m = distill(
                dataset,
                root,
                split,
                teacher,
                student,
                replace(kd, method=method),
                train,
                seeds,
                stage / method,
                teacher_record=record,
            )
            rows.append(
                {
                    "method": method,
                    "test_score_mean": m["student"]["test_score"],
                    "test_score_std": m["student"]["test_score_std"],
                    "val_score_mean": m["student"]["val_score"],
                    "per_seed_test": [s["test_score"] for s in m["per_seed"]],
                    "student_params": m["student"]["params"],
                    "teacher_params": m["teacher"]["params"],
                    "teacher_test_score": m["teacher"]["test_score"],
                    # the names rows had before (same values; the scores are `metric`)
                    "test_acc_mean": m["student"]["test_score"],
                    "test_acc_std": m["student"]["test_score_std"],
                    "val_acc_mean": m["student"]["val_score"],
                    "teacher_test_acc": m["teacher"]["test_score"],
                    "compression_ratio": m["compression_ratio"],
                    # typed graphs: the ratio counts without embedding tables; both kept
                    "student_params_without_embeddings": m["student"]["params_without_embeddings"],
                    "teacher_params_without_embeddings": m["teacher"]["params_without_embeddings"],
                    "compression_ratio_with_embeddings": m["compression_ratio_with_embeddings"],
                    "seconds_per_epoch": m["seconds_per_epoch"],
                    "metric": m["metric"],
                }
            )
        write_json(stage / "comparison.json", {"dataset": dataset, "seeds": seeds, "rows": rows})
        with atomic_path(stage / "comparison.md") as tmp:
            tmp.write_text(format_table(rows) + "\n")
        write_run_record(stage, "compare")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of a comparison (scores in percent; parameters counted without
    embedding tables, as the ratio is, with a note giving the counts with them)."""
    metric = rows[0]["metric"] if rows else "accuracy"
    lines = [
        f"| method | test {metric} (mean ± std, %) | val (%) | student params | teacher params"
        " | ratio | s / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {100 * r['test_score_mean']:.2f} "
            f"± {100 * r['test_score_std']:.2f} | {100 * r['val_score_mean']:.2f} "
            f"| {r.get('student_params_without_embeddings', r['student_params']):,} "
            f"| {r.get('teacher_params_without_embeddings', r['teacher_params']):,} "
            f"| {r['compression_ratio']:.1f}x "
            f"| {r['seconds_per_epoch']:.4f} |"
        )
    if rows:
        lines.append(f"\nteacher test {metric}: {100 * rows[0]['teacher_test_score']:.2f}%")
        r = rows[0]
        if r.get("student_params_without_embeddings", r["student_params"]) != r["student_params"]:
            lines.append(
                f"\nwith the embedding tables: student {r['student_params']:,}, teacher "
                f"{r['teacher_params']:,} params, ratio "
                f"{r['compression_ratio_with_embeddings']:.1f}x"
            )
    return "\n".join(lines)
