"""Classes and scores from logits in onnxruntime equal numpy's argmax and stable softmax."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from abkd_deploy.serve.postprocess import (
    ANSWERS,
    folder_option_supported,
    make_postprocess,
    with_answers,
)
from tests.serve.tiny_export import softmax


def test_matches_numpy_including_ties_and_huge_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(65, 7)).astype(np.float32) * 5
    logits[0] = 3.0  # a tie everywhere: the first class, as numpy picks it
    logits[1, 2:4] = 1e4  # exp() would overflow without the max shift
    logits[2] = -1e4
    classes, scores = make_postprocess(7)(logits)
    assert classes.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))
    np.testing.assert_allclose(scores, softmax(logits.copy()), rtol=1e-6, atol=3e-7)
    assert np.isfinite(scores).all() and scores[1, 2] == scores[1, 3] == 0.5


def test_any_batch_size() -> None:
    post = make_postprocess(3)
    for n in (1, 2, 1024):
        logits = np.arange(n * 3, dtype=np.float32).reshape(n, 3) % 5
        classes, scores = post(logits)
        assert classes.shape == (n,) and scores.shape == (n, 3)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)


def test_folder_option_version_check() -> None:
    assert not folder_option_supported("1.18.0") and not folder_option_supported("1.20.1")
    assert folder_option_supported("1.21.0") and folder_option_supported("1.32.0")
    assert folder_option_supported("2.0.0rc1") and folder_option_supported("1.22.0.dev20250101")


def _logits_model(elem_type: int, extra_output: str | None = None) -> onnx.ModelProto:
    """``x [B, 4] float`` -> ``logits`` of ``elem_type`` (a Cast), optionally another output."""
    nodes = [helper.make_node("Cast", ["x"], ["logits"], to=elem_type)]
    outputs = [helper.make_tensor_value_info("logits", elem_type, ["batch", 4])]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["x"], [extra_output]))
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], outputs
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_with_answers_adds_what_make_postprocess_computes(tmp_path, elem_type: int) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_logits_model(elem_type), path)
    fused = ort.InferenceSession(with_answers(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32) * 5
    x[3] = [1, 1, 1, 1]  # a tie
    logits, classes, scores = fused.run(["logits", *ANSWERS], {"x": x})
    want_classes, want_scores = make_postprocess(4)(logits.astype(np.float32))
    np.testing.assert_array_equal(classes, want_classes)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-7)


def test_with_answers_leaves_models_it_cannot_extend(tmp_path) -> None:
    no_logits = _logits_model(TensorProto.FLOAT)
    no_logits.graph.output[0].name = "out"
    no_logits.graph.node[0].output[0] = "out"
    taken = _logits_model(TensorProto.FLOAT, extra_output=ANSWERS[1])
    for i, model in enumerate([no_logits, taken]):
        onnx.save(model, tmp_path / f"{i}.onnx")
        assert with_answers(tmp_path / f"{i}.onnx") is None
