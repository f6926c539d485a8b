"""OGB loading offline through ogb's real loader, on a tiny graph in ogbn-arxiv's raw layout."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.utils import is_undirected

from abkd_deploy.data.ogb import ogb_evaluate
from abkd_deploy.data.registry import load_dataset
from abkd_deploy.errors import ConfigError, DatasetError

N, F, E = 30, 8, 60


def _csv(path: Path, rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, header=False, index=False, compression="gzip")


def write_tiny_arxiv(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes ``root/ogbn_arxiv`` exactly as OGB's arxiv.zip unpacks (binary=False, csv)."""
    rng = np.random.default_rng(seed)
    d = root / "ogbn_arxiv"
    edges = np.stack([rng.integers(0, N, E), rng.integers(0, N, E)], axis=1)
    edges[0] = [3, 3]  # a self loop: must be dropped
    y = rng.integers(0, 40, N)
    (d / "raw").mkdir(parents=True)
    (d / "RELEASE_v1.txt").write_text("# Release note for ogbn-arxiv\n")
    _csv(d / "raw/edge.csv.gz", edges)
    _csv(d / "raw/node-feat.csv.gz", rng.normal(size=(N, F)).astype(np.float32))
    _csv(d / "raw/node-label.csv.gz", y[:, None])
    _csv(d / "raw/node_year.csv.gz", rng.integers(2000, 2020, (N, 1)))
    _csv(d / "raw/num-node-list.csv.gz", np.array([[N]]))
    _csv(d / "raw/num-edge-list.csv.gz", np.array([[E]]))
    split = {"train": np.arange(0, 18), "valid": np.arange(18, 24), "test": np.arange(24, N)}
    for part, idx in split.items():
        _csv(d / f"split/time/{part}.csv.gz", idx[:, None])
    return {"edges": edges, "y": y, **split}


