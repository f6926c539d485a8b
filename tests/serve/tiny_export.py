"""Builds tiny export directories (docs/FORMATS.md) with onnx.helper, without torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from abkd_deploy.manifest import METADATA_KEY

OPSET = 18


def softmax(logits: np.ndarray) -> np.ndarray:
    """Reference row-wise, numerically stable softmax (float32 in, float32 out)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


@dataclass
class TinyModel:
    """Weights of a tiny embedded-style model and a numpy reference forward."""

    features: np.ndarray  # [N, F]
    w1: np.ndarray  # [F, H]
    w2: np.ndarray  # [H, C]

    def forward(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(logits, embedding)`` for node ids."""
        emb = np.maximum(self.features[ids] @ self.w1, 0)
        return emb @ self.w2, emb


def make_tiny(
    num_nodes: int = 500, features: int = 8, hidden: int = 6, classes: int = 4, seed: int = 0
) -> TinyModel:
    """Random weights; logits are spread so that argmax ties are practically impossible."""
    rng = np.random.default_rng(seed)
    return TinyModel(
        rng.normal(size=(num_nodes, features)).astype(np.float32),
        rng.normal(size=(features, hidden)).astype(np.float32),
        rng.normal(size=(hidden, classes)).astype(np.float32),
    )


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tiny"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def embedded_onnx(tiny: TinyModel) -> onnx.ModelProto:
    """``node_ids`` [batch] -> Gather features -> MatMul -> Relu (embedding) -> MatMul (logits)."""
    h, c = tiny.w2.shape
    nodes = [
        helper.make_node("Gather", ["features", "node_ids"], ["x"], axis=0),
        helper.make_node("MatMul", ["x", "w1"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedded",
        [helper.make_tensor_value_info("node_ids", TensorProto.INT64, ["batch"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", h]),
        ],
        initializer=[
            numpy_helper.from_array(tiny.features, "features"),
            numpy_helper.from_array(tiny.w1, "w1"),
            numpy_helper.from_array(tiny.w2, "w2"),
        ],
    )
    return _model(graph)


def ell_onnx(w: np.ndarray) -> onnx.ModelProto:
    """One ELL layer: ``logits = (sum_k weight_1[:, k] * x[nbr_1[:, k]]) @ w``."""
    f, c = w.shape
    nodes = [
        helper.make_node("Gather", ["x", "nbr_1"], ["g"], axis=0),  # [n1, K, F]
        helper.make_node("Unsqueeze", ["weight_1", "axis_m1"], ["wk"]),  # [n1, K, 1]
        helper.make_node("Mul", ["g", "wk"], ["gw"]),
        helper.make_node("ReduceSum", ["gw", "axis_1"], ["agg"], keepdims=0),  # [n1, F]
        helper.make_node("MatMul", ["agg", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ell",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n0", f]),
            helper.make_tensor_value_info("nbr_1", TensorProto.INT64, ["n1", "k1"]),
            helper.make_tensor_value_info("weight_1", TensorProto.FLOAT, ["n1", "k1"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n1", c])],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1], np.int64), "axis_m1"),
            numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        ],
    )
    return _model(graph)


def embed_metadata(model: onnx.ModelProto, manifest: dict) -> None:
    """Stores ``manifest`` (without ``files``) in ``metadata_props``, as export does."""
    del model.metadata_props[:]
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, json.dumps(manifest)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_export(
    out: Path,
    model: onnx.ModelProto,
    fmt: str,
    num_nodes: int,
    num_features: int,
    num_classes: int,
    adjacency: dict | None = None,
    external_data: bool = False,
) -> Path:
    """Writes ``model.onnx`` and a format_version 1 ``manifest.json`` into ``out``
    (``adjacency``: extra fields of the manifest's ``adjacency`` object; ``external_data``:
    every initializer in ``model.onnx.data``, as the exporter writes large models)."""
    out.mkdir(parents=True, exist_ok=True)

    def spec(v: onnx.ValueInfoProto) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": dims,
        }

    manifest = {
        "format_version": 1,
        "producer": {"name": "abkd-deploy", "version": "0.1.0"},
        "adjacency": {
            "format": fmt,
            "fanouts": [],
            "exact": True,
            "norm": "gcn",
            **(adjacency or {}),
        },
        "model": {"arch": "tiny", "num_layers": 2, "hidden": 6, "params": 0},
        "graph": {"num_nodes": num_nodes, "num_features": num_features, "num_classes": num_classes},
        "opset": OPSET,
        "dtype": "float32",
        "inputs": [spec(v) for v in model.graph.input],
        "outputs": [spec(v) for v in model.graph.output],
        "artifacts": {"onnx": "model.onnx"},
    }
    embed_metadata(model, manifest)
    files = ["model.onnx"]
    if external_data:
        onnx.save(
            model,
            out / "model.onnx",
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=0,
        )
        files.append("model.onnx.data")
    else:
        onnx.save(model, out / "model.onnx")
    manifest["files"] = {
        name: {"sha256": _sha(out / name), "bytes": (out / name).stat().st_size} for name in files
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def lookup_onnx(logits: np.ndarray, embedding: np.ndarray) -> onnx.ModelProto:
    """A ``--precompute all`` model: one Gather of ``node_ids`` per stored output table."""
    nodes = [
        helper.make_node("Gather", ["logits_table", "node_ids"], ["logits"], axis=0),
        helper.make_node("Gather", ["embedding_table", "node_ids"], ["embedding"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_lookup",
        [helper.make_tensor_value_info("node_ids", TensorProto.INT64, ["batch"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", logits.shape[1]]),
            helper.make_tensor_value_info(
                "embedding", TensorProto.FLOAT, ["batch", embedding.shape[1]]
            ),
        ],
        initializer=[
            numpy_helper.from_array(logits, "logits_table"),
            numpy_helper.from_array(embedding, "embedding_table"),
        ],
    )
    return _model(graph)


def write_embedded(out: Path, tiny: TinyModel) -> Path:
    """An ``embedded`` export of ``tiny``."""
    n, f = tiny.features.shape
    return write_export(out, embedded_onnx(tiny), "embedded", n, f, tiny.w2.shape[1])
