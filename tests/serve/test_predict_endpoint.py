"""The ``POST /v1/predict`` hot path called as a plain ASGI app (no sockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from abkd_deploy.serve import Predictor
from abkd_deploy.serve.errors import RequestTimeout
from abkd_deploy.serve.predict_endpoint import receive_body
from abkd_deploy.serve.server import create_app
from abkd_deploy.serve.wire import BadRequest


def _receiver(messages: list[dict[str, Any]]):
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # the client sends nothing more
        raise AssertionError("unreachable")

    return receive


def _chunks(*parts: bytes) -> list[dict[str, Any]]:
    last = len(parts) - 1
    return [{"type": "http.request", "body": p, "more_body": i < last} for i, p in enumerate(parts)]


def test_receive_body_joins_chunks_and_enforces_limits() -> None:
    got = asyncio.run(receive_body(_receiver(_chunks(b'{"a":', b" 1", b"}")), None, 100, 1.0))
    assert got == b'{"a": 1}'
    with pytest.raises(BadRequest, match="body has 500 bytes; at most 100") as refused:
        asyncio.run(receive_body(_receiver([]), b"500", 100, 1.0))  # refused unread
    assert refused.value.http_status == 413
    with pytest.raises(BadRequest, match="body exceeds 8 bytes"):
        asyncio.run(receive_body(_receiver(_chunks(b"12345", b"67890")), None, 8, 1.0))
    with pytest.raises(RequestTimeout, match="did not arrive within 0.05 s"):
        asyncio.run(receive_body(_receiver(_chunks(b"1", b"2")[:1]), None, 100, 0.05))
    with pytest.raises(ClientDisconnect):
        asyncio.run(receive_body(_receiver([{"type": "http.disconnect"}]), None, 100, 1.0))


def _call(app: Any, messages: list[dict[str, Any]], headers: list | None = None) -> list[dict]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/predict",
        "headers": headers or [(b"content-type", b"application/json")],
    }
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, _receiver(messages), send)

    asyncio.run(main())
    return sent


def _requests_total(app: Any) -> dict[str, float]:
    out = {}
    for line in app.state.metrics.render().splitlines():
        if line.startswith("abkd_serve_requests_total{"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_answers_like_the_predictor_and_counts_once(embedded_dir: Path) -> None:
    predictor = Predictor(embedded_dir, device="cpu", threads=1)
    app = create_app(predictor, max_batch=64)
    sent = _call(app, _chunks(b'{"node_ids": [3, 1, ', b"4]}"))
    start, body = sent
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    answer = json.loads(body["body"])
    assert answer["predictions"] == predictor.predict([3, 1, 4]).classes.tolist()
    assert _requests_total(app) == {'abkd_serve_requests_total{code="200"}': 1.0}
    assert app.state.tally.in_flight == 0


def test_binary_accept_header_gets_the_binary_body(embedded_dir: Path) -> None:
    app = create_app(Predictor(embedded_dir, device="cpu", threads=1), max_batch=64)
    headers = [(b"accept", b"Application/Octet-Stream"), (b"content-length", b"17")]
    start, body = _call(app, _chunks(b'{"node_ids": [2]}'), headers)
    assert dict(start["headers"])[b"content-type"] == b"application/octet-stream"
    assert body["body"][:4] == b"ABKD"


def test_client_gone_before_its_body_gets_nothing_and_is_counted(embedded_dir: Path) -> None:
    app = create_app(Predictor(embedded_dir, device="cpu", threads=1), max_batch=64)
    sent = _call(app, [{"type": "http.disconnect"}])
    assert sent == []  # nobody to answer
    assert _requests_total(app) == {'abkd_serve_requests_total{code="499"}': 1.0}
    assert 'reason="client_disconnected"' in app.state.metrics.render()


@pytest.mark.parametrize(("open_requests", "inline"), [(1, True), (3, False)])
def test_a_small_request_runs_inline_only_when_no_other_is_open(
    embedded_dir: Path, monkeypatch: pytest.MonkeyPatch, open_requests: int, inline: bool
) -> None:
    """Other requests parsed by the server (their tasks not started yet) keep a request off
    the event loop: it goes to the batcher's worker, which batches them together. The
    batch metrics are recorded either way (inline: once the answer is out)."""
    import threading

    from abkd_deploy.serve import server

    predictor = Predictor(embedded_dir, device="cpu", threads=1)
    threads: list[str] = []
    predict_ids = predictor.predict_ids

    def recording(ids, return_embedding=False):
        threads.append(threading.current_thread().name)
        return predict_ids(ids, return_embedding)

    predictor.predict_ids = recording
    monkeypatch.setattr(server, "open_requests", lambda: open_requests)
    app = create_app(predictor, max_batch=64)
    start, _ = _call(app, _chunks(b'{"node_ids": [5, 6]}'))
    assert start["status"] == 200
    assert threads == ["MainThread" if inline else "micro-batcher"]
    assert "abkd_serve_batch_size_count 1.0" in app.state.metrics.render()
