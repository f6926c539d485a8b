"""Precomputed ``embedded`` students: same outputs as the per-request tree, less work."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.export import export, precompute
from abkd_deploy.export.fold import fold_input_transform
from abkd_deploy.export.modules import EmbeddedStudent
from abkd_deploy.export.precompute import can_precompute, hidden_table, precompute_student
from abkd_deploy.export.rebuild import build_export_module
from abkd_deploy.models import build_model


def _student(arch: str, data, layers: int):
    torch.manual_seed(3)
    model = build_model(
        arch,
        in_channels=data.num_features,
        hidden=8,
        out_channels=data.num_classes,
        num_layers=layers,
    )
    return model.eval()


def _tree(student, data, tables) -> EmbeddedStudent:
    folded = fold_input_transform(student, data.x)
    return EmbeddedStudent(
        folded.model,
        folded.features,
        tables,
        dst_features=folded.dst_features,
        table_first=True,
    ).eval()


@pytest.mark.parametrize("arch", ["gcn", "sage"])
@pytest.mark.parametrize("layers", [2, 3])
def test_precomputed_equals_tree_and_sampled_student(csbm_data, arch, layers):
    data = csbm_data
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    student = _student(arch, data, layers)
    sampler = NeighborSampler(csr, [4] * layers, student.norm, seed=0)
    module = precompute_student(student, data.x, sampler.tables).eval()
    tree = _tree(student, data, sampler.tables)
    ids = torch.tensor([5, 0, 5, data.num_nodes - 1, 17, 17, 300])  # duplicates included
    with torch.no_grad():
        logits, emb = module(ids)
        ref_logits, ref_emb = tree(ids)
        batch = sampler.sample(ids)
        direct = student(data.x[batch.n_id], batch.blocks)[0]
    assert logits.shape == (7, data.num_classes) and emb.shape == (7, 8)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    assert torch.allclose(logits, direct, atol=1e-5)
    # only the last layer's table is stored
    tables = [n for n, _ in module.named_buffers() if "nbr_" in n]
    assert tables == ["last.nbr_1"]


def test_hidden_table_does_not_depend_on_chunking(csbm_data, monkeypatch):
    data = csbm_data
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    student = _student("sage", data, 3)
    tables = NeighborSampler(csr, [3, 3, 3], student.norm, seed=1).tables
    whole = hidden_table(student, data.x, tables)
    monkeypatch.setattr(precompute, "CHUNK_ELEMENTS", 50)  # many small chunks
    chunked = hidden_table(student, data.x, tables)
    assert whole.shape == (data.num_nodes, 8)
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_only_supported_students(csbm_data):
    data = csbm_data
    assert can_precompute(_student("sage", data, 2))
    assert not can_precompute(_student("sage", data, 1))
    assert not can_precompute(_student("gat", data, 2))
    assert not can_precompute(_student("gcnii", data, 2))
    with pytest.raises(ValueError, match="gat"):
        precompute_student(_student("gat", data, 2), data.x, [])


def test_export_precompute_flag(sage_run, tmp_path):
    on = export(sage_run, tmp_path / "on", progress=False)
    off = export(sage_run, tmp_path / "off", progress=False, precompute=False)
    assert on["adjacency"]["precomputed_layers"] == 1
    assert on["adjacency"]["features"] == "precomputed"
    assert off["adjacency"]["precomputed_layers"] == 0
    assert on["accuracy"]["exported"]["onnx"] == off["accuracy"]["exported"]["onnx"]
    # fewer stored tables and a smaller graph: one gather level instead of two
    nodes_on = len(onnx.load(str(tmp_path / "on" / "model.onnx")).graph.node)
    nodes_off = len(onnx.load(str(tmp_path / "off" / "model.onnx")).graph.node)
    assert nodes_on < nodes_off
    # bench's eager baseline is rebuilt in the same form
    rebuilt = build_export_module(tmp_path / "on")
    assert isinstance(rebuilt, precompute.PrecomputedStudent)
    ids = torch.arange(0, 40)
    with torch.no_grad():
        out = rebuilt(ids)[0].numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "on" / "model.onnx"))
    assert np.abs(sess.run(None, {"node_ids": ids.numpy()})[0] - out).max() < 1e-5


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("arch", ["sage", pytest.param("gat", marks=pytest.mark.slow)])
def test_precompute_all_is_a_lookup_equal_to_the_hidden_export(
    sage_run, tmp_path, arch, tmp_path_factory
):
    if arch == "gat":  # no hidden precompute: the tables come from the per-request tree
        from tests.export.conftest import make_run

        run = make_run(tmp_path_factory.mktemp("gat_run"), "gat", epochs=3)
    else:
        run = sage_run
    hidden = export(run, tmp_path / "hidden", progress=False)
    every = export(run, tmp_path / "all", progress=False, precompute="all")
    adj = every["adjacency"]
    assert adj["precompute"] == "all" and adj["layout"] == "lookup"
    assert adj["precomputed_layers"] == 2
    assert hidden["adjacency"]["precompute"] == ("hidden" if arch == "sage" else "none")
    assert (
        every["validation"]["passed"]
        and every["accuracy"]["exported"]["onnx"] == (hidden["accuracy"]["exported"]["onnx"])
    )
    # the graph is the lookup: one Gather of node_ids per output table, nothing else
    graph = onnx.load(str(tmp_path / "all" / "model.onnx")).graph
    ops = [(n.op_type, n.input[1] if n.op_type == "Gather" else None) for n in graph.node]
    assert [op for op, _ in ops if op != "Identity"] == ["Gather", "Gather"], ops
    assert all(index == "node_ids" for op, index in ops if op == "Gather"), ops
    # every node: the same answers as the hidden-only export
    n = every["graph"]["num_nodes"]
    ids = np.arange(n, dtype=np.int64)
    want = _session(tmp_path / "hidden").run(None, {"node_ids": ids})
    got = _session(tmp_path / "all").run(None, {"node_ids": ids})
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("adjacency", ["ell", "coo"])
def test_precompute_all_refused_for_graph_inputs(sage_run, tmp_path, adjacency):
    from abkd_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --adjacency embedded") as info:
        export(sage_run, tmp_path / "x", adjacency=adjacency, precompute="all", progress=False)
    assert "\n" not in str(info.value) and adjacency in str(info.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="unknown precompute mode"):
        export(sage_run, tmp_path / "x", precompute="some", progress=False)


def test_cli_precompute_option(sage_run, tmp_path):
    import json

    from click.testing import CliRunner

    from abkd_deploy.cli import main

    runner = CliRunner()
    base = ["export", str(sage_run), "--out"]
    res = runner.invoke(main, [*base, str(tmp_path / "a"), "--precompute", "all"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["adjacency"]["precompute"] == "all"
    res = runner.invoke(main, [*base, str(tmp_path / "n"), "--no-precompute"])
    assert res.exit_code == 0, res.output
    assert (
        json.loads((tmp_path / "n" / "manifest.json").read_text())["adjacency"][
            "precomputed_layers"
        ]
        == 0
    )
    res = runner.invoke(
        main, [*base, str(tmp_path / "e"), "--adjacency", "ell", "--precompute", "all"]
    )
    assert res.exit_code == 2 and "needs --adjacency embedded" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
