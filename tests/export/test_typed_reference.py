"""Typed reference logits, layer by layer over the scored targets' receptive field, in chunks:
the same as the whole-graph forward (exact) and as the sampled blocks (tables)."""

from __future__ import annotations

import itertools

import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.export import typed_reference
from abkd_deploy.export.typed_reference import (
    exact_sources,
    layer_chunks,
    layerwise_logits,
    needed_rows,
    table_sources,
)
from abkd_deploy.models import build_model
from tests.export.conftest import TYPED_DATASET


@torch.no_grad()
def full_graph_logits(student, data) -> torch.Tensor:
    """[N_target, C]: the student on the whole typed graph in one sparse forward."""
    return student(student.inputs(data), TypedBlock.full_graph(data, student.norm))[0].float()


def _student(arch: str, data, layers: int = 3):
    torch.manual_seed(0)
    return build_model(
        arch,
        hidden=16,
        out_channels=data.num_classes,
        num_layers=layers,
        dropout=0.0,
        schema=data.schema(),
        emb_dim=8,
    ).eval()


@pytest.fixture(scope="module")
def data():
    return load_dataset(TYPED_DATASET)


def _count_chunks(monkeypatch, budget: int) -> list[int]:
    """Forces ``budget`` values per chunk; returns the destination rows of each chunk."""
    monkeypatch.setattr(typed_reference, "CHUNK_ELEMENTS", budget)
    seen: list[int] = []
    original = typed_reference.chunk_inputs

    def spy(layer, tail, rows, *args):
        seen.append(int(rows.numel()))
        return original(layer, tail, rows, *args)

    monkeypatch.setattr(typed_reference, "chunk_inputs", spy)
    return seen


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_exact_equals_the_whole_graph_forward_in_small_chunks(arch, data, monkeypatch):
    model = _student(arch, data)
    ids = data.test_mask.nonzero().reshape(-1)
    want = full_graph_logits(model, data)[ids]
    seen = _count_chunks(monkeypatch, 16 * 40)  # ~40 gathered rows of width 16 per chunk
    got = layerwise_logits(model, data, exact_sources(data, model.norm, 3), ids)
    assert len(seen) > 3 * len(data.node_types)  # really split into many chunks
    assert got.shape == (ids.numel(), data.num_classes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["rgcn", "rsage"])
def test_tables_equal_the_sampled_blocks(arch, data, monkeypatch):
    model = _student(arch, data)
    sampler = TypedNeighborSampler(data, [4, 3, 2], model.norm, seed=3)
    ids = data.test_mask.nonzero().reshape(-1)
    batch = sampler.sample(ids)
    with torch.no_grad():
        want = model(model.inputs(data, batch.n_id), batch.blocks)[0]
    seen = _count_chunks(monkeypatch, 16 * 25)
    got = layerwise_logits(model, data, table_sources(sampler.tables, model.norm), ids)
    assert len(seen) > 3 * len(data.node_types)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ids_in_any_order_with_repeats(data):
    model = _student("rgcn", data, layers=2)
    sources = exact_sources(data, model.norm, 2)
    ids = torch.tensor([17, 3, 17, 150, 0])
    got = layerwise_logits(model, data, sources, ids)
    torch.testing.assert_close(got, full_graph_logits(model, data)[ids], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], got[2])


def test_needed_rows_are_the_k_hop_in_neighbourhood(data):
    model = _student("rgcn", data)
    sources = exact_sources(data, model.norm, 3)
    ids = torch.tensor([5, 9])
    levels = needed_rows(sources, data.target, ids)
    assert len(levels) == 4 and torch.equal(levels[-1][data.target], ids)
    for below, above in itertools.pairwise(levels):
        for t, rows in above.items():  # a level's rows are inputs of the level above
            assert torch.isin(rows, below[t]).all()
        for (head, _, tail), ei in data.edge_index_dict.items():
            if tail in above:  # every in-neighbour of a needed row is needed below
                into = torch.isin(ei[1], above[tail])
                assert torch.isin(ei[0][into], below[head]).all()
    one_hop = levels[-2]
    assert sum(v.numel() for v in one_hop.values()) < sum(data.num_nodes_dict.values())


def test_layer_chunks_stay_within_the_budget():
    slots = torch.tensor([3, 3, 9, 1, 1, 1, 12, 2])
    chunks = layer_chunks(slots, 6)
    assert chunks[0] == (0, 2) and chunks[-1][1] == slots.numel()
    assert [a for a, _ in chunks[1:]] == [b for _, b in chunks[:-1]]  # contiguous cover
    for a, b in chunks:
        assert int(slots[a:b].sum()) <= 6 or b - a == 1  # a row above the budget alone
