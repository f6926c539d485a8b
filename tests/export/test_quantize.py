"""``export --quantize int8``: per-row int8 tables, int8 ONNX weights, validation, serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from abkd_deploy.cli import main
from abkd_deploy.errors import ConfigError
from abkd_deploy.export import export, onnx_format, quantize
from abkd_deploy.export.precompute import OutputTables
from abkd_deploy.export.quantize import (
    INT8_RTOL,
    MIN_WIDTH,
    QuantizedTable,
    quantize_rows,
    quantize_tables,
)
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.lookup import lookup_tables


def onnx_bytes(manifest: dict) -> int:
    return sum(e["bytes"] for name, e in manifest["files"].items() if name.startswith("model.onnx"))


def predictor_nodes(manifest: dict) -> int:
    return int(manifest["graph"]["num_nodes"])


def ort_outputs(export_dir: Path, ids: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(
        str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"node_ids": ids})


# ---------------------------------------------------------------- the per-row quantizer


def test_quantize_rows_round_trip_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 7, generator=gen) * torch.logspace(-3, 3, 50).unsqueeze(1)
    values, scale = quantize_rows(table)
    assert values.dtype == torch.int8 and values.shape == (50, 7)
    assert scale.dtype == torch.float32 and scale.shape == (50, 1)
    assert torch.allclose(scale[:, 0], table.abs().amax(1) / 127)
    assert (values.abs().amax(1) == 127).all()  # every nonzero row uses the full range
    error = (values.float() * scale - table).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()


def test_quantize_rows_zero_rows_get_scale_one() -> None:
    table = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    values, scale = quantize_rows(table)
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0
    assert (values[[0, 2]] == 0).all()
    assert values[1].tolist() == [64, -127, 32]  # round(x / (2 / 127))


def test_quantized_table_lookup_equals_dequantised_rows() -> None:
    table = QuantizedTable(torch.randn(20, 4, generator=torch.Generator().manual_seed(1)))
    ids = torch.tensor([3, 3, 0, 19])
    assert table.shape == (20, 4) and table.size(1) == 4
    assert torch.equal(table.lookup(ids), table.dequantize()[ids])
    assert torch.equal(table.index_select(0, ids), table.lookup(ids))
    assert table.placeholder().shape == (0, 4)
    with pytest.raises(ValueError, match="dim 0"):
        table.index_select(1, ids)


def test_quantize_tables_replaces_only_the_float_tables() -> None:
    module = OutputTables(torch.randn(10, MIN_WIDTH), torch.randn(10, 12))
    quantized = quantize_tables(module)
    assert isinstance(quantized.logits_table, QuantizedTable)
    assert isinstance(quantized.embedding_table, QuantizedTable)
    assert isinstance(module.logits_table, torch.Tensor)  # the original is untouched
    ids = torch.tensor([1, 9, 1])
    got, want = quantized(ids), module(ids)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=float(w.abs().max()) / 127)
    with pytest.raises(ValueError, match="no float table"):
        quantize_tables(torch.nn.Linear(2, 2))
    narrow = quantize_tables(OutputTables(torch.randn(10, MIN_WIDTH - 1), torch.randn(10, 12)))
    assert isinstance(narrow.logits_table, torch.Tensor)  # too narrow to gain: float32
    assert isinstance(narrow.embedding_table, QuantizedTable)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def exports(gcn_run, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """gcn student as ``--precompute all`` lookups, float32 (``none``) and int8 (onnx +
    torchscript), and as an int8 per-request tree (``tree``: MatMul weights in the graph),
    written with external data (threshold 0) to check that layout survives quantization.
    The float32 lookup holds the tree form's own outputs: the float32 reference of both."""
    base = tmp_path_factory.mktemp("quantize")
    out = {}
    for q, formats in (("none", ("onnx",)), ("int8", ("onnx", "torchscript"))):
        manifest = export(gcn_run, base / q, formats, precompute="all", quantize=q, progress=False)
        out[q] = (base / q, manifest)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
        manifest = export(
            gcn_run, base / "tree", precompute="none", quantize="int8", progress=False
        )
        out["tree"] = (base / "tree", manifest)
    return out


