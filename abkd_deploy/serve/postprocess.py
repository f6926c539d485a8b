"""Classes and scores from logits in onnxruntime: a two-node graph (ArgMax, Softmax).

On a serving batch the numpy softmax and argmax cost more than their arithmetic: five
ufunc calls, each with a fixed cost that grows right after a model run, whose table
Gathers have evicted numpy from the caches (37 us for 64 x 5 logits against 17 us when
timed alone; docs/BENCHMARKS.md). One run of this small session does both in one call
(2-node graph, 1 thread, no spinning): measured 8 / 17 / 85 us less than numpy at batch
1 / 64 / 1024. Scores match numpy's stable softmax within 2e-7; argmax ties go to the
first index in both.

An ``embedded`` model goes one step further (:func:`with_answers`): the same two nodes are
appended to its own graph, so one run of the model session returns classes and scores,
without a second session call and its fixed cost (64 ids: 56 us against 48 + 23 us for
the two runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

#: The outputs :func:`with_answers` adds to a model: classes and scores of ``logits``.
ANSWERS = ("abkd_classes", "abkd_scores")
#: The first onnxruntime that reads a model given as bytes with its external data in a
#: folder (``session.model_external_initializers_file_folder_path``); older ones must load
#: the file itself (and would resolve the data file against the working directory).
FOLDER_OPTION_SINCE = (1, 21)

#: ``logits [B, C] float32 -> (classes [B] int64, scores [B, C] float32)``.
Postprocess = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def postprocess_model(num_classes: int) -> bytes:
    """The serialized graph: ``logits [batch, C]`` -> ``classes [batch]``, ``scores``."""
    graph = helper.make_graph(
        answer_nodes("logits", "classes", "scores"),
        "abkd_postprocess",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        [
            helper.make_tensor_value_info("classes", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", num_classes]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by every onnxruntime the package supports
    return model.SerializeToString()


def answer_nodes(logits: str, classes: str, scores: str) -> list[onnx.NodeProto]:
    """ArgMax and Softmax over the last axis of ``logits``."""
    return [
        helper.make_node("ArgMax", [logits], [classes], axis=-1, keepdims=0),
        helper.make_node("Softmax", [logits], [scores], axis=-1),
    ]


def folder_option_supported(version: str = ort.__version__) -> bool:
    """Whether this onnxruntime can load :func:`with_answers`' bytes with external data."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= FOLDER_OPTION_SINCE


def with_answers(model_path: str | Path) -> bytes | None:
    """``model_path``'s graph (external data left where it is) with :data:`ANSWERS` added:
    classes and scores of its ``logits`` output, computed in the model's own run.

    Returns ``None`` where the model has no ``logits`` output or already uses those names.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    names = {o.name for o in graph.output}
    used = names | {v for n in graph.node for v in n.output} | {i.name for i in graph.input}
    if "logits" not in names or used & set(ANSWERS):
        return None
    logits = next(o for o in graph.output if o.name == "logits")
    source = "logits"
    if logits.type.tensor_type.elem_type != TensorProto.FLOAT:  # as make_postprocess's input
        source = "abkd_logits_float"
        if source in used:
            return None
        graph.node.append(helper.make_node("Cast", ["logits"], [source], to=TensorProto.FLOAT))
    graph.node.extend(answer_nodes(source, *ANSWERS))
    graph.output.extend(
        [
            helper.make_tensor_value_info(ANSWERS[0], TensorProto.INT64, None),
            helper.make_tensor_value_info(ANSWERS[1], TensorProto.FLOAT, None),
        ]
    )
    return model.SerializeToString()


def make_postprocess(num_classes: int) -> Postprocess:
    """A CPU session of :func:`postprocess_model`, as a function of the logits."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        postprocess_model(num_classes), opts, providers=["CPUExecutionProvider"]
    )
    names = ["classes", "scores"]

    def postprocess(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        classes, scores = session.run(names, {"logits": logits})
        return classes, scores

    return postprocess
