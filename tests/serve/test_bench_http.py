"""``bench --http`` on the tiny export: real `abkd-deploy serve` and floor subprocesses."""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from abkd_deploy.cli import main
from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.bench import bench
from abkd_deploy.serve.bench_http import (
    HttpOptions,
    free_port,
    group_pids,
    http_warnings,
    launch,
    port_is_free,
    serve_command,
    start_server,
    stop_server,
)
from abkd_deploy.serve.gate import compare_reports, format_regressions

CONCURRENCY, SIZES = (1, 4), (1, 16)


@pytest.fixture(scope="module")
def http_run(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick ``bench --http`` through the CLI (HTTP only: the tiny export has no dataset)."""
    out = tmp_path_factory.mktemp("bench-http") / "bench.json"
    args = ["bench", str(embedded_dir), "--models", "", "--http", "--requests", "8"]
    args += ["--http-concurrency", ",".join(map(str, CONCURRENCY))]
    args += ["--http-batch-sizes", ",".join(map(str, SIZES)), "--http-requests", "40"]
    args += ["--trials", "2", "--warmup", "1", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return {"report": json.loads(out.read_text()), "md": out.with_suffix(".md").read_text()}


def test_every_cell_is_measured(http_run: dict) -> None:
    section = http_run["report"]["http"]
    cells = {(r["target"], r["concurrency"], r["batch_size"]): r for r in section["results"]}
    assert set(cells) == {(t, c, b) for t in ("serve", "floor") for c in CONCURRENCY for b in SIZES}
    for (_, conc, b), r in cells.items():
        assert r["errors"] == 0
        assert r["samples"]["per_trial"] >= conc and r["samples"]["trials"] == 2
        assert len(r["trials_ms"]["p50"]) == len(r["trials_rps"]) == 2
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["rps"] > 0 and r["ids_per_s"] == pytest.approx(r["rps"] * b)
        assert r["client_cpu_us_per_request"] > 0 and r["client_ceiling_rps"] > 0
    for c in CONCURRENCY:
        for b in SIZES:
            for what in ("p50", "p99", "req/s"):
                key = f"serve/floor {what} @ c{c} b{b}"
                assert section["ratios"][key] > 0
    assert section["config"]["parser"] in ("BoundedHttpToolsProtocol", "BoundedH11Protocol")
    assert "abkd-deploy serve" in section["commands"]["serve"]


def test_serve_answered_like_predictor(http_run: dict) -> None:
    check = http_run["report"]["http"]["check"]
    assert check["batch_sizes"] == list(SIZES) and check["classes_equal"]
    assert check["max_abs_score_diff"] <= 1e-5


def test_servers_are_stopped_and_ports_free(http_run: dict) -> None:
    servers = http_run["report"]["http"]["servers"]
    assert set(servers) == {"serve", "floor"}
    for s in servers.values():
        assert s["exit_code"] == 0 and s["leftover_pids"] == [] and s["port_free"]
        assert s["rss_mb"]  # measured while running
        for pid in map(int, s["rss_mb"]):
            assert not Path(f"/proc/{pid}").exists() or group_pids(pid) == []


def test_markdown_has_the_http_table(http_run: dict) -> None:
    md = http_run["md"]
    assert "## HTTP (closed-loop clients" in md and "| target | clients | ids |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| serve |", "| floor |"))]
    assert len(rows) == 2 * len(CONCURRENCY) * len(SIZES)
    assert "serve/floor p50 @ c1 b1:" in md
    if (os.cpu_count() or 1) < 4:
        assert "compete for the CPU" in md


def test_gate_flags_an_http_regression(http_run: dict) -> None:
    report = http_run["report"]
    assert compare_reports(report, copy.deepcopy(report), 0.15) == []
    baseline = copy.deepcopy(report)  # doctored: serve was 3x faster at concurrency 4, 16 ids
    cell = next(
        r
        for r in baseline["http"]["results"]
        if (r["target"], r["concurrency"], r["batch_size"]) == ("serve", 4, 16)
    )
    cell["trials_ms"] = {k: [v / 3 for v in vs] for k, vs in cell["trials_ms"].items()}
    cell["trials_rps"] = [v * 3 for v in cell["trials_rps"]]
    regs = compare_reports(baseline, report, 0.15)
    assert {(r.metric, r.model, r.batch_size) for r in regs} == {
        (m, "http serve c4", 16) for m in ("p50_ms", "p99_ms", "rps")
    }
    assert "rps http serve c4 batch 16" in format_regressions(regs)


def test_server_lifecycle_and_answers(embedded_dir: Path, tmp_path: Path) -> None:
    import http.client

    port = free_port()
    command = serve_command(embedded_dir, port, HttpOptions(), "cpu", 1)
    server = start_server("serve", command, port, tmp_path, 60.0)
    try:
        ids = np.array([3, 499, 0, 42], dtype=np.int64)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/predict", orjson.dumps({"node_ids": ids.tolist()}))
        resp = conn.getresponse()
        got = orjson.loads(resp.read())
        conn.close()
    finally:
        stopped = stop_server(server)
    assert resp.status == 200
    want = Predictor(embedded_dir, device="cpu", threads=1).predict(ids)
    assert got["predictions"] == want.classes.tolist()
    np.testing.assert_allclose(got["scores"], want.scores, atol=1e-6)
    assert stopped["exit_code"] == 0 and stopped["leftover_pids"] == []
    assert server.proc.poll() == 0 and group_pids(server.proc.pid) == []
    assert port_is_free(port)


def test_bad_http_options(embedded_dir: Path) -> None:
    with pytest.raises(ConfigError, match="HTTP concurrency"):
        HttpOptions(concurrency=(0, 8))
    with pytest.raises(ConfigError, match="HTTP workers"):
        HttpOptions(workers=0)
    with pytest.raises(ConfigError, match="unknown model"):
        bench(embedded_dir, models=(), progress=False)  # nothing to measure without --http
    result = CliRunner().invoke(main, ["bench", str(embedded_dir), "--http-concurrency", "x"])
    assert result.exit_code == 2 and "--http-concurrency" in result.output


def test_a_leftover_process_is_reported_and_killed(tmp_path: Path) -> None:
    # a "server" whose child survives it: the bench must notice, kill it and say so
    script = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        "print(child.pid, flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    server = launch("stubborn", [sys.executable, "-c", script], free_port(), tmp_path)
    deadline = time.monotonic() + 20
    while not server.log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(server.log_path.read_text().split()[0])
    stopped = stop_server(server, linger_s=0.2)
    assert stopped["exit_code"] == 0 and stopped["leftover_pids"] == [child]
    assert group_pids(server.proc.pid) == []  # killed afterwards
    assert "leftover processes" in http_warnings([], {"stubborn": stopped})[0]
