"""The serving process: no torch import, `abkd-deploy serve` and its signal handling."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serve.live_server import Client

REPO = Path(__file__).resolve().parents[2]


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys, abkd_deploy.serve, abkd_deploy.serve.server, abkd_deploy.serve.gate, "
        "abkd_deploy.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_geometric'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(export_dir: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abkd_deploy.cli",
            "serve",
            str(export_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            "1",
            *args,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert json.load(r)["status"] == "ok"
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server did not start: {proc.communicate()[0]}") from None
            time.sleep(0.1)


def _queued(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.load(r)["queued"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_requests_finish(embedded_dir: Path, sig: signal.Signals) -> None:
    proc, port = _start(embedded_dir, "--max-wait-ms", "1500")
    try:
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text(), "the serving process loaded torch"
        results: dict[int, tuple[int, object]] = {}

        def call(i: int) -> None:
            c = Client(port)
            try:
                results[i] = c.predict([i, 2 * i])
            except Exception as exc:
                results[i] = (-1, repr(exc))
            finally:
                c.close()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 1.2
        while _queued(port) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _queued(port) == 8  # all eight wait in the micro-batcher (1.5 s)
        proc.send_signal(sig)
        for t in threads:
            t.join(20)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [results[i][0] for i in range(8)] == [200] * 8, (results, out)
    assert "CPUExecutionProvider" in out
    assert proc.returncode == 0, (proc.returncode, out)
    assert "stopped after draining" in out


def test_cli_errors(embedded_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "abkd_deploy.cli", "serve"]
    r = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: no manifest.json"), r.stderr
    r = subprocess.run(
        [*cmd, str(embedded_dir), "--device", "tpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr, r.stderr
