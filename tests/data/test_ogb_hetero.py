"""Typed graphs in OGB's raw layout: ogbn-mag's exact layout, another schema, the writer."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abkd_deploy.data.ogb import REQUIRED_FILES, _safe_globals
from abkd_deploy.data.ogb_hetero import read_ogb_hetero, save_ogb_hetero
from abkd_deploy.data.registry import load_dataset
from abkd_deploy.data.typed_graph import TypedGraph
from abkd_deploy.errors import ConfigError, DatasetError

MAG_COUNTS = {"author": 12, "field_of_study": 5, "institution": 3, "paper": 40}
MAG_RELATIONS = [
    ("author", "affiliated_with", "institution"),
    ("author", "writes", "paper"),
    ("paper", "cites", "paper"),
    ("paper", "has_topic", "field_of_study"),
]


def _edges(rng, n_head: int, n_tail: int, e: int) -> torch.Tensor:
    pairs = np.unique(np.stack([rng.integers(0, n_head, e), rng.integers(0, n_tail, e)]), axis=1)
    return torch.from_numpy(pairs.astype(np.int64))


def tiny_mag(seed: int = 0) -> TypedGraph:
    rng = np.random.default_rng(seed)
    n = MAG_COUNTS["paper"]
    edges = {r: _edges(rng, MAG_COUNTS[r[0]], MAG_COUNTS[r[2]], 70) for r in MAG_RELATIONS}
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    masks[0][:24], masks[1][24:32], masks[2][32:] = True, True, True
    return TypedGraph(
        num_nodes_dict=dict(MAG_COUNTS),
        x_dict={"paper": torch.from_numpy(rng.normal(size=(n, 6)).astype(np.float32))},
        edge_index_dict=edges,
        target="paper",
        y=torch.from_numpy(rng.integers(0, 349, n)),
        train_mask=masks[0],
        val_mask=masks[1],
        test_mask=masks[2],
        num_classes=349,
    )


def write_mag(root: Path, graph: TypedGraph) -> Path:
    """``root/ogbn_mag`` exactly as OGB's mag.zip unpacks (RELEASE_v2, node_year, reltype)."""
    years = np.random.default_rng(1).integers(2010, 2020, (graph.num_target_nodes, 1))
    reltype = {
        r: np.full((graph.edge_index_dict[r].size(1), 1), i) for i, r in enumerate(MAG_RELATIONS)
    }
    d = save_ogb_hetero(
        graph,
        root / "ogbn_mag",
        split_name="time",
        node_files={"node_year": {"paper": years}},
        edge_files={"edge_reltype": reltype},
    )
    (d / "RELEASE_v2.txt").write_text("# Release note for ogbn-mag\n")
    return d


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()
    )


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ABKD_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_mag_layout_loads_through_ogb_and_the_registry(tmp_path):
    graph = tiny_mag()
    d = write_mag(tmp_path, graph)
    for f in REQUIRED_FILES["ogbn-mag"]:
        assert (d / f).is_file(), f
    for h, r, t in MAG_RELATIONS:
        assert (d / f"raw/relations/{h}___{r}___{t}/edge_reltype.csv.gz").is_file()
    assert sorted(p.name for p in (d / "split").iterdir()) == ["time"]
    before = _listing(tmp_path)

    # OGB's own dataset class reads the layout (on a copy: it writes processed/).
    from ogb.nodeproppred import PygNodePropPredDataset

    copy = tmp_path.parent / (tmp_path.name + "-ogb")
    shutil.copytree(tmp_path, copy)
    with torch.serialization.safe_globals(_safe_globals()), contextlib.redirect_stdout(sys.stderr):
        ds = PygNodePropPredDataset("ogbn-mag", root=str(copy))
        split = ds.get_idx_split()
    g = ds[0]
    assert g.num_nodes_dict == MAG_COUNTS
    for rel in MAG_RELATIONS:
        assert torch.equal(g.edge_index_dict[rel], graph.edge_index_dict[rel])
    assert torch.allclose(g.x_dict["paper"], graph.x_dict["paper"])
    assert torch.equal(g.y_dict["paper"].view(-1), graph.y)
    assert g.node_year["paper"].shape == (40, 1) and len(g.edge_reltype) == 4
    assert torch.equal(split["test"]["paper"], torch.arange(32, 40))

    typed = load_dataset("ogbn-mag", root=tmp_path)
    assert _listing(tmp_path) == before  # nothing written under --root
    assert (
        isinstance(typed, TypedGraph) and typed.target == "paper" and typed.ogb_name == "ogbn-mag"
    )
    assert typed.num_nodes_dict == MAG_COUNTS and typed.num_classes == 349
    assert typed.featureless_types == ["author", "field_of_study", "institution"]
    assert torch.equal(typed.x_dict["paper"], graph.x_dict["paper"])  # float32 survives csv
    assert torch.equal(typed.y, graph.y)
    assert [int(m.sum()) for m in (typed.train_mask, typed.val_mask, typed.test_mask)] == [24, 8, 8]
    # 4 relations + 3 reverse ones; cites symmetrised.
    assert len(typed.relations) == 7
    rev = typed.edge_index_dict[("paper", "rev_writes", "author")]
    assert torch.equal(rev, graph.edge_index_dict[("author", "writes", "paper")].flip(0))
    cites = {tuple(e) for e in graph.edge_index_dict[("paper", "cites", "paper")].t().tolist()}
    sym = {tuple(e) for e in typed.edge_index_dict[("paper", "cites", "paper")].t().tolist()}
    assert sym == cites | {(b, a) for a, b in cites}
    assert typed.reverse_of[("paper", "rev_writes", "author")] == ("author", "writes", "paper")

    # The paper-only view keeps its former behaviour under its explicit name.
    papers = load_dataset("ogbn-mag-papers", root=tmp_path)
    view = typed.target_view()
    assert torch.equal(papers.edge_index, view.edge_index) and torch.equal(papers.y, view.y)
    with pytest.raises(ConfigError, match=r"typed graph.*rgcn.*ogbn-mag-papers"):
        _ = typed.num_features


