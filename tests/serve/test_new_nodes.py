"""Answers for new nodes: Predictor (``nodes``, mixed with ``node_ids``) and HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from abkd_deploy.export import export
from abkd_deploy.serve import InvalidInput, Predictor
from abkd_deploy.serve.new_nodes import InvalidNewNodes
from abkd_deploy.serve.server import create_app
from tests.export.conftest import make_run
from tests.serve.live_server import LiveServer


@pytest.fixture(scope="module")
def new_node_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run(tmp_path_factory.mktemp("run"), "sage", epochs=5)
    out = tmp_path_factory.mktemp("exp") / "sage"
    export(run, out, fanouts="4,4", progress=False)
    return out


@pytest.fixture(scope="module")
def predictor(new_node_export: Path) -> Predictor:
    return Predictor(new_node_export, device="cpu", threads=1, max_batch=64)


def _nodes(width: int, n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    nbrs = [[], [1, 2], [5, 6, 7, 8]]
    return [
        {"features": rng.normal(size=width).round(4).tolist(), "neighbors": nbrs[i % 3]}
        for i in range(n)
    ]


def _width(predictor: Predictor) -> int:
    return predictor.info()["new_nodes"]["feature_width"]


def test_new_nodes_match_the_new_node_graph(predictor, new_node_export) -> None:
    nodes = _nodes(_width(predictor))
    pred = predictor.predict(nodes=nodes, return_embedding=True)
    sess = ort.InferenceSession(str(new_node_export / "new_nodes.onnx"))
    x = np.array([n["features"] for n in nodes], dtype=np.float32)
    nbr = np.full((3, 4), -1, dtype=np.int64)
    for i, n in enumerate(nodes):
        nbr[i, : len(n["neighbors"])] = n["neighbors"]
    logits, emb = sess.run(None, {"features": x, "neighbors": nbr})
    np.testing.assert_array_equal(pred.classes, logits.argmax(1))
    np.testing.assert_allclose(pred.embedding, emb, rtol=1e-5, atol=1e-6)
    assert np.allclose(pred.scores.sum(1), 1.0, atol=1e-5)


def test_mixed_request_answers_ids_first(predictor) -> None:
    nodes = _nodes(_width(predictor), 2)
    mixed = predictor.predict([3, 9], nodes=nodes)
    ids, new = predictor.predict([3, 9]), predictor.predict(nodes=nodes)
    np.testing.assert_array_equal(mixed.classes, np.concatenate([ids.classes, new.classes]))
    np.testing.assert_allclose(mixed.scores, np.concatenate([ids.scores, new.scores]), atol=1e-6)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda n: n[0].update(features=n[0]["features"][:-1]), "features"),
        (lambda n: n[1].update(neighbors=[1, 10**9]), "neighbors"),
        (lambda n: n[1].update(neighbors=[1, 1]), "neighbors"),
        (lambda n: n[1].update(neighbors=list(range(5))), "at most 4"),
        (lambda n: n[0].update(features=[float("nan")] * len(n[0]["features"])), "features"),
        (lambda n: n[0].pop("neighbors"), "neighbors"),
    ],
)
def test_bad_new_nodes_are_refused(predictor, change, words) -> None:
    nodes = _nodes(_width(predictor))
    change(nodes)
    with pytest.raises(InvalidNewNodes, match=words):
        predictor.predict(nodes=nodes)


def test_export_without_new_node_graph_refuses_nodes(embedded_dir) -> None:
    p = Predictor(embedded_dir, device="cpu", threads=1)
    with pytest.raises(InvalidInput, match="new"):
        p.predict(nodes=[{"features": [0.0], "neighbors": []}])


def test_http_mixed_request_and_422(predictor) -> None:
    nodes = _nodes(_width(predictor), 2)
    with LiveServer(create_app(predictor, max_batch=64, max_wait_ms=2)) as live:
        client = live.connect()
        status, body = client.predict([4], nodes=nodes)
        assert status == 200, body
        direct = predictor.predict([4], nodes=nodes)
        assert body["predictions"] == direct.classes.tolist()
        bad = json.dumps({"node_ids": [4], "nodes": [{"features": [1.0], "neighbors": []}]})
        got, payload, _ = client.request("POST", "/v1/predict", bad.encode(), raw=True)
        assert got == 422 and payload["error"]["code"] == "invalid_nodes"
        assert client.predict([0])[0] == 200
        client.close()


def test_whole_batch_check_equals_the_node_by_node_walk() -> None:
    """The numpy fast path of as_new_nodes gives what the per-node walk gives, and leaves
    every malformed batch to the walk (which names the problem)."""
    from abkd_deploy.serve.new_nodes import NewNodeLimits, _checked_at_once, as_new_nodes

    rng = np.random.default_rng(3)
    limits = NewNodeLimits(feature_width=4, max_neighbors=3, num_nodes=50)
    nodes = [
        {
            "features": rng.normal(size=4).tolist(),
            "neighbors": rng.choice(50, int(rng.integers(0, 4)), replace=False).tolist(),
        }
        for _ in range(20)
    ]
    fast = _checked_at_once(nodes, limits)
    assert fast is not None
    walked = as_new_nodes([{**n, "features": tuple(n["features"])} for n in nodes], limits)
    np.testing.assert_array_equal(fast.features, walked.features)
    np.testing.assert_array_equal(fast.neighbors, walked.neighbors)
    bad = [
        {"features": [1.0, 2.0, True, 3.0], "neighbors": []},
        {"features": [1.0, 2.0, float("nan"), 3.0], "neighbors": []},
        {"features": [1.0, 2.0, 3.0], "neighbors": []},
        {"features": [1.0, 2.0, 3.0, 4.0], "neighbors": [1, 1]},
        {"features": [1.0, 2.0, 3.0, 4.0], "neighbors": [50]},
        {"features": [1.0, 2.0, 3.0, 4.0], "neighbors": [1, 2, 3, 4]},
        {"features": [1.0, 2.0, 3.0, 4.0], "neighbors": [2**70]},
        {"features": [1.0, 2.0, 3.0, 4.0], "neighbors": [], "x": 1},
    ]
    for node in bad:
        assert _checked_at_once([nodes[0], node], limits) is None
        with pytest.raises(InvalidNewNodes, match=r"nodes\[1\]"):
            as_new_nodes([nodes[0], node], limits)
