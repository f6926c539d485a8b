"""res-rgcn: R-GCN with GCNII's initial residual, the deep typed teacher (issue 15)."""

from __future__ import annotations

import pytest
import torch

from abkd_deploy.data.registry import load_dataset
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.errors import ConfigError
from abkd_deploy.models import build_model, load_model, save_model

SMALL = "csbm-mag:num_papers=300,num_classes=4,num_features=16"


def _pair(g, num_layers: int, alpha: float):
    torch.manual_seed(0)
    kw = dict(schema=g.schema(), hidden=12, out_channels=g.num_classes, emb_dim=8)
    res = build_model("res-rgcn", num_layers=num_layers, alpha=alpha, **kw).eval()
    plain = build_model("rgcn", num_layers=num_layers, **kw).eval()
    plain.load_state_dict(res.state_dict())  # the same parameters
    return res, plain


def test_each_hidden_layer_mixes_in_the_first_layers_output():
    g = load_dataset(SMALL)
    res, plain = _pair(g, num_layers=4, alpha=0.3)
    block = TypedBlock.full_graph(g)
    with torch.no_grad():
        logits, hiddens = res(res.inputs(g), block)
        # layer by layer with the plain model's layers (dropout off in eval)
        h = res.embed(res.inputs(g))
        types = lambda i: [t for t in res.node_types if t in res._needed[i]]  # noqa: E731
        first = {t: v.relu() for t, v in plain.layers[0](h, block, types(0)).items()}
        h = first
        for i in (1, 2):
            out = plain.layers[i](h, block, types(i))
            h = {t: 0.7 * v.relu() + 0.3 * first[t] for t, v in out.items()}
            assert torch.allclose(hiddens[i], h["paper"], atol=1e-6)
        ref = plain.layers[3](h, block, types(3))["paper"]
    assert torch.allclose(logits, ref, atol=1e-6)
    assert torch.equal(hiddens[0], first["paper"])
    plain_logits, _ = plain(plain.inputs(g), block)
    assert (plain_logits - logits).abs().max() > 1e-3  # the residual changes the output


@pytest.mark.parametrize("num_layers", [1, 2])
def test_up_to_two_layers_it_is_an_rgcn(num_layers):
    g = load_dataset(SMALL)
    res, plain = _pair(g, num_layers=num_layers, alpha=0.5)
    block = TypedBlock.full_graph(g)
    with torch.no_grad():
        assert torch.equal(res(res.inputs(g), block)[0], plain(plain.inputs(g), block)[0])


def test_sampled_blocks_agree_with_the_full_graph():
    g = load_dataset(SMALL)
    res, _ = _pair(g, num_layers=4, alpha=0.5)
    targets = torch.tensor([7, 250, 3, 119])
    with torch.no_grad():
        full, hiddens = res(res.inputs(g), TypedBlock.full_graph(g))
        batch = TypedNeighborSampler(g, ["max"] * 4).sample(targets)
        out, hid = res(res.inputs(g, batch.n_id), batch.blocks)
    assert (out - full[targets]).abs().max() < 1e-5
    assert (hid[2][:4] - hiddens[2][targets]).abs().max() < 1e-5


def test_alpha_round_trips_and_is_range_checked(tmp_path):
    g = load_dataset(SMALL)
    res, _ = _pair(g, num_layers=3, alpha=0.25)
    save_model(res, tmp_path, "teacher")
    loaded, meta = load_model(tmp_path, "teacher")
    assert meta["model"]["alpha"] == 0.25 and loaded.alpha == 0.25 and loaded.arch == "res-rgcn"
    block = TypedBlock.full_graph(g)
    with torch.no_grad():
        assert torch.equal(res(res.inputs(g), block)[0], loaded(loaded.inputs(g), block)[0])
    with pytest.raises(ConfigError, match=r"res-rgcn: alpha=1.5; expected a value in \[0, 1\]"):
        build_model("res-rgcn", schema=g.schema(), hidden=4, out_channels=4, alpha=1.5)


def test_sixteen_layers_train_where_a_plain_rgcn_does_not():
    g = load_dataset(SMALL)
    losses = {}
    for arch in ("rgcn", "res-rgcn"):
        torch.manual_seed(0)
        model = build_model(
            arch,
            schema=g.schema(),
            hidden=16,
            out_channels=g.num_classes,
            num_layers=16,
            dropout=0.0,
            emb_dim=8,
        )
        block = TypedBlock.full_graph(g)
        optim = torch.optim.Adam(model.parameters(), lr=0.005)
        for _ in range(40):
            optim.zero_grad()
            logits = model(model.inputs(g), block)[0]
            loss = torch.nn.functional.cross_entropy(logits[g.train_mask], g.y[g.train_mask])
            loss.backward()
            optim.step()
        losses[arch] = loss.item()
    assert losses["res-rgcn"] < 0.5 * losses["rgcn"], losses
