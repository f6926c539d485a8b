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
from abkd_deploy.serve.bench import (
    MIN_SAMPLES,
    MODELS,
    bench,
    format_markdown,
    format_ratio,
    make_requests,
    sample_warnings,
    write_report,
)
from abkd_deploy.serve.bench_worker import measure

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
    models = report["models"]
    # each worker reports whether torch was in its sys.modules after the measurement
    assert models["student-onnx"]["torch_imported"] is False
    for other in ("teacher-torch", "student-torch", "student-torch-export"):
        assert models[other]["torch_imported"] is True
    # a torch-free process is far smaller than the teacher's (which imports torch + PyG)
    assert models["student-onnx"]["rss_after_load_mb"] < models["teacher-torch"]["peak_rss_mb"]


@pytest.mark.parametrize("where", ["export", "run", "foreign"])
def test_bad_out_is_refused_before_the_benchmark_runs(pipeline, tmp_path, monkeypatch, where):
    ran = []
    monkeypatch.setattr("abkd_deploy.serve.bench.bench", lambda *a, **k: ran.append(1))
    if where == "foreign":  # an existing file that is not a bench report
        out = tmp_path / "notes.json"
        out.write_text("{}")
    else:
        out = pipeline[where] / "report.json"
    args = ["bench", str(pipeline["export"]), "--models", "student-onnx", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and str(out) in result.output
    assert not ran
    assert where == "foreign" or not out.exists()


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
    # the same machine's fresh report as baseline; a wide tolerance absorbs CI noise (a p95
    # of 4 requests on a loaded 2-core machine moved 0.15 -> 3.7 ms once); the 100x-faster
    # baseline above still fails at any tolerance below 99
    passed = runner.invoke(
        main, [*args, "--baseline", str(tmp_path / "own.json"), "--max-regression", "30"]
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


def test_every_percentile_reports_its_sample_count(report, tmp_path):
    for r in report["results"]:
        assert r["samples"] == {"per_trial": 4, "trials": 2, "total": 8}
        assert r["trials_samples"] == [4, 4]
    written = json.loads(write_report(report, tmp_path / "r.json")[0].read_text())
    assert all(r["samples"]["per_trial"] == 4 for r in written["results"])
    md = format_markdown(report)
    assert "| samples |" in md and "| 4 x 2 (!) |" in md


def test_few_samples_are_warned_about(report):
    assert SMALL["requests"] < MIN_SAMPLES
    assert len(report["warnings"]) == len(report["results"])
    assert "--requests 4 is below 20" in report["warnings"][0]
    assert "Warnings:" in format_markdown(report)


def test_trial_seconds_cap_is_named_in_the_warning():
    results = [
        {"model": "teacher-torch", "batch_size": 64, "samples": {"per_trial": 3}},
        {"model": "student-onnx", "batch_size": 64, "samples": {"per_trial": 20}},
    ]
    (warning,) = sample_warnings(results, {"requests": 20, "trial_seconds": 3.0})
    assert warning.startswith("teacher-torch batch 64: p50/p95/p99 rest on 3 request(s)")
    assert "--trial-seconds 3 stopped each trial after 3 of 20 requests" in warning


def test_measure_counts_the_requests_of_each_trial():
    import numpy as np

    batches = np.zeros((30, 2), dtype=np.int64)
    capped = measure(lambda ids: None, batches, warmup=0, trials=3, trial_seconds=0.0)
    assert capped["trials_samples"] == [3, 3, 3]  # the time cap keeps >= 3 requests
    full = measure(lambda ids: None, batches, warmup=0, trials=2, trial_seconds=60.0)
    assert full["trials_samples"] == [30, 30]


def test_markdown_heads_with_machine_threads_and_trial_settings(report):
    header = format_markdown(report).split("| model |")[0]
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1
    assert f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores" in header
    assert "- threads: 1 intra-op" in header
    assert "- trials: 2 per model and batch size" in header and "4 requests each" in header
    assert "warm-up 1" in header and "batch sizes 1, 16" in header


@pytest.mark.parametrize(
    ("value", "text"),
    [(27055.8, "27,100x"), (3.4213, "3.42x"), (361.1, "361x"), (47.44, "47.4x"), (0.5, "0.5x")],
)
def test_ratios_have_three_significant_digits(value, text):
    assert format_ratio(value) == text


def test_report_ratios_are_printed_with_sensible_precision(report):
    md = format_markdown(report)
    ratio_lines = [line for line in md.splitlines() if "/student-onnx" in line]
    assert ratio_lines
    for line in ratio_lines:
        value = line.rsplit(": ", 1)[1]
        assert value.endswith("x"), line
        digits = value[:-1].replace(",", "")
        significant = digits.replace(".", "").lstrip("0")
        if "." not in digits:
            significant = significant.rstrip("0")
        assert len(significant) <= 3, line
