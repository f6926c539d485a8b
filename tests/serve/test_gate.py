"""Regression gate over bench report JSONs."""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.gate import (
    compare_all,
    compare_reports,
    format_regressions,
    load_report,
)


def _result(model: str, bs: int, p50: list[float], p95: list[float], nps: list[float]) -> dict:
    return {
        "model": model,
        "batch_size": bs,
        "trials_ms": {"p50": p50, "p95": p95},
        "trials_throughput_nps": nps,
        "p50_ms": statistics.median(p50),
        "p95_ms": statistics.median(p95),
        "throughput_nps": statistics.median(nps),
    }


def _report(*results: dict) -> dict:
    return {"format_version": 1, "results": list(results)}


def _measured_report(predictor: Predictor, trials: int = 3, reps: int = 20) -> dict:
    """A small real report: the Predictor timed at batch 1 and 64."""
    rng = np.random.default_rng(0)
    results = []
    for bs in (1, 64):
        p50, p95, nps = [], [], []
        for _ in range(trials):
            times = []
            for _ in range(reps):
                ids = rng.integers(0, predictor.num_nodes, size=bs)
                t0 = time.perf_counter()
                predictor.predict(ids)
                times.append((time.perf_counter() - t0) * 1000)
            p50.append(float(np.percentile(times, 50)))
            p95.append(float(np.percentile(times, 95)))
            nps.append(bs * reps / (sum(times) / 1000))
        results.append(_result("student-onnx", bs, p50, p95, nps))
    return _report(*results)


class _Slowed:
    """The Predictor with ``extra_s`` of real extra latency per call (a regression)."""

    def __init__(self, predictor: Predictor, extra_s: float) -> None:
        self.predictor, self.extra_s = predictor, extra_s
        self.num_nodes = predictor.num_nodes

    def predict(self, ids: np.ndarray):
        time.sleep(self.extra_s)
        return self.predictor.predict(ids)


def test_gate_on_real_measurements(embedded_dir: Path) -> None:
    """Two real measurements, the second with 10 ms added to every call: the gate names
    every latency and throughput metric of the slow one, and passes the fast one."""
    predictor = Predictor(embedded_dir, device="cpu", threads=1)
    fast = _measured_report(predictor, reps=10)
    slow = _measured_report(_Slowed(predictor, 0.010), reps=10)
    regs = compare_reports(fast, slow, 0.15)
    assert {(r.metric, r.batch_size) for r in regs} == {
        (m, bs) for m in ("p50_ms", "p95_ms", "throughput_nps") for bs in (1, 64)
    }
    assert all(r.worse_by > 0.5 for r in regs), regs
    assert compare_reports(slow, fast, 0.15) == []  # an improvement never fails


def test_tolerance_direction_and_noise() -> None:
    base = _report(_result("m", 64, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1000, 1000, 1000]))
    # 10% slower: inside 15%
    cur = _report(_result("m", 64, [1.1, 1.1, 1.1], [2.2, 2.2, 2.2], [910, 910, 910]))
    assert compare_reports(base, cur, 0.15) == []
    assert len(compare_reports(base, cur, 0.05)) == 3
    # one wild trial out of five does not move the median
    noisy = _report(_result("m", 64, [1, 1, 1, 1, 9], [2, 2, 2, 2, 30], [1000, 1000, 10, 990, 995]))
    assert compare_reports(base, noisy, 0.15) == []
    # improvements never fail
    fast = _report(_result("m", 64, [0.2], [0.3], [9000]))
    assert compare_reports(base, fast, 0.0) == []


def test_regression_fields_and_message() -> None:
    base = _report(_result("student-onnx", 64, [1.0], [2.0], [64000]))
    cur = _report(_result("student-onnx", 64, [1.5], [2.0], [40000]))
    regs = compare_reports(base, cur, 0.15)
    assert [(r.metric, r.model, r.batch_size, r.old, r.new) for r in regs] == [
        ("p50_ms", "student-onnx", 64, 1.0, 1.5),
        ("throughput_nps", "student-onnx", 64, 64000, 40000),
    ]
    assert regs[0].change == pytest.approx(0.5)
    assert regs[1].change == pytest.approx(-0.375) and regs[1].worse_by == pytest.approx(0.375)
    msg = format_regressions(regs, 0.15)
    assert "2 metric(s) worse by more than 15%" in msg
    assert "p50_ms student-onnx batch 64: 1 -> 1.5 ms (+50.0%" in msg
    assert "throughput_nps student-onnx batch 64: 64,000 -> 40,000 nodes/s (-37.5%" in msg
    assert "passed" in format_regressions([], 0.15)


def test_min_delta_and_summary_fallback() -> None:
    base = _report({"model": "m", "batch_size": 1, "p50_ms": 0.010, "p95_ms": 0.02})
    cur = _report({"model": "m", "batch_size": 1, "p50_ms": 0.015, "p95_ms": 0.02})
    assert [r.metric for r in compare_reports(base, cur)] == ["p50_ms"]  # from summary values
    assert compare_reports(base, cur, min_delta_ms=0.01) == []
    assert len(compare_all(base, cur)) == 2  # no throughput in these reports: not compared


def test_entries_in_one_report_only() -> None:
    base = _report(_result("m", 1, [1], [1], [1]), _result("m", 64, [1], [1], [64]))
    cur = _report(_result("m", 64, [1], [1], [64]), _result("teacher", 64, [9], [9], [1]))
    assert {(c.model, c.batch_size) for c in compare_all(base, cur)} == {("m", 64)}
    with pytest.raises(ConfigError, match="share no"):
        compare_reports(base, _report(_result("x", 2, [1], [1], [1])))


