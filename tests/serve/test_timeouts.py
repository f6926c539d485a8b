"""Read timeouts, keep-alive and the connection bound, with raw sockets over loopback."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.limits import MAX_HEADER_BYTES, BoundedHttpToolsProtocol, HttpLimits
from abkd_deploy.serve.server import create_app
from tests.serve.live_server import LiveServer

LIMITS = HttpLimits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=0.5)
SLACK = 2.0  # scheduling slack on a busy 2-core machine


# Both HTTP parsers get the same bounds: httptools (the default when installed) and h11.
PARSERS = [
    "h11",
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(
            BoundedHttpToolsProtocol is None, reason="httptools not installed"
        ),
    ),
]


@pytest.fixture(scope="module", params=PARSERS)
def live(embedded_dir: Path, request: pytest.FixtureRequest):
    predictor = Predictor(embedded_dir, device="cpu", threads=1, max_batch=64)
    app = create_app(predictor, max_batch=64, body_timeout_s=LIMITS.body_timeout_s)
    with LiveServer(app, limits=LIMITS, http=request.param) as server:
        assert isinstance(server.server.config.http, type)
        yield server


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; fails if it is still open after ``within``."""
    start = time.monotonic()
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {within} s (got {data[:200]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def _post_head(length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_silent_connection_is_closed(live: LiveServer) -> None:
    sock = _connect(live.port)
    data, took = _read_until_closed(sock, LIMITS.header_timeout_s + SLACK)
    assert data == b"" and took >= LIMITS.header_timeout_s * 0.8


def test_stalled_headers_are_closed(live: LiveServer) -> None:
    sock = _connect(live.port)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\n")  # never ends the headers
    data, _ = _read_until_closed(sock, LIMITS.header_timeout_s + SLACK)
    assert data == b""


def test_trickled_headers_are_closed(live: LiveServer) -> None:
    """Sending a byte now and then does not extend the header deadline (slowloris)."""
    sock = _connect(live.port)
    start = time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
            if time.monotonic() - start > LIMITS.header_timeout_s + SLACK:
                pytest.fail("trickled headers kept the connection open")
    except (BrokenPipeError, ConnectionResetError):
        pass
    else:
        assert _read_until_closed(sock, SLACK)[0] == b""
    assert time.monotonic() - start < LIMITS.header_timeout_s + SLACK


def test_idle_keep_alive_is_closed(live: LiveServer) -> None:
    sock = _connect(live.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    data, took = _read_until_closed(sock, LIMITS.keep_alive_s + SLACK)
    assert data.startswith(b"HTTP/1.1 200")  # answered, then closed when idle
    assert took < LIMITS.keep_alive_s + SLACK


def test_stalled_body_gets_408(live: LiveServer) -> None:
    sock = _connect(live.port)
    sock.sendall(_post_head(100) + b'{"node_ids": [1')  # 15 of 100 bytes, then silence
    data, took = _read_until_closed(sock, LIMITS.body_timeout_s + SLACK)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert took >= LIMITS.body_timeout_s * 0.8


def test_oversized_headers_are_refused(live: LiveServer) -> None:
    """h11 bounds the request line + headers to 16 KiB; httptools gets the same bound."""
    sock = _connect(live.port)
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 1024) + b"\r\n"
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + big)
    except (BrokenPipeError, ConnectionResetError):
        return
    data, took = _read_until_closed(sock, SLACK)
    assert data.startswith(b"HTTP/1.1 400") or data == b"", data[:200]
    assert took < SLACK


def test_headers_under_the_bound_are_served(live: LiveServer) -> None:
    sock = _connect(live.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Ok: " + b"a" * 8000 + b"\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()


def test_server_still_answers_after_timeouts(live: LiveServer) -> None:
    c = live.connect()
    assert c.predict([1, 2])[0] == 200
    c.close()


def test_client_reconnects_after_the_server_closed_an_idle_connection(live: LiveServer) -> None:
    """The tests' keep-alive client survives the server's idle close (as urllib3 does), so
    a loaded machine's pauses between requests cannot fail the fuzz tests."""
    c = live.connect()
    assert c.predict([1, 2])[0] == 200
    time.sleep(LIMITS.keep_alive_s + SLACK)  # the server closes the idle connection
    assert c.predict([1, 2])[0] == 200
    c.close()


@pytest.mark.parametrize("parser", PARSERS)
def test_connection_bound(embedded_dir: Path, parser: str) -> None:
    predictor = Predictor(embedded_dir, device="cpu", threads=1, max_batch=64)
    limits = HttpLimits(max_connections=2)
    with LiveServer(create_app(predictor, max_batch=64), limits=limits, http=parser) as server:
        held = [_connect(server.port) for _ in range(2)]
        time.sleep(0.2)
        c = server.connect()
        status, payload, headers = c.request("GET", "/healthz")
        c.close()
        for sock in held:
            sock.close()
        time.sleep(0.2)
        c = server.connect()
        after, _, _ = c.request("GET", "/healthz")
        c.close()
    assert (status, after) == (503, 200)
    assert headers["content-type"] == "application/json"
    assert payload["error"]["code"] == "overloaded"


@pytest.mark.parametrize(
    "bad",
    [{"header_timeout_s": 0}, {"body_timeout_s": -1}, {"keep_alive_s": 0}, {"max_connections": 0}],
)
def test_limits_are_checked(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        HttpLimits(**bad)
