"""Export-form modules equal the student on the graph operands they replace (no export)."""

import pytest
import torch

from abkd_deploy.data.csbm import CSBMConfig, generate_csbm
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, FanoutTable, sample_fanout_table
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.export.fold import fold_input_transform
from abkd_deploy.export.modules import (
    SUMMING_MAX_WIDTH,
    TABLE_FIRST_ARCHS,
    CooStudent,
    EllStudent,
    EmbeddedStudent,
    FactoredTableBlock,
    TableBlock,
    factored_table,
    summing_matrix,
)
from abkd_deploy.models import build_model

ARCHS = ["gcn", "sage", "gat", "gcnii", "mlp"]


@pytest.fixture(scope="module")
def graph():
    data = generate_csbm(CSBMConfig(num_nodes=300, avg_degree=6, num_features=24))
    return data, CSR.from_edge_index(data.edge_index, data.num_nodes)


def _model(arch: str):
    torch.manual_seed(1)
    return build_model(arch, in_channels=24, hidden=8, out_channels=3, num_layers=2).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_ell_student_exact_equals_full_graph(graph, arch):
    data, csr = graph
    model = _model(arch)
    table = sample_fanout_table(csr, csr.max_degree)
    w, sw = table.weights(model.norm)
    per_layer = [table.nbr, w] + ([sw] if model.norm == "gcn" else [])
    with torch.no_grad():
        full = model(data.x, FullGraph(csr, model.norm))[0]
        ell = EllStudent(model)(data.x, *per_layer, *per_layer)
    assert torch.allclose(full, ell, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_coo_student_equals_full_graph(graph, arch):
    data, csr = graph
    model = _model(arch)
    with torch.no_grad():
        full = model(data.x, FullGraph(csr, model.norm))[0]
        coo = CooStudent(model)(data.x, data.edge_index)
    assert torch.allclose(full, coo, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fold", [True, False])
def test_embedded_student_equals_student_on_same_tables(graph, arch, fold):
    data, csr = graph
    model = _model(arch)
    tables = [sample_fanout_table(csr, 4, seed=s) for s in (0, 1)]
    if fold:
        folded = fold_input_transform(model, data.x)
        assert folded.features.size(1) < data.x.size(1)
        assert (folded.dst_features is not None) == (arch == "sage")
        module = EmbeddedStudent(
            folded.model,
            folded.features,
            tables,
            index_dtype=torch.int32,
            dst_features=folded.dst_features,
            table_first=arch in TABLE_FIRST_ARCHS,
        )
    else:
        module = EmbeddedStudent(model, data.x, tables)
    ids = torch.tensor([5, 5, 0, 299, 17, 5])
    with torch.no_grad():
        ref, hiddens = model(data.x, [EllBlock.full_graph(t, model.norm) for t in tables])
        logits, emb = module(ids)
    assert torch.allclose(ref[ids], logits, atol=1e-5)
    expected_emb = hiddens[-1] if arch == "gcnii" else hiddens[-2]
    assert torch.allclose(expected_emb[ids], emb, atol=1e-5)
    assert module.nbr_1.dtype == (torch.int32 if fold else torch.int64)


def test_factored_table_block_equals_weighted_table_block():
    # node 2 has no neighbour (count 0: every slot is padding), node 1 one of three slots
    nbr = torch.tensor([[1, 2, 0], [0, 1, 1], [2, 2, 2]])
    table = FanoutTable(nbr=nbr, count=torch.tensor([2, 1, 0]), degree=torch.tensor([5, 1, 0]))
    h = torch.randn(3, 4)
    ids = torch.tensor([2, 0, 1, 0])
    w, _ = table.weights("mean")
    plain = TableBlock(nbr[ids], w[ids], None, ids).neighbors(h)
    fnbr, scale = factored_table(table)
    assert fnbr.tolist() == [[1, 2, 3], [0, 3, 3], [3, 3, 3]]  # padding = N, the zero row
    assert scale.flatten().tolist() == [0.5, 1.0, 1.0]
    padded = torch.cat([h, h.new_zeros((1, 4))])
    for summing in (summing_matrix(3, 4), None):  # the MatMul sum, and ReduceSum (wide tables)
        factored = FactoredTableBlock(fnbr[ids], scale[ids], summing, ids).neighbors(padded)
        assert torch.allclose(plain, factored, atol=1e-6)
        assert factored[0].abs().max() == 0  # the isolated node sums zero rows only


@pytest.mark.parametrize("arch", ["sage", "gcn"])
def test_embedded_layer_one_is_factored_for_mean_only(graph, arch):
    data, csr = graph
    model = _model(arch)
    tables = [sample_fanout_table(csr, 4, seed=s) for s in (0, 1)]
    folded = fold_input_transform(model, data.x)
    module = EmbeddedStudent(
        folded.model, folded.features, tables, dst_features=folded.dst_features, table_first=True
    )
    buffers = dict(module.named_buffers())
    n = data.num_nodes
    if arch == "sage":
        assert module.factored and "weight_1" not in buffers and "weight_2" in buffers
        assert module.features.size(0) == n + 1 and module.features[n].abs().max() == 0
        assert torch.equal(module.nbr_1 == n, ~tables[0].mask)
        assert torch.allclose(module.scale_1.flatten(), 1 / tables[0].count.clamp(min=1).float())
    else:  # gcn's slot weights are per source as well: today's layout
        assert not module.factored and "scale_1" not in buffers
        assert module.features.size(0) == n


@pytest.mark.parametrize("hidden", [8, 32])  # summed by the MatMul (<= 16 wide), by ReduceSum
def test_factored_sage_equals_student_at_either_width(graph, hidden):
    data, csr = graph
    torch.manual_seed(2)
    model = build_model("sage", in_channels=24, hidden=hidden, out_channels=3, num_layers=2)
    tables = [sample_fanout_table(csr, 4, seed=s) for s in (0, 1)]
    folded = fold_input_transform(model.eval(), data.x)
    module = EmbeddedStudent(
        folded.model, folded.features, tables, dst_features=folded.dst_features, table_first=True
    )
    assert module.factored and (module.sum_1 is None) == (hidden > SUMMING_MAX_WIDTH)
    ids = torch.tensor([3, 0, 299, 3, 150])
    with torch.no_grad():
        ref, _ = model(data.x, [EllBlock.full_graph(t, model.norm) for t in tables])
        logits, _ = module(ids)
    assert torch.allclose(ref[ids], logits, atol=1e-5)
