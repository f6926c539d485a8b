"""A real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread, and a client."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from typing import Any

import uvicorn

from abkd_deploy.serve.limits import HttpLimits, uvicorn_config
from abkd_deploy.serve.server import bind_socket


class LiveServer:
    """Runs ``app`` with uvicorn in a thread, configured like ``abkd-deploy serve``
    (:func:`uvicorn_config`); ``stop()`` is uvicorn's graceful shutdown."""

    def __init__(
        self,
        app: Any,
        graceful_s: float = 10.0,
        limits: HttpLimits | None = None,
        http: str = "auto",
    ) -> None:
        # bound like `abkd-deploy serve` (proto=IPPROTO_TCP, so asyncio sets TCP_NODELAY)
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        limits = limits or HttpLimits(graceful_timeout_s=graceful_s)
        config = uvicorn_config(app, port=self.port, limits=limits, log_level="warning", http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown (what uvicorn does on SIGTERM) and join."""
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.stop()

    def connect(self) -> Client:
        """A new keep-alive client connection."""
        return Client(self.port)


class _NoDelayConnection(http.client.HTTPConnection):
    """http.client sends headers and body in two writes: without TCP_NODELAY, Nagle and
    the server's delayed ACK add ~40 ms to every POST."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Client:
    """A minimal keep-alive HTTP/1.1 JSON client over http.client."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.conn = _NoDelayConnection("127.0.0.1", port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | str | Any = None, raw: bool = False
    ) -> tuple[int, Any, dict[str, str]]:
        """Sends a request (``body`` JSON-encoded unless ``raw``); returns status, body, headers."""
        data = None
        if body is not None:
            data = body if raw else json.dumps(body)
            data = data.encode() if isinstance(data, str) else data
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self._reopen_if_dropped()
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read()
        ctype = resp.getheader("content-type", "")
        payload = json.loads(text) if ctype.startswith("application/json") else text.decode()
        return resp.status, payload, dict(resp.getheaders())

    def _reopen_if_dropped(self) -> None:
        """Reconnects when the server has closed this idle keep-alive connection (its
        keep-alive or header timeout ran out between two requests), as HTTP clients such as
        urllib3 do; a connection dropped *during* a request still fails the caller."""
        sock = self.conn.sock
        if sock is None:
            return
        readable, _, _ = select.select([sock], [], [], 0)
        if readable and sock.recv(1, socket.MSG_PEEK) == b"":
            self.conn.close()

    def predict(self, node_ids: Any, **extra: Any) -> tuple[int, Any]:
        """POST /v1/predict."""
        status, payload, _ = self.request("POST", "/v1/predict", {"node_ids": node_ids, **extra})
        return status, payload

    def close(self) -> None:
        self.conn.close()
