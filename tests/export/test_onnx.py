"""ONNX artifacts: gather-only graphs, exactness of ell, embedded batches, coo, metadata."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import sample_fanout_table
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.export import export, onnx_format
from abkd_deploy.models import load_model


def all_ops(path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    for fn in model.functions:
        ops |= {node.op_type for node in fn.node}
    return ops


def session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_ell_and_embedded_graphs_have_no_scatter(ell_exports, gcn_embedded):
    paths = [p / "model.onnx" for p, _ in ell_exports.values()] + [gcn_embedded[0] / "model.onnx"]
    for path in paths:
        ops = all_ops(path)
        assert "Gather" in ops
        assert not {op for op in ops if op.startswith("Scatter")}, (path, ops)


@pytest.mark.parametrize("arch", ["gcn", "sage"])
def test_exact_ell_matches_pytorch_student(ell_exports, csbm_data, arch):
    out, manifest = ell_exports[arch]
    student, _ = load_model(manifest["provenance"]["run_dir"], "student")
    data = csbm_data
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    assert (
        manifest["adjacency"]["exact"] and manifest["adjacency"]["fanouts"] == [csr.max_degree] * 2
    )
    table = sample_fanout_table(csr, csr.max_degree)
    w, sw = table.weights(student.norm)
    feed = {"x": data.x.numpy()}
    for layer in (1, 2):
        feed[f"nbr_{layer}"], feed[f"weight_{layer}"] = table.nbr.numpy(), w.numpy()
        if student.norm == "gcn":
            feed[f"self_weight_{layer}"] = sw.numpy()
    with torch.no_grad():
        ref = student(data.x, FullGraph(csr, student.norm))[0].numpy()
    got = session(out / "model.onnx").run(None, feed)[0]
    assert np.abs(got - ref).max() <= 1e-5
    acc = manifest["accuracy"]
    assert acc["exported"]["onnx"] == pytest.approx(acc["pytorch_student"])
    assert acc["pytorch_student"] == pytest.approx(acc["pytorch_student_exact_graph"])


def test_embedded_answers_batches_with_duplicates(gcn_embedded):
    out, manifest = gcn_embedded
    sess = session(out / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["node_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "embedding"]
    n = manifest["graph"]["num_nodes"]
    gen = np.random.default_rng(0)
    for size in (1, 7, 1000):
        ids = gen.integers(0, n, size)
        if size == 7:
            ids[3] = ids[5] = ids[0]
        logits, emb = sess.run(None, {"node_ids": ids.astype(np.int64)})
        assert logits.shape == (size, manifest["graph"]["num_classes"])
        assert emb.shape == (size, manifest["outputs"][1]["shape"][1])
        first = np.flatnonzero(ids == ids[0])
        assert np.allclose(logits[first], logits[first[0]])  # duplicates answer the same


def test_manifest_fields_hashes_and_metadata(gcn_embedded):
    from abkd_deploy.export import read_manifest
    from abkd_deploy.files import sha256_file

    out, manifest = gcn_embedded
    on_disk = read_manifest(out, verify_files=True)
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["format_version"] == 1
    assert manifest["adjacency"] == {
        **manifest["adjacency"],
        "format": "embedded",
        "fanouts": [10, 10],
        "sampling_seed": 0,
        "norm": "gcn",
    }
    assert manifest["inputs"] == [{"name": "node_ids", "dtype": "int64", "shape": ["batch"]}]
    assert manifest["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 5]}
    assert manifest["graph"]["num_nodes"] == 600 and manifest["graph"]["num_features"] == 64
    assert manifest["opset"] == 18 and manifest["dtype"] == "float32"
    assert manifest["artifacts"] == {
        "onnx": "model.onnx",
        "torchscript": "model.pt",
        "pt2": "model.pt2",
    }
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.onnx.data",  # a live export keeps its tables as external data (refresh)
        "model.pt",
        "model.pt2",
        "new_nodes.onnx",
        "new_nodes.onnx.data",
        "graph.npz",
    }
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name)
        assert entry["bytes"] == (out / name).stat().st_size
    prov = manifest["provenance"]
    assert prov["method"] == "abkd" and prov["compression_ratio"] == 31.5
    assert prov["teacher_test_acc"] == 0.9 and prov["student_test_acc"] == 0.8
    assert prov["dataset"]["name"] == "csbm:num_nodes=600"
    val = manifest["validation"]
    assert val["passed"] and val["atol"] == 1e-4 and len(val["input_sets"]) >= 3
    assert set(val["max_abs_diff"]) == {"onnx", "torchscript", "pt2"}
    assert all(d <= 1e-4 for diffs in val["max_abs_diff"].values() for d in diffs.values())
    assert set(manifest["accuracy"]["exported"]) == {"onnx", "torchscript", "pt2"}
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    embedded = json.loads(meta[onnx_format.METADATA_KEY])
    assert "files" not in embedded
    assert embedded["adjacency"] == manifest["adjacency"]
    assert embedded["validation"] == manifest["validation"]
    names = [i.name for i in model.graph.input]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert names == ["node_ids"] and dims == ["batch"]


def test_coo_uses_scatter_add_and_is_exact(gcn_run, tmp_path):
    manifest = export(gcn_run, tmp_path / "coo", adjacency="coo", progress=False)
    ops = all_ops(tmp_path / "coo" / "model.onnx")
    assert "ScatterElements" in ops and "ScatterND" not in ops
    assert manifest["inputs"][1] == {
        "name": "edge_index",
        "dtype": "int64",
        "shape": [2, "num_edges"],
    }
    acc = manifest["accuracy"]
    assert acc["exported"]["onnx"] == pytest.approx(acc["pytorch_student_exact_graph"])


def test_large_initializers_go_to_external_data(gcn_run, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "ext"
    manifest = export(gcn_run, out, progress=False)
    main = {"model.onnx", "model.onnx.data"}
    assert set(manifest["files"]) == main | {"new_nodes.onnx", "new_nodes.onnx.data", "graph.npz"}
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert onnx_format.METADATA_KEY in {p.key for p in model.metadata_props}
    logits, _ = session(out / "model.onnx").run(None, {"node_ids": np.array([0, 1, 1])})
    assert logits.shape == (3, 5)


def test_float16_embedded(gcn_run, tmp_path):
    manifest = export(gcn_run, tmp_path / "fp16", dtype="float16", progress=False)
    assert manifest["dtype"] == "float16" and manifest["validation"]["atol"] == 1e-2
    assert manifest["outputs"][0]["dtype"] == "float16"
    logits, _ = session(tmp_path / "fp16" / "model.onnx").run(None, {"node_ids": np.arange(4)})
    assert logits.dtype == np.float16
    acc = manifest["accuracy"]
    assert abs(acc["exported"]["onnx"] - acc["pytorch_student"]) < 0.02
