import pytest
import torch

from abkd_deploy.data.csbm import CSBMConfig, generate_csbm
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, TreeBlock, parse_fanout, sample_fanout_table
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.errors import ConfigError
from abkd_deploy.models import build_model


@pytest.fixture(scope="module")
def graph():
    data = generate_csbm(CSBMConfig(num_nodes=800, avg_degree=6, num_features=12))
    return data, CSR.from_edge_index(data.edge_index, data.num_nodes)


def test_exact_table_holds_every_neighbour(graph):
    _, csr = graph
    table = sample_fanout_table(csr, csr.max_degree, seed=1)
    for v in (0, 5, 77):
        nb = csr.col[csr.rowptr[v] : csr.rowptr[v + 1]]
        assert sorted(table.nbr[v, : table.count[v]].tolist()) == sorted(nb.tolist())
        assert bool((table.nbr[v, table.count[v] :] == v).all())  # padding = self


def test_sampled_table_is_seeded_subset(graph):
    _, csr = graph
    a = sample_fanout_table(csr, 3, seed=1)
    b = sample_fanout_table(csr, 3, seed=1)
    c = sample_fanout_table(csr, 3, seed=2)
    assert torch.equal(a.nbr, b.nbr) and not torch.equal(a.nbr, c.nbr)
    assert torch.equal(a.count, csr.degree.clamp(max=3))
    v = int(torch.argmax(csr.degree))
    nb = set(csr.col[csr.rowptr[v] : csr.rowptr[v + 1]].tolist())
    picked = a.nbr[v].tolist()
    assert len(set(picked)) == 3 and set(picked) <= nb  # without replacement


def test_gcn_weights_unbiased_under_sampling(graph):
    _, csr = graph
    exact, _ = sample_fanout_table(csr, csr.max_degree).weights("gcn")
    capped, _ = sample_fanout_table(csr, 2, seed=0).weights("gcn")
    mean_w = capped.sum(1).mean() / exact.sum(1).mean()
    assert 0.8 < float(mean_w) < 1.2
    w_mean, sw = sample_fanout_table(csr, 2).weights("mean")
    assert sw is None
    assert torch.allclose(w_mean.sum(1)[csr.degree > 0], torch.ones(int((csr.degree > 0).sum())))


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gcnii", "mlp"])
def test_ell_equals_full_graph_with_exact_fanout(graph, arch):
    data, csr = graph
    model = build_model(arch, in_channels=12, hidden=8, out_channels=3, num_layers=2).eval()
    table = sample_fanout_table(csr, csr.max_degree)
    with torch.no_grad():
        full, hid_full = model(data.x, FullGraph(csr, model.norm))
        ell, hid_ell = model(data.x, EllBlock.full_graph(table, model.norm))
    assert torch.allclose(full, ell, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hid_full, hid_ell, strict=True))


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gcnii"])
def test_sampled_blocks_and_tree_match_full_graph(graph, arch):
    data, csr = graph
    model = build_model(arch, in_channels=12, hidden=8, out_channels=3, num_layers=2).eval()
    targets = torch.tensor([3, 9, 400, 9 + 1])
    sampler = NeighborSampler(csr, [csr.max_degree] * 2, model.norm)
    batch = sampler.sample(targets)
    assert torch.equal(batch.n_id[:4], targets)
    with torch.no_grad():
        full, _ = model(data.x, FullGraph(csr, model.norm))
        mini, _ = model(data.x[batch.n_id], batch.blocks)
        # tree layout: level l-1 = [self, K slots] of every level-l node
        table = sampler.tables[0]
        w, sw = table.weights(model.norm)
        lvl1 = torch.cat([targets[:, None], table.nbr[targets]], 1).reshape(-1)
        lvl0 = torch.cat([lvl1[:, None], table.nbr[lvl1]], 1).reshape(-1)
        tree = [
            TreeBlock(w[lvl1], None if sw is None else sw[lvl1]),
            TreeBlock(w[targets], None if sw is None else sw[targets]),
        ]
        via_tree, _ = model(data.x[lvl0], tree)
    assert torch.allclose(full[targets], mini, atol=1e-5)
    assert torch.allclose(full[targets], via_tree, atol=1e-5)


def test_target_edges_are_local_and_valid(graph):
    _, csr = graph
    sampler = NeighborSampler(csr, [5, 5], "mean", seed=0)
    batch = sampler.sample(torch.arange(200))
    ei = batch.target_edges()
    assert ei.numel() > 0 and int(ei.max()) < 200
    src, dst = ei
    assert all(
        int(s) in csr.col[csr.rowptr[d] : csr.rowptr[d + 1]].tolist()
        for s, d in zip(src[:20].tolist(), dst[:20].tolist(), strict=True)
    )


def test_parse_fanout():
    assert parse_fanout("max", 17) == 17
    assert parse_fanout("4", 17) == 4
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError, match="fanout"):
            parse_fanout(bad, 17)


@pytest.mark.parametrize("norm", ["gcn", "mean"])
def test_full_graph_gradient_matches_dense(graph, norm):
    _data, csr = graph
    g = FullGraph(csr, norm)
    dense = g._adj.to_dense()
    h = torch.randn(csr.num_nodes, 5, requires_grad=True)
    w = torch.randn(csr.num_nodes, 5)
    (g.neighbors(h) * w).sum().backward()
    assert torch.allclose(h.grad, dense.t() @ w, atol=1e-5)


def test_rows_depend_only_on_the_node_and_its_neighbours(graph):
    """Per-node sampling: dropping edges into some nodes leaves every other row as it was,
    and re-drawing only the changed rows (refresh_table) gives the full re-draw."""
    from abkd_deploy.data.ell import refresh_table

    data, csr = graph
    k = max(1, csr.max_degree // 2)
    before = sample_fanout_table(csr, k, seed=3)
    ei = data.edge_index
    drop = (ei[1] < 40) & (ei[0] % 2 == 0)
    after_csr = CSR.from_edge_index(ei[:, ~drop], data.num_nodes)
    after = sample_fanout_table(after_csr, k, seed=3)
    changed = torch.zeros(data.num_nodes, dtype=torch.bool)
    changed[ei[1][drop]] = True
    assert torch.equal(after.nbr[~changed], before.nbr[~changed])
    assert not torch.equal(after.nbr[changed], before.nbr[changed])
    again = refresh_table(before.nbr, after_csr, changed, k, seed=3)
    assert torch.equal(again.nbr, after.nbr) and torch.equal(again.count, after.count)
    assert not torch.equal(sample_fanout_table(csr, k, seed=4).nbr, before.nbr)
