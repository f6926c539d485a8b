"""A real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread, and a client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import uvicorn


class LiveServer:
    """Runs ``app`` with uvicorn in a thread; ``stop()`` is uvicorn's graceful shutdown."""

    def __init__(self, app: Any, graceful_s: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=graceful_s
        )
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


class Client:
    """A minimal keep-alive HTTP/1.1 JSON client over http.client."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | str | Any = None, raw: bool = False
    ) -> tuple[int, Any, dict[str, str]]:
        """Sends a request (``body`` JSON-encoded unless ``raw``); returns status, body, headers."""
        data = None
        if body is not None:
            data = body if raw else json.dumps(body)
            data = data.encode() if isinstance(data, str) else data
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read()
        ctype = resp.getheader("content-type", "")
        payload = json.loads(text) if ctype.startswith("application/json") else text.decode()
        return resp.status, payload, dict(resp.getheaders())

    def predict(self, node_ids: Any, **extra: Any) -> tuple[int, Any]:
        """POST /v1/predict."""
        status, payload, _ = self.request("POST", "/v1/predict", {"node_ids": node_ids, **extra})
        return status, payload

    def close(self) -> None:
        self.conn.close()