def _user_item_graph(seed: int = 0) -> TypedGraph:
    rng = np.random.default_rng(seed)
    counts = {"user": 15, "item": 25, "category": 4}
    rels = [
        ("user", "clicked", "item"),
        ("item", "in", "category"),
        ("item", "also_bought", "item"),
    ]
    y = torch.from_numpy(rng.integers(0, 3, 25))
    y[20:] = -1  # unlabelled items outside every split
    masks = [torch.zeros(25, dtype=torch.bool) for _ in range(3)]
    masks[0][:12], masks[1][12:16], masks[2][16:20] = True, True, True
    return TypedGraph(
        num_nodes_dict=counts,
        x_dict={"item": torch.from_numpy(rng.normal(size=(25, 3)).astype(np.float32))},
        edge_index_dict={r: _edges(rng, counts[r[0]], counts[r[2]], 40) for r in rels},
        target="item",
        y=y,
        train_mask=masks[0],
        val_mask=masks[1],
        test_mask=masks[2],
        num_classes=3,
    )


def test_another_schema_loads_through_ogb_hetero(tmp_path):
    graph = _user_item_graph()
    d = save_ogb_hetero(graph, tmp_path / "shop", split_name="by_user")
    loaded = load_dataset(f"ogb-hetero:{d}")
    assert loaded.target == "item" and loaded.num_classes == 3
    assert loaded.node_types == ["category", "item", "user"]
    assert loaded.featureless_types == ["category", "user"]
    assert torch.equal(loaded.y, graph.y) and int((loaded.y == -1).sum()) == 5
    assert set(loaded.relations) == {
        ("user", "clicked", "item"),
        ("item", "rev_clicked", "user"),
        ("item", "in", "category"),
        ("category", "rev_in", "item"),
        ("item", "also_bought", "item"),
    }
    assert torch.equal(loaded.test_mask, graph.test_mask)
    # Relative to --root, and a second split that must then be named.
    save_ogb_hetero(graph, tmp_path / "shop2", split_name="a")
    shutil.copytree(tmp_path / "shop2/split/a", tmp_path / "shop2/split/b")
    with pytest.raises(ConfigError, match=r"several splits \(a, b\).*--split"):
        load_dataset("ogb-hetero:shop2", root=tmp_path)
    assert load_dataset("ogb-hetero:shop2", root=tmp_path, split="b").target == "item"
    with pytest.raises(ConfigError, match="unknown split 'c'"):
        load_dataset("ogb-hetero:shop2", root=tmp_path, split="c")


def test_writer_round_trip_is_exact(tmp_path):
    first = load_dataset(f"ogb-hetero:{save_ogb_hetero(_user_item_graph(1), tmp_path / 'a')}")
    again = read_ogb_hetero(save_ogb_hetero(first, tmp_path / "b"))
    assert again.schema() == first.schema()
    for rel in first.relations:
        assert torch.equal(again.edge_index_dict[rel], first.edge_index_dict[rel]), rel
    assert torch.equal(again.x_dict["item"], first.x_dict["item"])
    for key in ("y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(getattr(again, key), getattr(first, key))


def test_bad_inputs_fail_with_clear_errors(tmp_path):
    d = save_ogb_hetero(_user_item_graph(), tmp_path / "g")
    with pytest.raises(ConfigError, match="not an empty folder"):
        save_ogb_hetero(_user_item_graph(), d)
    (d / "raw/triplet-type-list.csv.gz").unlink()
    with pytest.raises(DatasetError, match="triplet-type-list"):
        load_dataset(f"ogb-hetero:{d}")
    with pytest.raises(ConfigError, match="ogb-hetero:<dir>"):
        load_dataset("ogb-hetero")
    bad = _user_item_graph()
    bad.train_mask[22] = True  # an unlabelled node in the training split
    with pytest.raises(DatasetError, match="without a label"):
        save_ogb_hetero(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
