"""Typed models (rgcn, rsage): parity with PyG / a dense reference, sampling, counts, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import HeteroConv, RGCNConv, SAGEConv

from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.registry import load_dataset
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.data.typed_graph import TypedGraph, relation_key
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.errors import ConfigError
from abkd_deploy.models import build_model, load_model, save_model
from abkd_deploy.models.rgcn import RGCNLayer
from abkd_deploy.models.rsage import RSAGELayer
from abkd_deploy.models.typed import parameter_counts

SMALL = "csbm-mag:num_papers=300,num_classes=4,num_features=16"


def _one_type_graph(n: int = 30, num_rel: int = 3, seed: int = 0) -> TypedGraph:
    gen = torch.Generator().manual_seed(seed)
    edges = {}
    for r in range(num_rel):
        ei = torch.randint(0, n, (2, 4 * n), generator=gen)
        edges[("n", f"r{r}", "n")] = torch.unique(ei, dim=1)
    mask = torch.ones(n, dtype=torch.bool)
    return TypedGraph(
        num_nodes_dict={"n": n},
        x_dict={"n": torch.randn(n, 5, generator=gen)},
        edge_index_dict=edges,
        target="n",
        y=torch.zeros(n, dtype=torch.long),
        train_mask=mask,
        val_mask=mask,
        test_mask=mask,
        num_classes=2,
    )


def test_rgcn_layer_matches_pyg_rgcnconv_mean():
    g = _one_type_graph()
    layer = RGCNLayer({"n": 5}, g.relations, 7)
    conv = RGCNConv(5, 7, num_relations=len(g.relations), aggr="mean", root_weight=True)
    with torch.no_grad():
        for i, rel in enumerate(g.relations):
            conv.weight[i].copy_(layer.rel[relation_key(rel)].weight.t())
        conv.root.copy_(layer.root["n"].weight.t())
        conv.bias.copy_(layer.root["n"].bias)
    edge_index = torch.cat([g.edge_index_dict[r] for r in g.relations], 1)
    edge_type = torch.cat(
        [torch.full((g.edge_index_dict[r].size(1),), i) for i, r in enumerate(g.relations)]
    )
    x = g.x_dict["n"]
    with torch.no_grad():
        ref = conv(x, edge_index, edge_type)
        for block in (TypedBlock.full_graph(g), TypedBlock.full_graph_ell(g, "max")):
            out = layer({"n": x}, block, ["n"])["n"]
            assert (out - ref).abs().max() < 1e-5


def test_rsage_layer_matches_pyg_heteroconv_sage():
    g = load_dataset(SMALL)
    dims = {t: 16 if t == "paper" else 8 for t in g.node_types}
    h = {t: torch.randn(n, dims[t]) for t, n in g.num_nodes_dict.items()}
    layer = RSAGELayer(dims, g.relations, 6)
    conv = HeteroConv(
        {r: SAGEConv((dims[r[0]], dims[r[2]]), 6, aggr="mean") for r in g.relations}, aggr="sum"
    )
    with torch.no_grad():
        for r in g.relations:
            sage = conv.convs[r]
            sage.lin_l.weight.copy_(layer.lin_l[relation_key(r)].weight)
            sage.lin_l.bias.copy_(layer.lin_l[relation_key(r)].bias)
            sage.lin_r.weight.copy_(layer.lin_r[relation_key(r)].weight)
        ref = conv(h, g.edge_index_dict)
        for block in (TypedBlock.full_graph(g), TypedBlock.full_graph_ell(g, "max")):
            out = layer(h, block, g.node_types)
            for t in g.node_types:
                assert (out[t] - ref[t]).abs().max() < 1e-5, t


def _dense_rgcn(model, g: TypedGraph) -> torch.Tensor:
    """The R-GCN formula with dense per-relation mean matrices (eval mode, no dropout)."""
    h = model.embed(model.inputs(g))
    for i, layer in enumerate(model.layers):
        out = {t: layer.root[t](h[t]) for t in g.node_types}
        for rel in g.relations:
            head, _, tail = rel
            a = torch.zeros(g.num_nodes_dict[tail], g.num_nodes_dict[head])
            ei = g.edge_index_dict[rel]
            a[ei[1], ei[0]] = 1.0
            a = a / a.sum(1, keepdim=True).clamp(min=1)
            out[tail] = out[tail] + a @ h[head] @ layer.rel[relation_key(rel)].weight.t()
        h = out if i == len(model.layers) - 1 else {t: F.relu(v) for t, v in out.items()}
    return h[g.target]


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_full_ell_and_sampled_outputs_agree(arch):
    g = load_dataset(SMALL)
    torch.manual_seed(0)
    model = build_model(
        arch, schema=g.schema(), hidden=12, out_channels=g.num_classes, num_layers=2, emb_dim=8
    ).eval()
    with torch.no_grad():
        full, hiddens = model(model.inputs(g), TypedBlock.full_graph(g))
        ell, _ = model(model.inputs(g), TypedBlock.full_graph_ell(g, "max"))
        assert full.shape == (300, 4) and [t.shape for t in hiddens] == [(300, 12), (300, 4)]
        assert (full - ell).abs().max() < 1e-5
        if arch == "rgcn":
            assert (full - _dense_rgcn(model, g)).abs().max() < 1e-5
        targets = torch.tensor([7, 250, 3, 119])
        batch = TypedNeighborSampler(g, ["max", "max"]).sample(targets)
        out, hid = model(model.inputs(g, batch.n_id), batch.blocks)
        assert (out - full[targets]).abs().max() < 1e-5
        assert (hid[0][:4] - hiddens[0][targets]).abs().max() < 1e-5
    assert full.std(0).min() > 0  # not a constant output


def test_sampler_blocks_follow_the_prefix_convention():
    g = load_dataset(SMALL)
    sampler = TypedNeighborSampler(g, [3, 2], seed=1)
    targets = torch.tensor([10, 20, 30])
    batch = sampler.sample(targets)
    assert torch.equal(batch.n_id["paper"][:3], targets) and batch.batch_size == 3
    last, first = batch.blocks[1], batch.blocks[0]
    assert last.num_dst == {"paper": 3}
    assert set(first.num_dst) == {"paper"} | {r[0] for r in last.rel_ops}
    for rel, op in last.rel_ops.items():
        head = rel[0]
        # Local ids index the last block's source rows = the first block's destinations,
        # which are the first rows of n_id[head].
        assert op.nbr.shape == (3, 2) and int(op.nbr.max()) < first.num_dst[head]
        edges = set(map(tuple, g.edge_index_dict[rel].t().tolist()))
        for i in range(3):
            for k in range(2):
                if op.weight[i, k] > 0:
                    src = int(batch.n_id[head][op.nbr[i, k]])
                    assert (src, int(targets[i])) in edges
        has = op.weight.sum(1)
        assert torch.allclose(has[has > 0], torch.ones_like(has[has > 0]))
    sampler.resample(1)
    assert any(
        not torch.equal(a.nbr, b.nbr)
        for a, b in zip(
            sampler.tables[0].values(),
            TypedNeighborSampler(g, [3, 2], seed=1).tables[0].values(),
            strict=True,
        )
    )


def test_parameter_counts_match_the_gcrd_setting():
    f = 128
    schema = {
        "node_types": ["author", "field_of_study", "institution", "paper"],
        "target": "paper",
        "relations": [
            ["author", "affiliated_with", "institution"],
            ["author", "writes", "paper"],
            ["field_of_study", "rev_has_topic", "paper"],
            ["institution", "rev_affiliated_with", "author"],
            ["paper", "cites", "paper"],
            ["paper", "has_topic", "field_of_study"],
            ["paper", "rev_writes", "author"],
        ],
        "num_nodes": {"author": 50, "field_of_study": 20, "institution": 10, "paper": 100},
        "num_features": {"paper": f},
    }
    teacher = build_model("rgcn", schema=schema, hidden=512, out_channels=349, num_layers=3)
    student = build_model("rgcn", schema=schema, hidden=32, out_channels=349, num_layers=2)
    t, s = parameter_counts(teacher), parameter_counts(student)
    # 7 relation maps + 4 root maps (with bias) per layer.
    assert t["params_without_embeddings"] == 11 * (f * 512 + 512 * 512 + 512 * 349) + 4 * (
        512 + 512 + 349
    )
    assert s["params_without_embeddings"] == 11 * (f * 32 + 32 * 349) + 4 * (32 + 349)
    assert t["params"] - t["params_without_embeddings"] == 80 * 128
    ratio = t["params_without_embeddings"] / s["params_without_embeddings"]
    assert 5.5e6 < t["params_without_embeddings"] < 5.6e6
    assert 165e3 < s["params_without_embeddings"] < 175e3
    assert 32 < ratio < 33.5
    rebuilt = build_model(**student.config)
    rebuilt.load_state_dict(student.state_dict())
    assert parameter_counts(rebuilt) == s


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_checkpoint_round_trip(tmp_path, arch):
    g = load_dataset(SMALL)
    model = build_model(arch, schema=g.schema(), hidden=8, out_channels=4, num_layers=2).eval()
    save_model(model, tmp_path, "student")
    loaded, meta = load_model(tmp_path, "student")
    assert meta["model"]["schema"]["target"] == "paper" and meta["model"]["emb_dim"] == 128
    block = TypedBlock.full_graph(g)
    with torch.no_grad():
        assert torch.equal(model(model.inputs(g), block)[0], loaded(loaded.inputs(g), block)[0])


def test_typed_arch_needs_a_schema_and_homogeneous_needs_untyped_data():
    with pytest.raises(ConfigError, match="typed-graph architecture"):
        build_model("rgcn", in_channels=8, hidden=4, out_channels=3, num_layers=2)
    g = load_dataset(SMALL)
    with pytest.raises(ConfigError, match=r"csbm-mag.* is a typed graph.*rgcn, rsage"):
        build_model("gcn", in_channels=g.num_features, hidden=4, out_channels=3, num_layers=2)


def _train(model, forward, y, mask, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        out = forward()
        F.cross_entropy(out[mask], y[mask]).backward()
        opt.step()


def _acc(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    return float((out[mask].argmax(1) == y[mask]).float().mean())


TRAIN = "csbm-mag:num_papers=1500,num_classes=5,num_features=32"


@pytest.mark.slow
def test_typed_training_beats_chance_and_the_homogeneous_view():
    g = load_dataset(TRAIN)
    torch.manual_seed(0)
    rgcn = build_model(
        "rgcn", schema=g.schema(), hidden=32, out_channels=5, num_layers=2, emb_dim=16
    )
    block, inputs = TypedBlock.full_graph_ell(g, "max"), rgcn.inputs(g)
    _train(rgcn, lambda: rgcn(inputs, block)[0], g.y, g.train_mask, 30)
    with torch.no_grad():
        typed_acc = _acc(rgcn.eval()(inputs, block)[0], g.y, g.test_mask)

    view = load_dataset(TRAIN.replace("csbm-mag", "csbm-mag-papers"))
    best_homogeneous = 0.0
    for arch in ("mlp", "sage"):
        m = build_model(arch, in_channels=32, hidden=32, out_channels=5, num_layers=2)
        op = FullGraph.from_edge_index(view.edge_index, view.x.size(0), m.norm)
        _train(m, lambda m=m, op=op: m(view.x, op)[0], view.y, view.train_mask, 60)
        with torch.no_grad():
            acc = _acc(m.eval()(view.x, op)[0], view.y, view.test_mask)
        best_homogeneous = max(best_homogeneous, acc)
    assert typed_acc > 0.6  # chance: 0.2
    assert typed_acc > best_homogeneous + 0.15


@pytest.mark.slow
def test_sampled_minibatch_training_learns():
    g = load_dataset(TRAIN)
    torch.manual_seed(0)
    model = build_model(
        "rgcn", schema=g.schema(), hidden=32, out_channels=5, num_layers=2, emb_dim=16
    )
    sampler = TypedNeighborSampler(g, [5, 5], seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    train_ids = torch.nonzero(g.train_mask).view(-1)
    for epoch in range(8):
        sampler.resample(epoch)
        model.train()
        for batch in sampler.batches(train_ids, 90, generator=torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            out, _ = model(model.inputs(g, batch.n_id), batch.blocks)
            F.cross_entropy(out, g.y[batch.n_id["paper"][: batch.batch_size]]).backward()
            opt.step()
    block = TypedBlock.full_graph_ell(g, "max")
    with torch.no_grad():
        acc = _acc(model.eval()(model.inputs(g), block)[0], g.y, g.test_mask)
    assert acc > 0.5  # chance: 0.2
