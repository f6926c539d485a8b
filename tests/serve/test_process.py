"""The serving process: no torch import, `abkd-deploy serve` and its signal handling."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
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
    proc, port = _start(embedded_dir, "--max-wait-ms", "1500", "--min-batch", "64")
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


def _serve_cmd(export_dir: Path, port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "abkd_deploy.cli",
        "serve",
        str(export_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        *args,
    ]


def test_port_in_use_is_one_line_exit_1(embedded_dir: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = subprocess.run(
            _serve_cmd(embedded_dir, port), capture_output=True, text=True, cwd=REPO, timeout=120
        )
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"error: port {port} on 127.0.0.1 is already in use (another server is running "
        "there?); stop it or pick another port with --port"
    ], r.stderr


def test_tampered_num_nodes_refuses_to_serve(export_copy: Path) -> None:
    path = export_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["graph"]["num_nodes"] += 100  # ids 500..599 would reach onnxruntime
    path.write_text(json.dumps(manifest))
    r = subprocess.run(
        _serve_cmd(export_copy, _free_port()), capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "graph.num_nodes=600" in r.stderr and "Traceback" not in r.stderr


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (it does after these answers)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _stalled_body(port: int) -> socket.socket:
    """A client that sends its headers and 10 of 100 body bytes, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b'POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"node_ids"')
    time.sleep(0.3)  # the request is in the app, waiting for the rest of its body
    return sock


def test_shutdown_with_stalled_client_reports_it(embedded_dir: Path) -> None:
    proc, port = _start(embedded_dir, "--graceful-timeout", "1", "--body-timeout", "60")
    try:
        sock = _stalled_body(port)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        took = time.monotonic() - start
        reply = _read_all(sock)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 10, (took, out)
    assert proc.returncode == 1, (proc.returncode, out)
    assert "error: shutdown cut off 1 request(s) still unanswered after the 1 s" in out
    assert "stopped after draining" not in out
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "shutdown"


def test_shutdown_after_body_timeout_is_clean(embedded_dir: Path) -> None:
    """A stalled client that the body timeout already answered (408) does not block shutdown."""
    proc, port = _start(embedded_dir, "--graceful-timeout", "20", "--body-timeout", "1")
    try:
        sock = _stalled_body(port)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        reply = _read_all(sock)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert proc.returncode == 0, out
    assert "stopped after draining" in out and "cut off" not in out


def test_sigterm_lets_a_request_in_flight_finish(embedded_dir: Path) -> None:
    """Independent of micro-batching: a request whose body is still arriving at SIGTERM
    is answered (200) within the graceful timeout, and shutdown reports a clean drain."""
    proc, port = _start(embedded_dir, "--graceful-timeout", "20", "--body-timeout", "20")
    try:
        body = b'{"node_ids": [3, 1, 4]}'
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = f"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body[:5])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[5:])
        reply = _read_all(sock)
        sock.close()
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert len(json.loads(reply.partition(b"\r\n\r\n")[2])["predictions"]) == 3
    assert proc.returncode == 0, out
    assert "stopped after draining" in out and "cut off" not in out


def _memory_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (proportional: shared pages divided among their users) of a process."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Shared_Clean", "Private_Dirty"):
            out[key] = int(rest.split()[0])
    return out


def _pids_by_connection(port: int, want: int, ids: list[int], expected: list[int]) -> list[int]:
    """Opens connections until ``want`` distinct worker pids answered (each connection
    also checks a prediction); the kernel hashes each connection to one worker's socket.
    Returns the pid that answered each prediction."""
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while len(set(seen)) < want and time.monotonic() < deadline:
        c = Client(port)
        try:
            _, health, _ = c.request("GET", "/healthz")
            status, body = c.predict(ids)
        finally:
            c.close()
        assert status == 200 and body["predictions"] == expected, body
        seen.append(health["pid"])
    return seen


