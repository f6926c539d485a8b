"""HTTP API against a real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.server import create_app
from tests.serve.live_server import LiveServer


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=256)


@pytest.fixture(scope="module")
def live(predictor: Predictor):
    with LiveServer(
        create_app(predictor, max_batch=64, max_wait_ms=2, max_ids_per_request=32)
    ) as s:
        yield s


@pytest.fixture
def client(live: LiveServer):
    c = live.connect()
    yield c
    c.close()


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_predict(client, predictor: Predictor) -> None:
    status, body = client.predict([3, 1, 4, 1, 5])
    direct = predictor.predict([3, 1, 4, 1, 5])
    assert status == 200 and set(body) == {"predictions", "scores"}
    assert body["predictions"] == direct.classes.tolist()
    np.testing.assert_allclose(body["scores"], direct.scores, rtol=1e-6)


def test_predict_with_embedding(client, predictor: Predictor) -> None:
    status, body = client.predict([9, 2], return_embedding=True)
    assert status == 200
    np.testing.assert_allclose(body["embeddings"], predictor.predict([9, 2], True).embedding)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b"", 400, "malformed_json"),
        (b"\xff\xfe", 400, "malformed_json"),
        (b"[1, 2]", 422, "invalid_request"),
        (b'{"ids": [1]}', 422, "invalid_request"),
        (b'{"node_ids": [1], "return_embedding": "yes"}', 422, "invalid_request"),
        (b'{"node_ids": []}', 422, "invalid_node_ids"),
        (b'{"node_ids": "1,2"}', 422, "invalid_node_ids"),
        (b'{"node_ids": [1, 2.5, "x", null]}', 422, "invalid_node_ids"),
        (b'{"node_ids": [1, -3, 500, 7]}', 422, "invalid_node_ids"),
        (b'{"node_ids": [' + b",".join(b"1" for _ in range(33)) + b"]}", 413, "too_many_ids"),
    ],
)
def test_errors(client, body: bytes, status: int, code: str) -> None:
    got, payload, _ = client.request("POST", "/v1/predict", body, raw=True)
    assert got == status, payload
    assert payload["error"]["code"] == code
    assert payload["error"]["message"]
    # the same keep-alive connection still answers good requests
    assert client.predict([0])[0] == 200


def test_error_details(client) -> None:
    _, body = client.predict([1, -3, 500, 7])
    assert body["error"]["values"] == [-3, 500]
    assert "outside [0, 500)" in body["error"]["message"]
    _, body = client.predict([1, 2.5, "x"])
    assert body["error"]["values"] == [2.5, "x"]
    _, body = client.predict(list(range(40)))
    assert (body["error"]["size"], body["error"]["limit"]) == (40, 32)


def test_body_too_large(live: LiveServer) -> None:
    c = live.connect()
    status, payload, _ = c.request("POST", "/v1/predict", b" " * 200_000, raw=True)
    assert status == 413 and payload["error"]["code"] == "too_large"
    c.close()


def test_healthz_and_methods(client) -> None:
    status, body, _ = client.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["provider"] == "CPUExecutionProvider" and body["num_nodes"] == 500
    assert (body["max_batch"], body["max_ids_per_request"]) == (64, 32)
    assert client.request("GET", "/v1/predict")[0] == 405


def test_metrics(live: LiveServer) -> None:
    c = live.connect()
    _, before, headers = c.request("GET", "/metrics")
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    c.predict([1, 2, 3])
    c.predict([-1])
    c.request("POST", "/v1/predict", b"{", raw=True)
    _, after, _ = c.request("GET", "/metrics")
    c.close()

    def delta(series: str) -> float:
        return _metric(after, series) - _metric(before, series)

    assert delta('abkd_serve_requests_total{code="200"}') == 1
    assert delta('abkd_serve_requests_total{code="422"}') == 1
    assert delta('abkd_serve_errors_total{code="422",reason="invalid_node_ids"}') == 1
    assert delta('abkd_serve_errors_total{code="400",reason="malformed_json"}') == 1
    assert delta("abkd_serve_node_ids_total") == 3
    assert delta("abkd_serve_batch_size_count") == 1
    assert delta("abkd_serve_request_latency_seconds_count") == 3
    assert 'abkd_serve_info{format="embedded",provider="CPUExecutionProvider"} 1.0' in after
    assert "# TYPE abkd_serve_batch_size histogram" in after


def test_create_app_limits(predictor: Predictor) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        create_app(predictor, max_batch=10_000)
    with pytest.raises(ConfigError, match="max_ids_per_request"):
        create_app(predictor, max_batch=8, max_ids_per_request=9)


def test_graceful_shutdown_finishes_in_flight(predictor: Predictor) -> None:
    """Requests waiting in the batcher when shutdown starts still get their answers."""
    # min_batch=64: the eight 2-id requests wait (up to 1.5 s) for more company
    app = create_app(predictor, max_batch=64, max_wait_ms=1500, min_batch=64)
    server = LiveServer(app).__enter__()
    results: dict[int, tuple[int, object]] = {}

    def call(i: int) -> None:
        c = server.connect()
        results[i] = c.predict([i, i + 1])
        c.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.2
    while app.state.batcher.queued < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.batcher.queued == 8  # all eight wait for their micro-batch
    server.stop()
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(8))
    for i, (status, body) in results.items():
        assert status == 200, body
        assert body["predictions"] == predictor.predict([i, i + 1]).classes.tolist()
    assert app.state.batcher.closed