def test_bad_reports(tmp_path: Path) -> None:
    good = _report(_result("m", 1, [1], [1], [1]))
    with pytest.raises(ConfigError, match="format_version"):
        compare_reports({"format_version": 2, "results": []}, good)
    with pytest.raises(ConfigError, match="duplicate"):
        compare_reports(_report(good["results"][0], good["results"][0]), good)
    with pytest.raises(ConfigError, match="max_regression"):
        compare_reports(good, good, -0.1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_report(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert load_report(tmp_path / "ok.json") == good


def test_regression_on_few_samples_says_so() -> None:
    base = _result("teacher-torch", 64, [10.0], [12.0], [6400])
    cur = _result("teacher-torch", 64, [20.0], [24.0], [3200])
    base["samples"] = {"per_trial": 25, "trials": 1, "total": 25}
    cur["trials_samples"] = [3]  # the current run was capped by --trial-seconds
    regs = compare_reports(_report(base), _report(cur), 0.15)
    assert {r.samples for r in regs} == {3}
    msg = format_regressions(regs, 0.15)
    assert msg.count("only 3 requests per trial: noisy") == len(regs) == 3


def test_regression_on_enough_samples_has_no_note() -> None:
    base = _result("student-onnx", 1, [1.0], [1.2], [1000])
    cur = _result("student-onnx", 1, [2.0], [2.4], [500])
    base["requests_per_trial"] = cur["requests_per_trial"] = 50
    regs = compare_reports(_report(base), _report(cur), 0.15)
    assert regs and all(r.samples == 50 for r in regs)
    assert "noisy" not in format_regressions(regs, 0.15)
    old = _report(_result("m", 1, [1.0], [1.0], [1.0]))  # a report without sample counts
    assert {c.samples for c in compare_all(old, copy.deepcopy(old), 0.15)} == {None}


def _http_cell(target: str, conc: int, bs: int, p50: list, p99: list, rps: list) -> dict:
    return {
        "target": target,
        "concurrency": conc,
        "batch_size": bs,
        "trials_ms": {"p50": p50, "p99": p99},
        "trials_rps": rps,
        "p50_ms": statistics.median(p50),
        "p99_ms": statistics.median(p99),
        "rps": statistics.median(rps),
        "samples": {"per_trial": 200, "trials": len(p50), "total": 200 * len(p50)},
    }


def _http_report(*cells: dict, results: tuple = ()) -> dict:
    return {**_report(*results), "http": {"results": list(cells)}}


def test_http_latency_up_and_rps_down_are_regressions() -> None:
    base = _http_report(
        _http_cell("serve", 1, 64, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [900, 1000, 950]),
        _http_cell("floor", 1, 64, [0.3, 0.3, 0.3], [0.5, 0.5, 0.5], [3000, 3000, 3000]),
    )
    cur = _http_report(
        _http_cell("serve", 1, 64, [1.5, 1.6, 1.4], [2.1, 2.0, 2.1], [600, 620, 610]),
        _http_cell("floor", 1, 64, [0.3, 0.3, 0.3], [0.9, 0.9, 0.9], [3100, 3000, 3050]),
    )
    regs = compare_reports(base, cur, 0.15)
    assert [(r.metric, r.model, r.batch_size) for r in regs] == [
        ("p50_ms", "http serve c1", 64),
        ("rps", "http serve c1", 64),
        ("p99_ms", "http floor c1", 64),
    ]
    assert regs[1].unit == "req/s" and regs[1].worse_by == pytest.approx(1 - 610 / 950)
    msg = format_regressions(regs, 0.15)
    assert "rps http serve c1 batch 64: 950 -> 610 req/s" in msg
    # the other way round every change is an improvement
    assert compare_reports(cur, base, 0.15) == []


def test_http_cells_compare_only_where_both_reports_have_them() -> None:
    inproc = _result("student-onnx", 64, [0.1], [0.2], [6400])
    cell = _http_cell("serve", 8, 1, [1.0], [3.0], [5000])
    with_http = _http_report(cell, results=(inproc,))
    # a baseline from before --http: in-process results only, no error
    assert {c.model for c in compare_all(_report(inproc), with_http)} == {"student-onnx"}
    # HTTP-only reports (bench --models '' --http) are compared on their cells
    only = _http_report(cell)
    slower = _http_report(_http_cell("serve", 8, 1, [1.0], [3.0], [2000]))
    assert [(r.metric, r.model) for r in compare_reports(only, slower)] == [
        ("rps", "http serve c8")
    ]
    other = _http_report(_http_cell("serve", 32, 1, [1.0], [3.0], [5000]))
    with pytest.raises(ConfigError, match="share no"):
        compare_reports(only, other)


def test_bad_http_sections() -> None:
    good = _http_report(_http_cell("serve", 1, 1, [1.0], [1.0], [1.0]))
    with pytest.raises(ConfigError, match="'http' has no 'results'"):
        compare_reports({**good, "http": {"cells": []}}, good)
    with pytest.raises(ConfigError, match="needs 'target', 'concurrency'"):
        compare_reports(_http_report({"target": "serve", "batch_size": 1}), good)
    cell = good["http"]["results"][0]
    with pytest.raises(ConfigError, match="duplicate http result"):
        compare_reports(_http_report(cell, cell), good)
