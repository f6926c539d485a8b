"""Serving and benching a typed (rgcn) export: target-type ids in (issue 11, item 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.export import export
from abkd_deploy.models import build_model, load_model, save_model
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.bench import MODELS, bench
from abkd_deploy.serve.errors import InvalidNodeIds
from abkd_deploy.serve.server import create_app
from tests.export.conftest import TYPED_DATASET, make_typed_run
from tests.serve.live_server import LiveServer


@pytest.fixture(scope="module")
def data():
    return load_dataset(TYPED_DATASET)


@pytest.fixture(scope="module")
def typed_export(tmp_path_factory, data) -> dict[str, Path]:
    """An rgcn student (with an untrained 3-layer rgcn teacher beside it) exported exactly."""
    root = tmp_path_factory.mktemp("typed_serve")
    run = make_typed_run(root / "run", "rgcn")
    torch.manual_seed(1)
    teacher = build_model(
        "rgcn", hidden=16, out_channels=data.num_classes, num_layers=3, schema=data.schema()
    )
    extra = {"dataset": {"name": TYPED_DATASET, "root": None, "split": None}}
    save_model(teacher.eval(), run, "teacher", extra=extra)
    export(run, root / "export", fanouts="max", progress=False)
    return {"run": run, "export": root / "export"}


@pytest.fixture(scope="module")
def full_graph(typed_export, data) -> tuple[np.ndarray, np.ndarray]:
    student = load_model(typed_export["run"], "student")[0].eval()
    with torch.no_grad():
        logits, hiddens = student(student.inputs(data), TypedBlock.full_graph(data, student.norm))
    return logits.numpy(), hiddens[-2].numpy()


@pytest.fixture(scope="module")
def predictor(typed_export) -> Predictor:
    return Predictor(typed_export["export"], device="cpu", threads=1, max_batch=256)


def test_predictor_answers_target_type_ids(predictor, full_graph, data):
    logits, hidden = full_graph
    assert predictor.num_nodes == data.num_target_nodes < data.num_nodes_dict["author"]
    ids = np.array([0, 17, 17, data.num_target_nodes - 1, 3])
    pred = predictor.predict(ids, return_embedding=True)
    assert np.array_equal(pred.classes, logits[ids].argmax(1))
    assert np.allclose(pred.embedding, hidden[ids], atol=1e-5)
    expected = np.exp(logits[ids] - logits[ids].max(1, keepdims=True))
    assert np.allclose(pred.scores, expected / expected.sum(1, keepdims=True), atol=1e-5)
    with pytest.raises(InvalidNodeIds):  # an author id, not a paper id
        predictor.predict([data.num_target_nodes])


def test_http_answers_target_type_ids(predictor, data):
    app = create_app(predictor, max_batch=64, max_wait_ms=2, max_ids_per_request=32)
    with LiveServer(app) as live:
        client = live.connect()
        try:
            status, body = client.predict([5, 1, 5], return_embedding=True)
            direct = predictor.predict([5, 1, 5], True)
            assert status == 200
            assert body["predictions"] == direct.classes.tolist()
            np.testing.assert_allclose(body["scores"], direct.scores, rtol=1e-6)
            np.testing.assert_allclose(body["embeddings"], direct.embedding, rtol=1e-6)
            status, body = client.predict([1, data.num_target_nodes])
            assert status == 422 and body["error"]["code"] == "invalid_node_ids"
        finally:
            client.close()


def test_bench_teacher_and_student_on_a_typed_export(typed_export, data):
    report = bench(
        typed_export["export"],
        batch_sizes=(1, 8),
        requests=3,
        warmup=1,
        trials=2,
        threads=1,
        progress=False,
    )
    assert {(r["model"], r["batch_size"]) for r in report["results"]} == {
        (m, b) for m in MODELS for b in (1, 8)
    }
    acc = {m: s["accuracy"] for m, s in report["models"].items()}
    # fanout max: sampled PyTorch student, eager export module and ONNX model agree exactly
    assert acc["student-onnx"] == acc["student-torch-export"] == acc["student-torch"]
    assert 0.0 <= acc["teacher-torch"] <= 1.0
    assert report["models"]["student-onnx"]["torch_imported"] is False
