"""Our GCN, SAGE, GAT and GCNII layers against PyG's own layers, weight for weight.

Each test copies the weights of one of our layers into the matching PyG layer and compares
the outputs on a random directed graph (no self loops, so PyG's ``add_self_loops`` adds
exactly the self term our normalisations assume; one node without in-neighbours). Both our
operands are checked: the sparse :class:`~abkd_deploy.data.graph.FullGraph` used for
training and the exact padded table (:class:`~abkd_deploy.data.ell.EllBlock`, fanout = max
degree) that the ``ell`` / ``embedded`` exports run.

Differences from PyG by design, not tested as equal: our layers take a graph *operand*
instead of ``edge_index``; ``GCNLayer`` and ``GCNIILayer`` have no ``cached`` / ``improved``
/ ``normalize=False`` variants; ``GATLayer`` has no attention dropout, edge features or
residual; ``GCNIILayer`` has ``shared_weights=True`` only. With a fanout below the maximum
degree the padded operands sample neighbours and differ from PyG by construction.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.nn import GATConv, GCN2Conv, GCNConv, SAGEConv

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, sample_fanout_table
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.models.gat import GATLayer
from abkd_deploy.models.gcn import GCNLayer
from abkd_deploy.models.gcnii import GCNIILayer
from abkd_deploy.models.sage import SAGELayer

N, F_IN, F_OUT = 40, 7, 6
ATOL = 1e-5
OPERANDS = ["full", "ell"]


@pytest.fixture(scope="module")
def edge_index() -> torch.Tensor:
    """[2, E] random directed edges, unique, no self loops; node N - 1 has no in-edges."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, N, (200,), generator=g)
    dst = torch.randint(0, N - 1, (200,), generator=g)
    keep = src != dst
    pairs = torch.unique(torch.stack([src[keep], dst[keep]]), dim=1)
    assert pairs.size(1) > 100 and not bool((pairs[1] == N - 1).any())
    return pairs


def operand(edge_index: torch.Tensor, norm: str, kind: str):
    """Our graph operand of ``kind`` (``full``: sparse CSR; ``ell``: exact padded table)."""
    csr = CSR.from_edge_index(edge_index, N)
    if kind == "full":
        return FullGraph(csr, norm)
    return EllBlock.full_graph(sample_fanout_table(csr, max(1, csr.max_degree)), norm)


def features(width: int, seed: int) -> torch.Tensor:
    return torch.randn(N, width, generator=torch.Generator().manual_seed(seed))


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter with N(0, 1) draws (zero-initialised biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.2e} > {ATOL}"
    assert theirs.abs().max().item() > 0.1  # not a trivial all-zero comparison


@pytest.mark.parametrize("kind", OPERANDS)
def test_gcn_layer_matches_gcnconv(edge_index, kind) -> None:
    ours = GCNLayer(F_IN, F_OUT)
    randomize_(ours, 1)
    theirs = GCNConv(F_IN, F_OUT)  # add_self_loops=True, normalize=True: D^-1/2 (A+I) D^-1/2
    with torch.no_grad():
        theirs.lin.weight.copy_(ours.lin.weight)
        theirs.bias.copy_(ours.bias)
    x = features(F_IN, 2)
    assert_close(ours(x, operand(edge_index, "gcn", kind)), theirs(x, edge_index))


@pytest.mark.parametrize("kind", OPERANDS)
def test_sage_layer_matches_sageconv_mean(edge_index, kind) -> None:
    ours = SAGELayer(F_IN, F_OUT)
    randomize_(ours, 3)
    theirs = SAGEConv(F_IN, F_OUT, aggr="mean")  # lin_l(mean_u x_u) + lin_r(x_v)
    with torch.no_grad():
        theirs.lin_l.weight.copy_(ours.lin_l.weight)
        theirs.lin_l.bias.copy_(ours.lin_l.bias)
        theirs.lin_r.weight.copy_(ours.lin_r.weight)
    x = features(F_IN, 4)
    out = ours(x, operand(edge_index, "mean", kind))
    assert_close(out, theirs(x, edge_index))
    isolated = x[N - 1] @ ours.lin_r.weight.T + ours.lin_l.bias  # no neighbours: mean is 0
    assert torch.allclose(out[N - 1], isolated, atol=ATOL)


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize(("heads", "concat"), [(3, True), (1, False), (2, False)])
def test_gat_layer_matches_gatconv(edge_index, kind, heads, concat) -> None:
    width = F_OUT if concat else F_OUT // 2  # per-head width F_OUT / heads when concatenated
    out_channels = heads * width if concat else width
    ours = GATLayer(F_IN, out_channels, heads, concat)
    randomize_(ours, 5)
    theirs = GATConv(F_IN, width, heads=heads, concat=concat, negative_slope=0.2)
    with torch.no_grad():
        theirs.lin.weight.copy_(ours.lin.weight)
        theirs.att_src.copy_(ours.att_src.unsqueeze(0))  # PyG: [1, H, C]; ours: [H, C]
        theirs.att_dst.copy_(ours.att_dst.unsqueeze(0))
        theirs.bias.copy_(ours.bias)
    theirs.eval()  # attention dropout is 0 anyway; PyG adds self loops as we do
    x = features(F_IN, 6)
    assert_close(ours(x, operand(edge_index, "gat", kind)), theirs(x, edge_index))


@pytest.mark.parametrize("kind", OPERANDS)
@pytest.mark.parametrize("layer", [1, 4])
def test_gcnii_layer_matches_gcn2conv(edge_index, kind, layer) -> None:
    alpha, theta, channels = 0.1, 0.5, 8
    beta = math.log(theta / layer + 1)  # what GCNII.__init__ gives layer `layer` (1-based)
    ours = GCNIILayer(channels, alpha, beta)
    randomize_(ours, 7)
    theirs = GCN2Conv(channels, alpha=alpha, theta=theta, layer=layer, shared_weights=True)
    assert theirs.beta == pytest.approx(beta)
    with torch.no_grad():
        theirs.weight1.copy_(ours.lin.weight.T)  # PyG: out @ W1; ours: lin(out) = out @ W^T
    h, h0 = features(channels, 8), features(channels, 9)
    assert_close(ours(h, h0, operand(edge_index, "gcn", kind)), theirs(h, h0, edge_index))
