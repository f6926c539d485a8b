"""Planetoid and heterophilous datasets through PyG's classes, read-only from --root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_geometric.utils import is_undirected

from abkd_deploy.data.registry import load_dataset
from abkd_deploy.errors import ConfigError, DatasetError


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ABKD_CACHE", str(tmp_path_factory.mktemp("cache")))


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")
    )


def test_cora_public_split(planetoid_root):
    before = _listing(planetoid_root)
    data = load_dataset("planetoid:Cora", root=planetoid_root)
    assert _listing(planetoid_root) == before
    assert data.num_nodes == 2708 and data.num_classes == 7 and data.metric == "accuracy"
    assert [int(data[m].sum()) for m in ("train_mask", "val_mask", "test_mask")] == [
        140,
        500,
        1000,
    ]
    assert is_undirected(data.edge_index) and bool((data.edge_index[0] != data.edge_index[1]).all())
    # Names are case-insensitive and a second load comes from the cache.
    again = load_dataset("planetoid:cora", root=planetoid_root)
    assert torch.equal(again.edge_index, data.edge_index)


def test_cora_full_and_random_splits(planetoid_root):
    full = load_dataset("planetoid:Cora", root=planetoid_root, split="full")
    assert int(full.train_mask.sum()) == 2708 - 1500
    rand = load_dataset("planetoid:Cora", root=planetoid_root, split="random")
    assert int(rand.train_mask.sum()) == 140 and int(rand.test_mask.sum()) == 1000
    again = load_dataset("planetoid:Cora", root=planetoid_root, split="random")
    assert torch.equal(rand.train_mask, again.train_mask)  # seeded: reproducible


def test_planetoid_bad_values(planetoid_root, tmp_path):
    with pytest.raises(ConfigError, match=r"'geom' .*public, full, random"):
        load_dataset("planetoid:Cora", root=planetoid_root, split="geom")
    with pytest.raises(ConfigError, match=r"'Cornell'.*Cora, CiteSeer, PubMed"):
        load_dataset("planetoid:Cornell", root=planetoid_root)
    with pytest.raises(ConfigError, match="--root"):
        load_dataset("planetoid:Cora")


def test_missing_raw_files_raise_without_download(tmp_path):
    (tmp_path / "Cora" / "raw").mkdir(parents=True)
    (tmp_path / "Cora" / "raw" / "ind.cora.x").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"Cora/raw/ind\.cora\.tx"):
        load_dataset("planetoid:Cora", root=tmp_path)
    with pytest.raises(DatasetError, match=r"tolokers/raw/tolokers\.npz"):
        load_dataset("heterophilous:Tolokers", root=tmp_path)
    assert _listing(tmp_path) == [("Cora", -1), ("Cora/raw", -1), ("Cora/raw/ind.cora.x", 0)]


def test_tolokers(heterophilous_root):
    before = _listing(heterophilous_root)
    data = load_dataset("heterophilous:Tolokers", root=heterophilous_root)
    assert _listing(heterophilous_root) == before
    assert data.num_nodes == 11758 and data.num_classes == 2 and data.metric == "roc_auc"
    assert is_undirected(data.edge_index)
    other = load_dataset("heterophilous:tolokers", root=heterophilous_root, split="1")
    assert not torch.equal(other.train_mask, data.train_mask)
    assert torch.equal(other.edge_index, data.edge_index)
    for bad in ("10", "-1", "public"):
        with pytest.raises(ConfigError, match=rf"split '{bad}'.*0-9"):
            load_dataset("heterophilous:Tolokers", root=heterophilous_root, split=bad)
    with pytest.raises(ConfigError, match="Roman-empire"):
        load_dataset("heterophilous:Cornell", root=heterophilous_root)
