"""End-to-end bench: distill -> export -> bench (separate processes) -> regression gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.distill import TrainConfig, train_teacher
from abkd_deploy.distill.run import KDSpec, StudentSpec, TeacherSpec, distill
from abkd_deploy.errors import ConfigError
from abkd_deploy.export import export
from abkd_deploy.serve.bench import MODELS, bench, format_markdown, make_requests, write_report

DATA = "csbm:num_nodes=500,num_features=8,num_classes=3,homophily=0.85,train_ratio=0.1"
FAST = TrainConfig(epochs=15, patience=15, progress=False, device="cpu")
SMALL = {
    "batch_sizes": (1, 16),
    "requests": 4,
    "warmup": 1,
    "trials": 2,
    "threads": 1,
    "progress": False,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    train_teacher(DATA, arch="gcnii", layers=4, hidden=16, train=FAST, out=root / "teacher")
    distill(
        DATA,
        teacher=TeacherSpec(path=str(root / "teacher")),
        student=StudentSpec(arch="sage", hidden=8),
        kd=KDSpec(method="kd"),
        train=FAST,
        out=root / "run",
    )
    export(root / "run", root / "export", fanouts="4,4", progress=False)
    return {"run": root / "run", "export": root / "export", "root": root}


@pytest.fixture(scope="module")
def report(pipeline) -> dict:
    return bench(pipeline["export"], **SMALL)


def test_report_covers_every_model_and_batch(report):
    got = {(r["model"], r["batch_size"]) for r in report["results"]}
    assert got == {(m, b) for m in MODELS for b in (1, 16)}
    for r in report["results"]:
        assert len(r["trials_ms"]["p50"]) == 2 and r["p50_ms"] > 0
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] + 1e-9
        assert r["throughput_nps"] > 0 and r["peak_rss_mb"] > 0 and r["model_bytes"] > 0


def test_same_answers_same_accuracy(report):
    acc = {m: s["accuracy"] for m, s in report["models"].items()}
    # the eager export-form module computes exactly what the ONNX model computes
    assert acc["student-torch-export"] == pytest.approx(acc["student-onnx"], abs=1e-9)
    assert acc["student-torch"] == pytest.approx(acc["student-onnx"], abs=0.02)
    assert report["models"]["student-onnx"]["provider"] == "CPUExecutionProvider"


def test_onnx_worker_runs_without_torch(report):
    # a torch-free process is far smaller than the teacher's (which imports torch + PyG)
    models = report["models"]
    assert models["student-onnx"]["rss_after_load_mb"] < models["teacher-torch"]["peak_rss_mb"]


def test_written_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "r.json")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    assert json.loads(paths[0].read_text())["format_version"] == 1
    md = paths[1].read_text()
    assert "| student-onnx | 16 |" in md and "teacher-torch/student-onnx" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert "p50 ms" in format_markdown(report)


def test_gate_fails_on_clearly_faster_baseline_and_passes_on_own(pipeline, report, tmp_path):
    fast = json.loads(json.dumps(report))
    for r in fast["results"]:
        r["trials_ms"] = {k: [v / 100 for v in vals] for k, vals in r["trials_ms"].items()}
        r["trials_throughput_nps"] = [v * 100 for v in r["trials_throughput_nps"]]
        for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
            r[key] /= 100
        r["throughput_nps"] *= 100
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    args = [
        "bench",
        str(pipeline["export"]),
        "--models",
        "student-onnx",
        "--batch-sizes",
        "1,16",
        "--requests",
        "4",
        "--trials",
        "3",
        "--warmup",
        "1",
    ]
    runner = CliRunner()
    failed = runner.invoke(main, [*args, "--baseline", str(tmp_path / "fast.json")])
    assert failed.exit_code == 1, failed.output
    assert "regression gate failed" in failed.output and "student-onnx batch 16" in failed.output
    own = runner.invoke(main, [*args, "--out", str(tmp_path / "own.json")])
    assert own.exit_code == 0, own.output
    # the same machine's fresh report as baseline; a wide tolerance absorbs CI noise
    passed = runner.invoke(
        main, [*args, "--baseline", str(tmp_path / "own.json"), "--max-regression", "3"]
    )
    assert passed.exit_code == 0, passed.output
    assert "regression gate passed" in passed.output


def test_bad_bench_options(pipeline):
    with pytest.raises(ConfigError, match="unknown model"):
        bench(pipeline["export"], models=("gpu-magic",), **{**SMALL})
    with pytest.raises(ConfigError, match="batch sizes"):
        bench(pipeline["export"], **{**SMALL, "batch_sizes": (0,)})


def test_make_requests_draws_from_given_ids():
    import numpy as np

    ids = np.arange(100, 110)
    reqs = make_requests(ids, (3, 20), requests=5, seed=1)
    assert reqs["batch_3"].shape == (5, 3) and reqs["batch_20"].shape == (5, 20)
    assert set(reqs["batch_20"].ravel()) <= set(ids.tolist())
    assert all(len(set(row)) == 3 for row in reqs["batch_3"])  # no repeats when possible
