"""csbm-mag: MAG's schema, determinism, sizes, and labels that depend on typed structure."""

from __future__ import annotations

import pytest
import torch

from abkd_deploy.data.csbm_mag import CSBMMagConfig, generate_csbm_mag
from abkd_deploy.data.registry import load_dataset
from abkd_deploy.data.typed_graph import TypedGraph
from abkd_deploy.errors import ConfigError


def test_schema_is_mags_with_reverse_relations():
    g = load_dataset("csbm-mag")
    assert isinstance(g, TypedGraph) and g.target == "paper"
    assert g.node_types == ["author", "field_of_study", "institution", "paper"]
    assert g.featureless_types == ["author", "field_of_study", "institution"]
    assert g.num_nodes_dict["paper"] == 4000 and g.x_dict["paper"].shape == (4000, 128)
    assert g.num_nodes_dict["author"] == round(4000 * 1134649 / 736389)
    assert set(g.relations) == {
        ("author", "affiliated_with", "institution"),
        ("author", "writes", "paper"),
        ("paper", "cites", "paper"),
        ("paper", "has_topic", "field_of_study"),
        ("institution", "rev_affiliated_with", "author"),
        ("paper", "rev_writes", "author"),
        ("field_of_study", "rev_has_topic", "paper"),
    }
    writes = g.edge_index_dict[("author", "writes", "paper")]
    assert 8.5 < writes.size(1) / 4000 < 9.8  # authors_per_paper 9.7 minus duplicates
    cites = g.edge_index_dict[("paper", "cites", "paper")]
    pairs = set(map(tuple, cites.t().tolist()))
    assert all((b, a) in pairs for a, b in list(pairs)[:500])  # symmetrised
    assert bool((cites[0] != cites[1]).all())
    masks = torch.stack([g.train_mask, g.val_mask, g.test_mask]).int()
    assert bool((masks.sum(0) == 1).all()) and int(g.train_mask.sum()) == 1200


def test_generation_is_deterministic_and_seeded():
    a = generate_csbm_mag(CSBMMagConfig(num_papers=500, seed=3))
    b = generate_csbm_mag(CSBMMagConfig(num_papers=500, seed=3))
    c = generate_csbm_mag(CSBMMagConfig(num_papers=500, seed=4))
    for rel in a.relations:
        assert torch.equal(a.edge_index_dict[rel], b.edge_index_dict[rel])
    assert torch.equal(a.x_dict["paper"], b.x_dict["paper"]) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)


def _vote_accuracy(g: TypedGraph, rel: tuple[str, str, str]) -> float:
    """Predicts a test paper's class from the training labels of papers two hops away via
    ``rel`` (paper -> X -> paper): each X node votes with its papers' label histogram."""
    c, ei = g.num_classes, g.edge_index_dict[rel]
    y = torch.where(g.train_mask, g.y, torch.full_like(g.y, -1))
    known = y[ei[0]] >= 0
    hist = torch.zeros(g.num_nodes_dict[rel[2]], c)
    hist.index_put_((ei[1][known], y[ei[0][known]]), torch.ones(int(known.sum())), accumulate=True)
    score = torch.zeros(g.num_target_nodes, c).index_add_(0, ei[0], hist[ei[1]])
    m = g.test_mask
    return float((score[m].argmax(1) == g.y[m]).float().mean())


def test_labels_depend_on_the_typed_structure():
    g = load_dataset("csbm-mag")
    chance = 1 / g.num_classes
    by_field = _vote_accuracy(g, ("paper", "has_topic", "field_of_study"))
    by_author = _vote_accuracy(g, ("paper", "rev_writes", "author"))
    by_citation = _vote_accuracy(g, ("paper", "cites", "paper"))
    assert by_field > 4 * chance and by_author > 3 * chance
    assert by_field > by_citation + 0.2  # the paper-only view is much weaker evidence
    # Without homophily the typed neighbours carry no information.
    flat = load_dataset("csbm-mag:homophily=0,num_papers=2000")
    assert _vote_accuracy(flat, ("paper", "has_topic", "field_of_study")) < 2 * chance


def test_paper_view_and_options():
    view = load_dataset("csbm-mag-papers:num_papers=600,num_classes=3")
    typed = load_dataset("csbm-mag:num_papers=600,num_classes=3")
    assert torch.equal(view.x, typed.x_dict["paper"]) and torch.equal(view.y, typed.y)
    assert view.edge_index.size(1) == typed.edge_index_dict[("paper", "cites", "paper")].size(1)
    with pytest.raises(ConfigError, match="unknown csbm-mag option 'nope'"):
        load_dataset("csbm-mag:nope=1")
    with pytest.raises(ConfigError, match="homophily=2.0"):
        load_dataset("csbm-mag:homophily=2")
    with pytest.raises(ConfigError, match="single split"):
        load_dataset("csbm-mag", split="3")
