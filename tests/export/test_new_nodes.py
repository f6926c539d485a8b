"""The new-node graph: the student on the graph with the node added (edges S -> v only)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, FanoutTable, sample_fanout_table
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.errors import ValuesMismatch
from abkd_deploy.export import export
from abkd_deploy.export.adjacency import ExportContext
from abkd_deploy.export.new_node_artifact import check_consistency
from abkd_deploy.export.new_nodes import NewNodeStudent, refuse_new_nodes
from abkd_deploy.export.precompute import layer_states, precompute_student
from abkd_deploy.models import build_model

from .conftest import make_run


def _student(arch: str, data, layers: int):
    torch.manual_seed(5)
    return build_model(
        arch,
        in_channels=data.num_features,
        hidden=8,
        out_channels=data.num_classes,
        num_layers=layers,
    ).eval()


def _with_node(table: FanoutTable, neighbors: list[int]) -> FanoutTable:
    """``table`` plus a row for a new node ``N`` joined by edges ``neighbors -> N``."""
    n, k = table.nbr.shape
    row = torch.full((1, k), n, dtype=torch.int64)  # padding = the node's own id
    kept = neighbors[:k]
    row[0, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return FanoutTable(
        nbr=torch.cat([table.nbr, row]),
        count=torch.cat([table.count, torch.tensor([len(kept)])]),
        degree=torch.cat([table.degree, torch.tensor([len(neighbors)])]),
    )


@pytest.mark.parametrize("arch", ["gcn", "sage"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_new_node_equals_student_on_the_grown_graph(csbm_data, arch, layers):
    data = csbm_data
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    fanouts = [4, 2, 3][:layers]
    tables = [sample_fanout_table(csr, k, seed=i) for i, k in enumerate(fanouts)]
    student = _student(arch, data, layers)
    states = [data.x, *layer_states(student, data.x, tables)]
    module = NewNodeStudent(student, states, tables[0].degree, fanouts).eval()
    gen = torch.Generator().manual_seed(0)
    cases = [
        [],
        [7],
        [3, 9, 11],
        [int(i) for i in torch.randperm(data.num_nodes, generator=gen)[:4]],
    ]
    width = max(fanouts)
    for neighbors in cases:
        x_v = torch.randn((1, data.num_features), generator=gen)
        nbr = torch.full((1, width), -1, dtype=torch.int64)
        nbr[0, : len(neighbors)] = torch.tensor(neighbors, dtype=torch.int64)
        with torch.no_grad():
            logits, emb = module(x_v, nbr)
            grown = [_with_node(t, neighbors) for t in tables]
            ops = [EllBlock.full_graph(t, student.norm) for t in grown]
            ref, hiddens = student(torch.cat([data.x, x_v]), ops)
        torch.testing.assert_close(logits[0], ref[-1], atol=1e-5, rtol=0)
        want_emb = hiddens[-2][-1] if layers > 1 else ref[-1]
        torch.testing.assert_close(emb[0], want_emb, atol=1e-5, rtol=0)


def test_new_node_graph_is_refused_for_gat(csbm_data):
    assert refuse_new_nodes(_student("gat", csbm_data, 2)) is not None
    assert refuse_new_nodes(_student("sage", csbm_data, 2)) is None


def test_export_writes_a_validated_new_node_graph(sage_run, tmp_path, csbm_data):
    manifest = export(sage_run, tmp_path / "exp", fanouts="4,4", progress=False)
    entry = manifest["new_nodes"]
    assert entry["file"] == "new_nodes.onnx" and "new_nodes.onnx" in manifest["files"]
    assert entry["max_neighbors"] == 4 and entry["fanouts"] == [4, 4]
    assert max(entry["max_abs_diff"].values()) <= manifest["validation"]["atol"]
    on_disk = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert on_disk["new_nodes"]["inputs"][0]["shape"] == ["nodes", csbm_data.num_features]
    sess = ort.InferenceSession(str(tmp_path / "exp" / "new_nodes.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["features", "neighbors"]
    x = np.random.default_rng(0).normal(size=(3, csbm_data.num_features)).astype(np.float32)
    nbr = np.array([[1, 2, -1, -1], [-1, -1, -1, -1], [5, 6, 7, 8]], dtype=np.int64)
    logits, emb = sess.run(None, {"features": x, "neighbors": nbr})
    assert logits.shape == (3, csbm_data.num_classes) and np.isfinite(logits).all()
    assert emb.shape == (3, 16)


def test_no_new_node_graph_for_a_gat_student(tmp_path):
    run = make_run(tmp_path / "gat_run", "gat", epochs=2)
    manifest = export(run, tmp_path / "gat_exp", fanouts="3,3", progress=False)
    assert "new_nodes" not in manifest
    assert not (tmp_path / "gat_exp" / "new_nodes.onnx").exists()


def test_consistency_check_catches_wrong_states(csbm_data):
    data = csbm_data
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    student = _student("sage", data, 2)
    fanouts = [25, 25]  # every node's table holds all its neighbours: all re-describable
    sampler = NeighborSampler(csr, fanouts, student.norm, seed=0)
    ctx = ExportContext(student, data, csr, fanouts, sampler, torch.arange(10))
    main = precompute_student(student, data.x, sampler.tables).eval()
    states = [data.x, *ctx.layer_states()]
    good = NewNodeStudent(student, states, sampler.tables[0].degree, fanouts).eval()
    assert check_consistency(ctx, good, main, 25, 1e-5) <= 1e-5
    wrong = NewNodeStudent(student, [data.x, states[1] * 1.5], sampler.tables[0].degree, fanouts)
    with pytest.raises(ValuesMismatch, match="re-described"):
        check_consistency(ctx, wrong.eval(), main, 25, 1e-5)
