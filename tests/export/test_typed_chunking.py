"""Typed precompute gathers whole relations in bounded row chunks, with the same result."""

from __future__ import annotations

import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.ell import EllBlock
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.export import typed_modules
from abkd_deploy.export.typed_modules import ChunkedEllBlock, typed_layer_states
from abkd_deploy.models import build_model
from tests.export.conftest import TYPED_DATASET


def _student_and_tables():
    data = load_dataset(TYPED_DATASET)
    torch.manual_seed(0)
    model = build_model(
        "rgcn",
        hidden=16,
        out_channels=data.num_classes,
        num_layers=3,
        dropout=0.0,
        schema=data.schema(),
        emb_dim=8,
    ).eval()
    sampler = TypedNeighborSampler(data, [4, 3, 2], model.norm, seed=0)
    return model, data, sampler.tables


def test_chunked_layer_states_equal_unchunked(monkeypatch):
    model, data, tables = _student_and_tables()
    whole = typed_layer_states(model, data.x_dict, tables)
    calls = []
    original = EllBlock.neighbors

    def counted(self, h):
        calls.append(self.nbr.size(0))
        return original(self, h)

    monkeypatch.setattr(typed_modules, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(EllBlock, "neighbors", counted)
    chunked = typed_layer_states(model, data.x_dict, tables)
    assert len(calls) > 2 * sum(len(t) for t in tables[:-1])  # really split into chunks
    assert len(chunked) == len(whole) == 2
    for a, b in zip(whole, chunked, strict=True):
        assert a.keys() == b.keys()
        for t in a:
            torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-6)


def test_chunk_is_bounded(monkeypatch):
    monkeypatch.setattr(typed_modules, "CHUNK_ELEMENTS", 60)
    nbr = torch.randint(0, 9, (10, 3))
    weight = torch.rand(10, 3)
    h = torch.randn(9, 4)
    seen = []
    original = EllBlock.gather

    def spy(self, x):
        out = original(self, x)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(EllBlock, "gather", spy)
    got = ChunkedEllBlock(nbr, weight, None).neighbors(h)
    assert max(seen) <= 60 and len(seen) == 2  # 5 rows of 3 x 4 per chunk
    want = (weight.unsqueeze(-1) * h[nbr]).sum(1)
    torch.testing.assert_close(got, want)
