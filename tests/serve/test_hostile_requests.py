"""Hostile request bodies: never a 5xx, always a JSON error, metrics = statuses really sent.

The fuzz tests post hypothesis-generated JSON documents (NaN/Infinity included) and raw
bytes to a real uvicorn server configured like ``abkd-deploy serve``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abkd_deploy.serve import Predictor
from abkd_deploy.serve.server import create_app
from tests.serve.live_server import Client, LiveServer

MAX_IDS = 32
VALID = [3, 1, 4, 1, 5, 499]
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=256)


@pytest.fixture(scope="module")
def live(predictor: Predictor):
    app = create_app(predictor, max_batch=64, max_wait_ms=1, max_ids_per_request=MAX_IDS)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer):
    c = live.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def sent() -> Counter:
    """Statuses the fuzz tests received, to compare with /metrics at the end."""
    return Counter()


def _metrics(client: Client) -> dict[str, float]:
    _, text, _ = client.request("GET", "/metrics")
    out = {}
    for line in text.splitlines():
        if line.startswith("abkd_serve_requests_total{"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _post(client: Client, body: bytes) -> tuple[int, object]:
    status, payload, headers = client.request("POST", "/v1/predict", body, raw=True)
    assert status < 500, (body[:200], status, payload)
    assert headers.get("content-type", "").startswith("application/json"), (body[:200], headers)
    if status >= 400:
        assert isinstance(payload, dict) and set(payload) == {"error"}, payload
        assert payload["error"]["code"] and payload["error"]["message"], payload
        json.dumps(payload, allow_nan=False)  # what the server sent was strict JSON
    return status, payload


def _check_answer(status: int, payload: object, ids: object, predictor: Predictor) -> None:
    if status == 200:
        want = predictor.predict(ids)
        assert payload["predictions"] == want.classes.tolist()


def _still_healthy(client: Client, predictor: Predictor, reference: dict) -> None:
    status, body = client.predict(VALID)
    assert status == 200 and body == reference, body


@pytest.fixture(scope="module")
def reference(client: Client) -> dict:
    status, body = client.predict(VALID)
    assert status == 200
    return body


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
requests = st.fixed_dictionaries(
    {"node_ids": st.lists(scalars | st.integers(0, 499), max_size=MAX_IDS + 4) | documents},
    optional={"return_embedding": documents, "extra": documents},
)


@FUZZ
@given(doc=requests | documents)
def test_fuzz_json_documents(client, predictor, reference, sent, doc) -> None:
    body = json.dumps(doc, allow_nan=True).encode()  # NaN / Infinity / -Infinity included
    status, payload = _post(client, body)
    sent[status] += 1
    if status == 200:
        _check_answer(status, payload, doc["node_ids"], predictor)
    _still_healthy(client, predictor, reference)
    sent[200] += 1


@FUZZ
@given(
    raw=st.binary(max_size=600)
    | st.builds(
        lambda prefix, junk, suffix: prefix + junk + suffix,
        st.sampled_from([b'{"node_ids": [', b'{"node_ids": ', b"[", b"{", b""]),
        st.binary(max_size=200),
        st.sampled_from([b"]}", b"}", b"", b"\x00"]),
    )
)
def test_fuzz_raw_bytes(client, predictor, reference, sent, raw) -> None:
    status, _ = _post(client, raw)
    sent[status] += 1
    _still_healthy(client, predictor, reference)
    sent[200] += 1


def test_metrics_count_what_was_sent(client, sent) -> None:
    """Runs after the fuzz tests (file order): /metrics agrees with what clients received."""
    metrics = _metrics(client)
    assert sum(sent.values()) > 400
    for status, n in sent.items():
        assert metrics.get(f'abkd_serve_requests_total{{code="{status}"}}', 0) >= n
    assert not [k for k in metrics if '"5' in k], metrics
    status, health, _ = client.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["queued"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"node_ids": [NaN]}', 400, "malformed_json"),
        (b'{"node_ids": [1, Infinity]}', 400, "malformed_json"),
        (b'{"node_ids": -Infinity}', 400, "malformed_json"),
        (b'{"node_ids": [1e400]}', 422, "invalid_node_ids"),  # valid JSON, parses to inf
        (b'{"node_ids": [[1, 2], {"a": 1e999}]}', 422, "invalid_node_ids"),
        (b'{"node_ids": ["' + b"x" * 5000 + b'"]}', 422, "invalid_node_ids"),
        (b'{"node_ids": [1, "\\ud800"]}', 422, "invalid_node_ids"),  # lone surrogate, echoed
        (b'{"node_ids": [1], "\\udfff": 2}', 422, "invalid_request"),
        (b'{"node_ids": [1], "return_embedding": 1e400}', 422, "invalid_request"),
        (b'{"node_ids": [' + b"9" * 5000 + b"]}", 400, "malformed_json"),  # > int digit limit
        (b"[" * 100_000 + b"]" * 100_000, 413, "too_large"),
        (b"[" * 2500 + b"]" * 2500, 400, "malformed_json"),  # deeper than the parser goes
    ],
)
def test_non_finite_and_odd_values(live, body: bytes, status: int, code: str) -> None:
    c = live.connect()
    before = _metrics(c)
    got, payload = _post(c, body)
    after = _metrics(c)
    c.close()
    assert (got, payload["error"]["code"]) == (status, code), payload
    key = f'abkd_serve_requests_total{{code="{status}"}}'
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 1  # counted once, with that status


def test_unknown_path_and_method_are_json(client) -> None:
    status, payload, _ = client.request("GET", "/nope")
    assert status == 404 and payload["error"]["code"] == "not_found"
    status, payload, _ = client.request("GET", "/v1/predict")
    assert status == 405 and payload["error"]["code"] == "method_not_allowed"


def test_internal_error_is_json_500_and_counted(embedded_dir: Path) -> None:
    predictor = Predictor(embedded_dir, device="cpu", threads=1)

    def broken(ids, return_embedding=False):
        raise RuntimeError("boom")

    predictor.predict_ids = broken  # type: ignore[method-assign]
    with LiveServer(create_app(predictor, max_batch=64)) as server:
        c = server.connect()
        status, payload, headers = c.request("POST", "/v1/predict", {"node_ids": [1]})
        metrics = _metrics(c)
        c.close()
    assert status == 500 and headers["content-type"] == "application/json"
    assert payload["error"] == {"code": "internal", "message": "internal error: RuntimeError"}
    assert metrics == {'abkd_serve_requests_total{code="500"}': 1.0}


def test_valid_answers_unchanged(client, predictor) -> None:
    ids = np.arange(0, 500, 17)[:MAX_IDS].tolist()
    status, body = client.predict(ids)
    assert status == 200
    assert body["predictions"] == predictor.predict(ids).classes.tolist()