def _scrape(port: int) -> tuple[int, dict[str, float]]:
    """(pid of the answering worker, the ``abkd_serve_*`` samples of its /metrics)."""
    c = Client(port)
    try:
        _, health, _ = c.request("GET", "/healthz")
        _, text, _ = c.request("GET", "/metrics")
    finally:
        c.close()
    samples = {}
    for line in text.splitlines():
        if line.startswith("abkd_serve_"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return health["pid"], samples


def test_workers_answer_from_separate_processes(embedded_dir: Path, capsys) -> None:
    from abkd_deploy.serve import Predictor

    ids = [3, 1, 4, 1, 5, 499]
    expected = Predictor(embedded_dir, device="cpu", threads=1).predict(ids).classes.tolist()
    metric_dirs = set(Path(tempfile.gettempdir()).glob("abkd-metrics-*"))
    proc, port = _start(embedded_dir, "--workers", "2")
    try:
        assert len(set(Path(tempfile.gettempdir()).glob("abkd-metrics-*")) - metric_dirs) == 1
        answered = _pids_by_connection(port, 2, ids, expected)
        pids = set(answered)
        assert len(pids) == 2 and proc.pid not in pids, pids
        want = {
            'abkd_serve_requests_total{code="200"}': len(answered),
            "abkd_serve_node_ids_total": len(ids) * len(answered),
            "abkd_serve_request_latency_seconds_count": len(answered),
        }
        # either worker reports the sum over both (a worker records a request just after
        # sending its answer, so a scrape may briefly lag: retry until both agree)
        agreeing: dict[int, dict[str, float]] = {}
        deadline = time.monotonic() + 60
        while len(agreeing) < 2 and time.monotonic() < deadline:
            pid, samples = _scrape(port)
            got = {k: samples.get(k) for k in want}
            if got == want:
                agreeing[pid] = got
        assert set(agreeing) == pids, (agreeing, got, want)
        if Path(f"/proc/{proc.pid}/smaps_rollup").exists():
            with capsys.disabled():
                for pid in sorted(pids):
                    print(f"\nworker {pid} memory (kB): {_memory_kb(pid)}")
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert out.count("embedded model on CPUExecutionProvider") == 2, out
    assert "2 workers listening on" in out and "stopped after draining" in out
    assert set(Path(tempfile.gettempdir()).glob("abkd-metrics-*")) <= metric_dirs  # removed


def test_workers_drain_in_flight_requests_on_sigterm(embedded_dir: Path) -> None:
    """Requests waiting in the workers' batchers (--min-batch) when SIGTERM reaches the
    parent are all answered, and the parent exits 0 after every worker drained."""
    args = ("--workers", "2", "--min-batch", "64", "--max-wait-ms", "3000")
    proc, port = _start(embedded_dir, *args)
    try:
        clients = [Client(port) for _ in range(8)]
        for c in clients:
            c.conn.connect()
        time.sleep(0.3)  # accepted by the workers before the listening sockets close
        results: dict[int, tuple[int, object]] = {}

        def call(i: int) -> None:
            try:
                results[i] = clients[i].predict([i, i + 1])
            except Exception as exc:
                results[i] = (-1, repr(exc))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all eight wait (3 s at most) for 64 ids that never come
        assert not results, results
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [results[i][0] for i in range(8)] == [200] * 8, (results, out)
    assert proc.returncode == 0 and "stopped after draining" in out, out


def test_workers_report_requests_cut_off(embedded_dir: Path) -> None:
    proc, port = _start(
        embedded_dir, "--workers", "2", "--graceful-timeout", "1", "--body-timeout", "60"
    )
    try:
        sock = _stalled_body(port)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        reply = _read_all(sock)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert proc.returncode == 1, out
    assert "shutdown cut off 1 request(s)" in out, out
    assert "error: 1 of 2 workers did not drain cleanly" in out, out
    assert "stopped after draining" not in out


def test_workers_startup_error_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [*_serve_cmd(tmp_path, _free_port()), "--workers", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: no manifest.json"), r.stderr
    assert "stopped the other workers" in r.stderr and "Traceback" not in r.stderr
