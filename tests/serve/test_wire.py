"""The wire format: orjson answers equal to the old stdlib ones, top1 and binary answers,
error parity of the orjson fast path, and the HTTP parser / event loop in use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abkd_deploy.serve import Predictor, wire
from abkd_deploy.serve.errors import RequestError
from abkd_deploy.serve.limits import http_protocol, uvicorn_config
from abkd_deploy.serve.server import create_app
from abkd_deploy.serve.wire import (
    BINARY_HEADER,
    _checked,
    _stdlib_loads,
    decode_binary,
    parse_request,
)
from tests.serve.live_server import LiveServer

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 499, 0]
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=256)


@pytest.fixture(scope="module")
def live(predictor: Predictor):
    with LiveServer(create_app(predictor, max_batch=64, max_ids_per_request=32)) as server:
        yield server


@pytest.fixture
def client(live: LiveServer):
    c = live.connect()
    yield c
    c.close()


def _post(client, body: bytes, accept: str = "application/json") -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json", "Accept": accept}
    client.conn.request("POST", "/v1/predict", body=body, headers=headers)
    resp = client.conn.getresponse()
    return resp.status, resp.getheader("content-type", ""), resp.read()


def _old_body(predictor: Predictor, ids: list[int]) -> bytes:
    """What the server answered before orjson: stdlib json of ``tolist()`` (float64 digits)."""
    pred = predictor.predict(ids)
    return json.dumps(
        {"predictions": pred.classes.tolist(), "scores": pred.scores.tolist()}
    ).encode()


def test_json_answer_equals_the_old_one_at_float32_precision(client, predictor) -> None:
    status, ctype, raw = _post(client, json.dumps({"node_ids": IDS}).encode())
    assert status == 200 and ctype == "application/json"
    new, old = json.loads(raw), json.loads(_old_body(predictor, IDS))
    assert new["predictions"] == old["predictions"]
    want = predictor.predict(IDS).scores
    np.testing.assert_array_equal(np.array(new["scores"], dtype=np.float32), want)
    np.testing.assert_array_equal(
        np.array(new["scores"], dtype=np.float32), np.array(old["scores"], dtype=np.float32)
    )
    assert len(raw) < 0.8 * len(_old_body(predictor, IDS))


def test_scores_use_the_shortest_float32_decimal(client, predictor) -> None:
    _, _, raw = _post(client, json.dumps({"node_ids": IDS}).encode())
    scores_text = raw.split(b'"scores":', 1)[1]
    tokens = NUMBER.findall(scores_text)
    values = predictor.predict(IDS).scores.ravel()
    assert len(tokens) == values.size
    for token, value in zip(tokens, values, strict=True):
        shortest = str(np.float32(value))  # numpy: the shortest decimal that round-trips
        assert np.float32(float(token)) == value, (token, value)
        digits = len(re.sub(rb"[-.]|[eE].*", b"", token).lstrip(b"0"))
        want = len(re.sub(r"[-.]|[eE].*", "", shortest).lstrip("0"))
        assert digits <= want, (token, shortest)


def test_embeddings_match(client, predictor) -> None:
    body = json.dumps({"node_ids": IDS, "return_embedding": True}).encode()
    status, _, raw = _post(client, body)
    got = json.loads(raw)
    assert status == 200 and set(got) == {"predictions", "scores", "embeddings"}
    want = predictor.predict(IDS, return_embedding=True).embedding
    np.testing.assert_array_equal(np.array(got["embeddings"], dtype=np.float32), want)


def test_top1_has_predictions_only(client, predictor) -> None:
    status, _, raw = _post(client, json.dumps({"node_ids": IDS, "format": "top1"}).encode())
    assert status == 200 and json.loads(raw) == {
        "predictions": predictor.predict(IDS).classes.tolist()
    }
    body = json.dumps({"node_ids": IDS, "format": "top1", "return_embedding": True}).encode()
    assert set(json.loads(_post(client, body)[2])) == {"predictions", "embeddings"}


@pytest.mark.parametrize("fmt", ["TOP1", "binary", 1, None])
def test_unknown_format_is_422(client, fmt) -> None:
    status, ctype, raw = _post(client, json.dumps({"node_ids": [1], "format": fmt}).encode())
    assert (status, ctype) == (422, "application/json")
    assert json.loads(raw)["error"]["code"] == "invalid_request"
    assert "format must be one of ['full', 'top1']" in json.loads(raw)["error"]["message"]


def test_binary_answer(client, predictor) -> None:
    body = json.dumps({"node_ids": IDS, "return_embedding": True}).encode()
    status, ctype, raw = _post(client, body, accept="application/octet-stream")
    assert (status, ctype) == (200, "application/octet-stream")
    got = decode_binary(raw)
    want = predictor.predict(IDS, return_embedding=True)
    np.testing.assert_array_equal(got["predictions"], want.classes)
    np.testing.assert_array_equal(got["scores"], want.scores)
    np.testing.assert_array_equal(got["embeddings"], want.embedding)
    n, c, d = len(IDS), want.scores.shape[1], want.embedding.shape[1]
    assert len(raw) == BINARY_HEADER.size + 8 * n + 4 * n * (c + d)
    assert raw[:4] == b"ABKD"


def test_binary_top1_and_errors(client, predictor) -> None:
    body = json.dumps({"node_ids": IDS, "format": "top1"}).encode()
    _, _, raw = _post(client, body, accept="application/octet-stream")
    got = decode_binary(raw)
    assert set(got) == {"predictions"} and len(raw) == BINARY_HEADER.size + 8 * len(IDS)
    np.testing.assert_array_equal(got["predictions"], predictor.predict(IDS).classes)
    status, ctype, raw = _post(client, b'{"node_ids": [-1]}', accept="application/octet-stream")
    assert (status, ctype) == (422, "application/json")  # errors are always JSON
    assert json.loads(raw)["error"]["code"] == "invalid_node_ids"


@pytest.mark.parametrize(
    "body",
    [
        b'{"node_ids": [1e400]}',  # orjson refuses; json reads inf: 422, as before
        b'{"node_ids": [18446744073709551616, 3]}',  # orjson reads a float; json an int
        b'{"node_ids": [1], "return_embedding": 1e400}',
        b'{"node_ids": [1, "\\ud800"]}',  # lone surrogate: orjson refuses, json reads it
        b'{"node_ids": [NaN]}',
        b"\xef\xbb\xbf" + b'{"node_ids": [1, 2]}',  # UTF-8 BOM
        '{"node_ids": [7, 8]}'.encode("utf-16"),  # json.loads(bytes) detects UTF-16
        b'{"node_ids": [' + b"9" * 5000 + b"]}",
        b'{"node_ids": [2.0]}',
    ],
)
def test_errors_and_answers_are_those_of_stdlib_json(client, predictor, body: bytes) -> None:
    """The orjson fast path never changes an answer: same status and same body as the
    stdlib parser gives (the server re-parses with it whenever orjson or a check fails)."""
    try:
        req = _checked(_stdlib_loads(body), predictor.num_nodes, 32, predictor.has_embedding)
        want_status, want_error = 200, None
    except RequestError as exc:
        want_status, want_error = exc.http_status, {"code": exc.code, "message": str(exc)}
    status, _, raw = _post(client, body)
    assert status == want_status, raw
    if want_error is None:
        assert json.loads(raw)["predictions"] == predictor.predict(req.ids).classes.tolist()
    else:
        got = json.loads(raw)["error"]
        assert {k: got[k] for k in want_error} == want_error


def test_big_integer_is_reported_exactly(client) -> None:
    _, _, raw = _post(client, b'{"node_ids": [18446744073709551616, 3]}')
    error = json.loads(raw)["error"]
    assert error["values"] == [18446744073709551616] and "outside [0, 500)" in error["message"]


def test_fast_path_parses_like_stdlib() -> None:
    body = b'{"format": "top1", "node_ids": [0, 499, 7], "return_embedding": false}'
    req = parse_request(body, 500, 32, True)
    assert req.ids.dtype == np.int64 and req.ids.tolist() == [0, 499, 7]
    assert (req.format, req.return_embedding) == ("top1", False)


_PAYLOAD_IDS = st.lists(
    st.one_of(
        st.integers(-3, 520),
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.none(),
        st.text(max_size=2),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.fixed_dictionaries({"node_ids": _PAYLOAD_IDS}),
        st.fixed_dictionaries({"node_ids": st.lists(st.integers(0, 499), max_size=40)}),
        st.fixed_dictionaries(
            {"node_ids": st.lists(st.integers(0, 499), min_size=30, max_size=36)}
        ),
        st.fixed_dictionaries({"node_ids": _PAYLOAD_IDS | st.integers() | st.text()}),
        st.dictionaries(st.sampled_from(["node_ids", "format", "x"]), _PAYLOAD_IDS, max_size=2),
    )
)
def test_the_one_field_shortcut_answers_like_the_full_checks(payload: dict) -> None:
    """``{"node_ids": [...]}`` alone takes a shortcut past the field checks; every body
    gets the request or the error the full checks give (max 32 ids here)."""
    body = json.dumps(payload).encode()

    def outcome(shortcut: bool):
        saved = wire.fast_node_ids
        if not shortcut:
            wire.fast_node_ids = lambda values, num_nodes: None
        try:
            req = parse_request(body, 500, 32, True)
            return req.ids.dtype.name, req.ids.tolist(), req.format, req.return_embedding
        except RequestError as exc:
            return type(exc).__name__, str(exc), getattr(exc, "values", None)
        finally:
            wire.fast_node_ids = saved

    assert outcome(True) == outcome(False)


def test_decode_binary_refuses_other_bodies() -> None:
    with pytest.raises(ValueError, match="not an abkd binary answer"):
        decode_binary(b"x" * BINARY_HEADER.size)


def test_parser_and_loop_in_use(predictor) -> None:
    """httptools and uvloop (uvicorn[standard], a base dependency) are used when present."""
    pytest.importorskip("httptools")
    pytest.importorskip("uvloop")
    config = uvicorn_config(create_app(predictor, max_batch=8))
    assert config.http.__name__ == "BoundedHttpToolsProtocol" and config.loop == "uvloop"
    assert http_protocol("h11").__name__ == "BoundedH11Protocol"


def test_healthz_reports_pid_and_min_batch(predictor) -> None:
    import os

    app = create_app(predictor, max_batch=64, max_wait_ms=3, min_batch=4)
    with LiveServer(app) as server:
        c = server.connect()
        _, body, _ = c.request("GET", "/healthz")
        c.close()
    assert (body["pid"], body["min_batch"], body["max_wait_ms"]) == (os.getpid(), 4, 3)
