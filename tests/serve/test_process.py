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