def write_tiny_mag(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes ``root/ogbn_mag`` in OGB's heterogeneous csv layout (RELEASE_v2)."""
    rng = np.random.default_rng(seed)
    d = root / "ogbn_mag"
    counts = {"author": 6, "field_of_study": 4, "institution": 3, "paper": N}
    (d / "raw").mkdir(parents=True)
    (d / "split/time").mkdir(parents=True)
    (d / "RELEASE_v2.txt").write_text("# Release note for ogbn-mag\n")
    pd.DataFrame([counts]).to_csv(d / "raw/num-node-dict.csv.gz", index=False, compression="gzip")
    triplets = [
        ("author", "affiliated_with", "institution"),
        ("author", "writes", "paper"),
        ("paper", "cites", "paper"),
        ("paper", "has_topic", "field_of_study"),
    ]
    _csv(d / "raw/triplet-type-list.csv.gz", np.array(triplets))
    edges = {}
    for i, (h, r, t) in enumerate(triplets):
        e = np.stack([rng.integers(0, counts[h], E), rng.integers(0, counts[t], E)], axis=1)
        edges[r] = e
        _csv(d / f"raw/relations/{h}___{r}___{t}/edge.csv.gz", e)
        _csv(d / f"raw/relations/{h}___{r}___{t}/num-edge-list.csv.gz", np.array([[E]]))
        _csv(d / f"raw/relations/{h}___{r}___{t}/edge_reltype.csv.gz", np.full((E, 1), i))
    _csv(d / "raw/node-feat/paper/node-feat.csv.gz", rng.normal(size=(N, F)))
    _csv(d / "raw/node-feat/paper/node_year.csv.gz", rng.integers(2010, 2020, (N, 1)))
    y = rng.integers(0, 349, N)
    _csv(d / "raw/node-label/paper/node-label.csv.gz", y[:, None])
    has = pd.DataFrame([{t: t == "paper" for t in counts}])
    has.to_csv(d / "raw/nodetype-has-label.csv.gz", index=False, compression="gzip")
    has.to_csv(d / "split/time/nodetype-has-split.csv.gz", index=False, compression="gzip")
    for part, idx in (("train", range(20)), ("valid", range(20, 25)), ("test", range(25, N))):
        _csv(d / f"split/time/paper/{part}.csv.gz", np.array(list(idx))[:, None])
    return {"cites": edges["cites"], "y": y}


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ABKD_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_arxiv_layout_loads_through_ogb(tmp_path):
    root = tmp_path / "ogb"
    raw = write_tiny_arxiv(root)
    before = _listing(root)
    data = load_dataset("ogbn-arxiv", root=root)
    assert _listing(root) == before  # nothing written next to the user's files
    assert data.num_nodes == N and data.x.shape == (N, F) and data.x.dtype == torch.float32
    assert data.num_classes == 40 and data.ogb_name == "ogbn-arxiv"
    assert torch.equal(data.y, torch.as_tensor(raw["y"]))
    assert data.train_mask.sum() == 18 and data.val_mask.sum() == 6 and data.test_mask.sum() == 6
    assert bool(data.test_mask[24:].all()) and not bool(data.train_mask[18:].any())
    assert is_undirected(data.edge_index) and bool((data.edge_index[0] != data.edge_index[1]).all())
    src, dst = raw["edges"][1]
    if src != dst:
        pairs = set(map(tuple, data.edge_index.t().tolist()))
        assert (src, dst) in pairs and (dst, src) in pairs
    # A second load uses the cache and gives the same graph.
    again = load_dataset("ogbn-arxiv", root=root)
    assert torch.equal(again.edge_index, data.edge_index)


def test_mag_becomes_the_paper_subgraph(tmp_path):
    raw = write_tiny_mag(tmp_path)
    data = load_dataset("ogbn-mag-papers", root=tmp_path)  # "ogbn-mag" is the typed graph
    assert data.num_nodes == N and data.num_classes == 349 and data.ogb_name == "ogbn-mag"
    assert torch.equal(data.y, torch.as_tensor(raw["y"]))
    assert (data.train_mask.sum(), data.val_mask.sum(), data.test_mask.sum()) == (20, 5, 5)
    cites = {(int(a), int(b)) for a, b in raw["cites"] if a != b}
    assert set(map(tuple, data.edge_index.t().tolist())) == cites | {(b, a) for a, b in cites}


def test_ogb_evaluate_accepts_labels_and_logits():
    y = torch.tensor([0, 1, 2, 3])
    assert ogb_evaluate("ogbn-arxiv", y, y) == 1.0
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 40).float()
    assert ogb_evaluate("ogbn-arxiv", y.numpy()[:, None], logits) == 0.5
    with pytest.raises(ConfigError, match="ogbn-nope"):
        ogb_evaluate("ogbn-nope", y, y)


def test_missing_release_file_raises_without_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # input() would hit EOF
    root = tmp_path / "ogb"
    write_tiny_arxiv(root)
    (root / "ogbn_arxiv" / "RELEASE_v1.txt").unlink()
    before = _listing(root)
    with pytest.raises(DatasetError, match=r"RELEASE_v1\.txt"):
        load_dataset("ogbn-arxiv", root=root)
    assert _listing(root) == before


def test_missing_raw_and_split_files_are_named(tmp_path):
    root = tmp_path / "ogb"
    write_tiny_arxiv(root)
    (root / "ogbn_arxiv" / "split/time/valid.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"split/time/valid\.csv\.gz"):
        load_dataset("ogbn-arxiv", root=root)
    with pytest.raises(DatasetError, match=r"ogbn_mag/RELEASE_v2\.txt"):
        load_dataset("ogbn-mag", root=root)


def test_root_errors_and_proteins(tmp_path):
    with pytest.raises(ConfigError, match="--root"):
        load_dataset("ogbn-arxiv")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("ogbn-arxiv", root=tmp_path / "nope")
    with pytest.raises(ConfigError, match="multi-label"):
        load_dataset("ogbn-proteins", root=tmp_path)
    write_tiny_arxiv(tmp_path)
    with pytest.raises(ConfigError, match="split '3'"):
        load_dataset("ogbn-arxiv", root=tmp_path, split=3)