@pytest.mark.parametrize("kind", ["tree", "int8"])
def test_int8_exports_are_close_to_float32(exports, kind) -> None:
    (f_dir, f_man), (q_dir, q_man) = exports["none"], exports[kind]
    assert q_man["quantize"]["mode"] == "int8" and f_man["quantize"] == {"mode": "none"}
    assert q_man["quantize"]["tables"] and q_man["quantize"]["rtol"] == INT8_RTOL
    assert q_man["validation"]["rtol"] == INT8_RTOL and "rtol" not in f_man["validation"]
    ids = np.random.default_rng(0).integers(0, q_man["graph"]["num_nodes"], 64)
    changed = []
    for got, want in zip(ort_outputs(q_dir, ids), ort_outputs(f_dir, ids), strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= INT8_RTOL * np.abs(want).max()
        changed.append(not np.array_equal(got, want))
    # the lookup's [N, 5] logits table is narrower than MIN_WIDTH: float32, exact
    assert changed == ([True, True] if kind == "tree" else [False, True])
    acc = q_man["accuracy"]
    assert abs(acc["exported"]["onnx"] - acc["pytorch_student"]) <= 0.05


def test_int8_tree_graph_has_int8_tables_and_weights(exports) -> None:
    q_dir, q_man = exports["tree"]
    assert "model.onnx.data" in q_man["files"]  # external data kept through quantize_dynamic
    model = onnx.load(str(q_dir / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "DequantizeLinear" in ops and not any(op.startswith("Scatter") for op in ops)
    if quantize.QUANTIZE_WEIGHTS:
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    else:
        assert "MatMulInteger" not in ops
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert {"features.values", "weight_1.values", "weight_2.values"} <= int8
    assert lookup_tables(q_dir / "model.onnx", ["logits", "embedding"]) is None
    predictor = Predictor(q_dir)  # hashes, metadata copy and node tables check out
    ids = np.arange(0, q_man["graph"]["num_nodes"], 7)
    logits, embedding = ort_outputs(q_dir, ids)
    answer = predictor.predict(ids, return_embedding=True)
    assert np.array_equal(answer.classes, logits.argmax(1))
    assert np.array_equal(answer.embedding, embedding)


def test_int8_lookup_predictor_equals_onnxruntime(exports) -> None:
    q_dir, q_man = exports["int8"]
    f_man = exports["none"][1]
    assert onnx_bytes(q_man) < 0.6 * onnx_bytes(f_man)  # + a few kB of metadata each
    model = onnx.load(str(q_dir / "model.onnx"))
    assert {n.op_type for n in model.graph.node} == {"Gather", "DequantizeLinear", "Reshape"}
    scales = [t for t in model.graph.initializer if t.name.endswith(".scale")]
    assert scales and all(list(t.dims) == [predictor_nodes(q_man)] for t in scales)
    predictor = Predictor(q_dir)
    assert predictor._answers is not None  # the numpy fast path recognised the graph
    ids = np.random.default_rng(1).integers(0, predictor.num_nodes, 200)
    logits, embedding = ort_outputs(q_dir, ids)
    answer = predictor.predict(ids, return_embedding=True)
    assert np.array_equal(answer.embedding, embedding)  # bit for bit
    assert np.array_equal(answer.classes, logits.argmax(1))
    z = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(answer.scores, z / z.sum(1, keepdims=True), rtol=1e-6, atol=1e-7)
    scores = q_man["accuracy"]["exported"]
    assert scores["onnx"] == scores["torchscript"]  # same int8 module in both formats


def test_lookup_tables_refuses_a_broadcast_it_cannot_replay(tmp_path) -> None:
    """A Mul of a [N] and a [N, F] lookup broadcasts differently on [B] rows: not a lookup."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["t", "node_ids"], ["a"]),
        helper.make_node("Gather", ["s", "node_ids"], ["b"]),
        helper.make_node("Mul", ["a", "b"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 4), np.float32), "t"),
        numpy_helper.from_array(np.ones(4, np.float32), "s"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("node_ids", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert lookup_tables(path, ["logits"]) is None


# ---------------------------------------------------------------- refused combinations


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adjacency": "ell"}, "needs --adjacency embedded; 'ell'"),
        ({"adjacency": "coo"}, "needs --adjacency embedded; 'coo'"),
        ({"dtype": "float16"}, "cannot be combined with --dtype float16"),
        ({"quantize": "int4"}, "unknown quantize mode 'int4'"),
    ],
)
def test_refused_combinations(gcn_run, tmp_path, options, message) -> None:
    kwargs = {"quantize": "int8", **options}
    with pytest.raises(ConfigError, match=message) as info:
        export(gcn_run, tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_int8_ell_with_exit_code_2(gcn_run, tmp_path) -> None:
    args = ["export", str(gcn_run), "--out", str(tmp_path / "o"), "--adjacency", "ell"]
    result = CliRunner().invoke(main, [*args, "--quantize", "int8"])
    assert result.exit_code == 2 and "--adjacency embedded" in result.output
    result = CliRunner().invoke(main, [*args, "--quantize", "int4"])
    assert result.exit_code == 2 and "int4" in result.output


def test_int8_new_nodes_graph_stores_int8_states(exports) -> None:
    """new_nodes.onnx gets the same int8 tables (states) and stays within the tolerance."""
    (f_dir, f_man), (q_dir, q_man) = exports["none"], exports["int8"]
    assert q_man["new_nodes"]["file"] == "new_nodes.onnx"
    assert q_man["new_nodes"]["int8_tables"] == ["state_0", "state_1"]
    assert f_man["new_nodes"]["int8_tables"] == []
    model = onnx.load(str(q_dir / "new_nodes.onnx"))
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert {"state_0.values", "state_1.values"} <= int8
    assert not any(
        t.data_type == onnx.TensorProto.FLOAT
        and len(t.dims) == 2
        and t.dims[0] == q_man["graph"]["num_nodes"]
        and t.dims[1] > 1  # the [N, 1] scales are float32
        for t in model.graph.initializer
    )
    f_size = sum(e["bytes"] for n, e in f_man["files"].items() if n.startswith("new_nodes"))
    q_size = sum(e["bytes"] for n, e in q_man["files"].items() if n.startswith("new_nodes"))
    assert q_size < 0.6 * f_size
    predictor = Predictor(q_dir)
    features = np.random.default_rng(2).standard_normal((3, q_man["graph"]["num_features"]))
    nodes = [{"features": f.tolist(), "neighbors": [0, 5, 9]} for f in features.astype(np.float32)]
    got = predictor.predict_nodes(nodes, return_embedding=True)
    want = Predictor(f_dir).predict_nodes(nodes, return_embedding=True)
    scale = np.abs(want.embedding).max()
    assert np.abs(got.embedding - want.embedding).max() <= INT8_RTOL * scale
    assert not np.array_equal(got.embedding, want.embedding)


def test_float16_export_reports_its_accuracy_change(gcn_run, tmp_path, capsys) -> None:
    manifest = export(gcn_run, tmp_path / "f16", dtype="float16", precompute="all")
    assert manifest["dtype"] == "float16" and manifest["quantize"] == {"mode": "none"}
    assert manifest["validation"]["atol"] == 1e-2 and "rtol" not in manifest["validation"]
    err = capsys.readouterr().err
    assert "onnx: float16 accuracy change vs float32 PyTorch:" in err


def test_fuse_dequantize_leaves_a_shared_scale_alone() -> None:
    """A scale that something else also reads keeps its [N, 1] shape and its Cast + Mul."""
    from onnx import TensorProto, helper, numpy_helper

    from abkd_deploy.export.quantize_onnx import fuse_dequantize

    nodes = [
        helper.make_node("Gather", ["t.values", "node_ids"], ["v"]),
        helper.make_node("Cast", ["v"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["t.scale", "node_ids"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["out"]),
        helper.make_node("Identity", ["t.scale"], ["other"]),
    ]
    inits = [
        numpy_helper.from_array(np.ones((4, 8), np.int8), "t.values"),
        numpy_helper.from_array(np.ones((4, 1), np.float32), "t.scale"),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "other")]
    ids = [helper.make_tensor_value_info("node_ids", TensorProto.INT64, ["b"])]
    model = helper.make_model(helper.make_graph(nodes, "g", ids, outs, inits))
    assert fuse_dequantize(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Gather", "Cast", "Gather", "Mul", "Identity"]
    del model.graph.node[-1], model.graph.output[-1]
    assert fuse_dequantize(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gather", "Gather", "DequantizeLinear"]
    assert list(model.graph.initializer[1].dims) == [4]


def test_bench_header_puts_the_artifact_next_to_float32(exports) -> None:
    from abkd_deploy.serve.bench import _artifact_header, artifact_entry

    q_man = exports["int8"][1]
    entry = artifact_entry(q_man)
    assert entry["quantize"] == "int8" and entry["dtype"] == "float32"
    assert entry["bytes"] == sum(e["bytes"] for e in q_man["files"].values())
    assert entry["float32_pytorch"] == q_man["accuracy"]["pytorch_student"]
    (line,) = _artifact_header({"artifact": entry})
    assert line.startswith("- artifact: int8 tables, float32 compute, ")
    assert f"vs float32 PyTorch {entry['float32_pytorch']:.4f}" in line


def test_cli_exports_int8_and_prints_the_accuracy_change(gcn_run, tmp_path) -> None:
    out = tmp_path / "q"
    args = ["export", str(gcn_run), "--out", str(out), "--quantize", "int8"]
    result = CliRunner().invoke(main, [*args, "--precompute", "all"])
    assert result.exit_code == 0, result.output
    assert "float32, int8 tables, opset 18" in result.output
    assert "onnx: int8 accuracy change vs float32 PyTorch: " in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantize"]["tables"] == ["embedding_table"]


def test_int8_factored_sage_tree_keeps_the_zero_row(sage_run, tmp_path) -> None:
    manifest = export(sage_run, tmp_path / "q", precompute="none", quantize="int8", progress=False)
    assert manifest["adjacency"]["table_weights"] == "scale"
    assert manifest["validation"]["passed"] is True
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    n = manifest["graph"]["num_nodes"]
    values = init["features.values"]  # the padding slots' zero row stays zero in int8
    assert values.dtype == np.int8 and values.shape[0] == n + 1 and not values[n].any()
    assert init["scale_1"].dtype == np.float32 and "weight_1.values" not in init
    ids = np.arange(0, n, 5)
    logits, _ = ort_outputs(tmp_path / "q", ids)
    answer = Predictor(tmp_path / "q").predict(ids)
    assert np.array_equal(answer.classes, logits.argmax(1))
