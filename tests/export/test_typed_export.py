"""Typed students (rgcn, rsage) exported as ``embedded`` ONNX / TorchScript (issue 11, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.export import export
from abkd_deploy.export.rebuild import build_export_module
from abkd_deploy.models import load_model
from tests.export.conftest import TYPED_DATASET

EXACT = 1e-5


def _export(run: Path, out: Path, **kwargs) -> dict:
    return export(run, out, progress=False, **kwargs)


@pytest.fixture(scope="module")
def tree_exports(rgcn_run, rsage_run, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """rgcn and rsage, fanout max, tree form (no precompute), onnx + torchscript."""
    base = tmp_path_factory.mktemp("typed_tree")
    out = {}
    for arch, run in (("rgcn", rgcn_run), ("rsage", rsage_run)):
        path = base / arch
        manifest = _export(
            run, path, formats=("onnx", "torchscript"), fanouts="max", precompute=False
        )
        out[arch] = (path, manifest)
    return out


def _full_graph(run: Path, data) -> tuple[np.ndarray, np.ndarray]:
    """(logits, layer-1 target output) of the PyTorch student on the whole typed graph."""
    student = load_model(run, "student")[0].eval()
    with torch.no_grad():
        logits, hiddens = student(student.inputs(data), TypedBlock.full_graph(data, student.norm))
    return logits.numpy(), hiddens[-2].numpy()


def _onnx_outputs(path: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"node_ids": ids})
    return logits, emb


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node}


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_tree_export_matches_the_full_graph_student(arch, tree_exports, typed_data, request):
    path, manifest = tree_exports[arch]
    run = request.getfixturevalue(f"{arch}_run")
    logits, hidden = _full_graph(run, typed_data)
    ids = np.arange(typed_data.num_target_nodes, dtype=np.int64)
    got_logits, got_emb = _onnx_outputs(path, ids)
    assert np.abs(got_logits - logits).max() <= EXACT
    assert np.abs(got_emb - hidden).max() <= EXACT
    dup = np.array([5, 0, 5, 199], dtype=np.int64)
    assert np.abs(_onnx_outputs(path, dup)[0] - logits[dup]).max() <= EXACT
    traced = torch.jit.load(str(path / "model.pt"))
    with torch.no_grad():
        ts_logits = traced(torch.from_numpy(ids))[0].numpy()
    assert np.abs(ts_logits - logits).max() <= EXACT
    acc = manifest["accuracy"]
    assert acc["exported"]["onnx"] == acc["exported"]["torchscript"] == acc["pytorch_student"]
    assert acc["pytorch_student"] == acc["pytorch_student_exact_graph"]
    assert acc["nodes"] == int(typed_data.test_mask.sum())
    assert manifest["adjacency"]["exact"] is True
    assert manifest["adjacency"]["precomputed_layers"] == 0
    assert not any(op.startswith("Scatter") for op in _op_types(path))


def test_manifest_records_the_schema(tree_exports, typed_data):
    path, manifest = tree_exports["rgcn"]
    on_disk = json.loads((path / "manifest.json").read_text())
    assert on_disk["graph"] == manifest["graph"]
    graph, adj = manifest["graph"], manifest["adjacency"]
    assert graph["typed"] is True and graph["schema"] == typed_data.schema()
    assert graph["num_nodes"] == typed_data.num_target_nodes  # ids are target-type ids
    assert adj["target"] == typed_data.target == "paper"
    assert adj["node_types"] == typed_data.node_types
    assert adj["relations"] == [list(r) for r in typed_data.relations]
    assert manifest["inputs"] == [{"name": "node_ids", "dtype": "int64", "shape": ["batch"]}]
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "embedding"]
    # fanout max: each relation's table is as wide as its own largest in-degree
    widths = adj["relation_fanouts"][0]
    assert len(set(widths.values())) > 1 and max(widths.values()) == graph["max_degree"]
    # featureless types are stored as (learned embedding) tables
    assert adj["features"]["paper"] == "raw" and adj["features"]["author"] == "embedding"


def test_precomputed_export_is_exact_and_smaller(rgcn_run, tree_exports, typed_data, tmp_path):
    manifest = _export(rgcn_run, tmp_path / "pre", fanouts="max")  # precompute: default
    adj = manifest["adjacency"]
    assert adj["precomputed_layers"] == 1 and adj["precompute"] == "hidden"
    logits, hidden = _full_graph(rgcn_run, typed_data)
    ids = np.arange(typed_data.num_target_nodes, dtype=np.int64)
    got_logits, got_emb = _onnx_outputs(tmp_path / "pre", ids)
    assert np.abs(got_logits - logits).max() <= EXACT
    assert np.abs(got_emb - hidden).max() <= EXACT
    acc = manifest["accuracy"]
    assert acc["exported"]["onnx"] == acc["pytorch_student"]
    tree_bytes = (tree_exports["rgcn"][0] / "model.onnx").stat().st_size
    assert (tmp_path / "pre" / "model.onnx").stat().st_size < tree_bytes
    assert not any(op.startswith("Scatter") for op in _op_types(tmp_path / "pre"))


def test_sampled_fanout_matches_the_sampled_student(rsage_run, typed_data, tmp_path):
    manifest = _export(rsage_run, tmp_path / "k3", fanouts=3, formats=("onnx", "torchscript"))
    adj, acc = manifest["adjacency"], manifest["accuracy"]
    assert adj["exact"] is False and adj["fanouts"] == [3, 3]
    assert all(k <= 3 for layer in adj["relation_fanouts"] for k in layer.values())
    assert acc["exported"]["onnx"] == acc["exported"]["torchscript"] == acc["pytorch_student"]
    assert max(manifest["validation"]["max_abs_diff"]["onnx"].values()) <= 1e-4
    # the rebuilt export-form module (bench's eager baseline) is the exported computation
    ids = np.array([0, 7, 7, 150], dtype=np.int64)
    with torch.no_grad():
        rebuilt = build_export_module(tmp_path / "k3")(torch.from_numpy(ids))[0].numpy()
    assert np.abs(_onnx_outputs(tmp_path / "k3", ids)[0] - rebuilt).max() <= EXACT


def test_precompute_all_is_a_lookup(rgcn_run, typed_data, tmp_path):
    manifest = _export(rgcn_run, tmp_path / "all", fanouts="max", precompute="all")
    assert manifest["adjacency"]["layout"] == "lookup"
    logits, _ = _full_graph(rgcn_run, typed_data)
    ids = np.arange(typed_data.num_target_nodes, dtype=np.int64)
    assert np.abs(_onnx_outputs(tmp_path / "all", ids)[0] - logits).max() <= EXACT


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_ell_export_is_exact_on_the_full_graph(arch, typed_data, tmp_path, request):
    run = request.getfixturevalue(f"{arch}_run")
    manifest = _export(run, tmp_path / "ell", adjacency="ell")  # default fanout: max
    model = onnx.load(str(tmp_path / "ell" / "model.onnx"))
    names = [i.name for i in model.graph.input]
    assert names == [s["name"] for s in manifest["inputs"]]
    assert {"x__paper", "ids__author", "nbr__paper__cites__paper__l0"} <= set(names)
    assert "weight__author__writes__paper__l1" in names
    assert (
        manifest["adjacency"]["typed"] is True and manifest["graph"]["schema"]["target"] == "paper"
    )
    assert not any(n.op_type.startswith("Scatter") for n in model.graph.node)
    # the whole graph as one flat typed block: every relation's full table
    from abkd_deploy.export.adjacency import ADJACENCY
    from abkd_deploy.export.reference import export_context
    from abkd_deploy.export.typed_ell import TypedEllStudent, full_inputs

    student = load_model(run, "student")[0].eval()
    ctx = export_context(ADJACENCY.get("ell"), student, typed_data, "max", 0)
    flat = full_inputs(ctx, TypedEllStudent(student))
    feed = {n: t.numpy() for n, t in zip(names, flat, strict=True)}
    sess = ort.InferenceSession(str(tmp_path / "ell" / "model.onnx"))
    (got,) = sess.run(["logits"], feed)
    logits, _ = _full_graph(run, typed_data)
    assert np.abs(got - logits).max() <= EXACT
    acc = manifest["accuracy"]
    assert acc["exported"]["onnx"] == acc["pytorch_student"] == acc["pytorch_student_exact_graph"]


def test_typed_students_refuse_coo(rgcn_run, tmp_path):
    with pytest.raises(ConfigError, match="typed students export with --adjacency embedded or ell"):
        _export(rgcn_run, tmp_path / "coo", adjacency="coo")
    assert not (tmp_path / "coo").exists()


def test_a_graph_with_another_schema_is_refused(rgcn_run, tmp_path):
    import shutil

    run = Path(shutil.copytree(rgcn_run, tmp_path / "run"))
    meta = json.loads((run / "student.json").read_text())
    meta["dataset"]["name"] = TYPED_DATASET.replace("num_papers=200", "num_papers=240")
    (run / "student.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="schema num_nodes"):
        _export(run, tmp_path / "out")


def test_a_teacher_only_architecture_is_refused(tmp_path):
    from tests.export.conftest import make_typed_run

    run = make_typed_run(tmp_path / "run", "res-rgcn", epochs=1)
    with pytest.raises(ConfigError, match="holds a res-rgcn student, a teacher-only architecture"):
        _export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
