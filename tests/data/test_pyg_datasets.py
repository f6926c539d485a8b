"""Planetoid and heterophilous datasets through PyG's classes, read-only from --root."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.utils import is_undirected

from abkd_deploy.data.pyg_datasets import clean_edges
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


class _Payload:
    """Unpickling it opens ``path`` for writing: creates a file, as a crafted file would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _copy_cora(planetoid_root: Path, dst: Path) -> Path:
    shutil.copytree(planetoid_root / "Cora", dst / "Cora")
    return dst


@pytest.mark.parametrize("name", ["x", "graph"])
def test_planetoid_raw_payload_never_runs(planetoid_root, tmp_path, name):
    root = _copy_cora(planetoid_root, tmp_path / "data")
    marker = tmp_path / "pwned"
    target = root / "Cora" / "raw" / f"ind.cora.{name}"
    target.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(DatasetError) as err:
        load_dataset("planetoid:Cora", root=root)
    msg = str(err.value)
    # Names the user's file, not its mirror in the cache.
    assert f"refusing to unpickle {target.resolve()}:" in msg and "\n" not in msg
    assert not marker.exists()


def test_planetoid_malformed_raw_files(planetoid_root, tmp_path):
    root = _copy_cora(planetoid_root, tmp_path / "data")
    raw = root / "Cora" / "raw"
    good = (raw / "ind.cora.x").read_bytes()
    (raw / "ind.cora.x").write_bytes(pickle.dumps({"not": "a matrix"}, protocol=2))
    with pytest.raises(DatasetError, match=r"ind\.cora\.x: expected a 2-D array"):
        load_dataset("planetoid:Cora", root=root)
    (raw / "ind.cora.x").write_bytes(good)
    (raw / "ind.cora.test.index").write_text("12\nbanana\n")
    with pytest.raises(DatasetError, match=r"ind\.cora\.test\.index: expected one integer"):
        load_dataset("planetoid:Cora", root=root)
    (raw / "ind.cora.test.index").write_text("99999\n")
    with pytest.raises(DatasetError, match=r"ind\.cora\.test\.index: ids outside"):
        load_dataset("planetoid:Cora", root=root)


@pytest.mark.parametrize("split", ["public", "full", "random"])
def test_planetoid_equals_pyg_loader(planetoid_root, tmp_path, split):
    from torch_geometric.datasets import Planetoid

    ours = load_dataset("planetoid:Cora", root=planetoid_root, split=split)
    # PyG's own loader (its full unpickler) only ever sees a copy of the trusted fixture.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = Planetoid(str(_copy_cora(planetoid_root, tmp_path)), "Cora", split=split)[0]
    for key in ("x", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(ours[key], ref[key]), key
    # PyG's edges are symmetric but sorted by column; the contract sorts by row.
    assert torch.equal(ours.edge_index, clean_edges(ref.edge_index, ref.num_nodes))
    assert ours.edge_index.size(1) == ref.edge_index.size(1) == 10556


def _processed(family: str, name: str) -> Path:
    (hit,) = (Path(os.environ["ABKD_CACHE"]) / family).glob(f"*/{name}/processed")
    return hit


def test_poisoned_planetoid_cache_never_runs(planetoid_root, tmp_path):
    clean = load_dataset("planetoid:Cora", root=planetoid_root)
    processed = _processed("planetoid", "Cora")
    marker = tmp_path / "pwned"
    # PyG unpickles pre_transform.pt with weights_only=False on every cached load.
    torch.save(_Payload(marker), processed / "pre_transform.pt")
    again = load_dataset("planetoid:Cora", root=planetoid_root)
    assert torch.equal(again.x, clean.x) and not marker.exists()
    # PyG retries data.pt with weights_only=False when the safe load names a global.
    torch.save(_Payload(marker), processed / "data.pt")
    with pytest.raises(DatasetError, match=r"refusing to load dataset cache .*data\.pt") as err:
        load_dataset("planetoid:Cora", root=planetoid_root)
    assert "\n" not in str(err.value) and not marker.exists()


def test_poisoned_heterophilous_cache_never_runs(heterophilous_root, tmp_path):
    load_dataset("heterophilous:Tolokers", root=heterophilous_root)
    processed = _processed("heterophilous", "tolokers")
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), processed / "pre_transform.pt")
    load_dataset("heterophilous:Tolokers", root=heterophilous_root)
    assert not marker.exists()
    torch.save(_Payload(marker), processed / "data.pt")
    with pytest.raises(DatasetError, match=r"refusing to load dataset cache .*data\.pt"):
        load_dataset("heterophilous:Tolokers", root=heterophilous_root)
    assert not marker.exists()


def test_poisoned_ogb_cache_never_runs(tmp_path, monkeypatch):
    from tests.data.test_ogb import write_tiny_arxiv

    write_tiny_arxiv(tmp_path / "ogb")
    clean = load_dataset("ogbn-arxiv", root=tmp_path / "ogb")
    processed = _processed("ogb", "ogbn_arxiv")
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), processed / "pre_transform.pt")
    again = load_dataset("ogbn-arxiv", root=tmp_path / "ogb")
    assert torch.equal(again.x, clean.x) and not marker.exists()
    torch.save(_Payload(marker), processed / "geometric_data_processed.pt")
    with pytest.raises(DatasetError, match="refusing to load the ogbn-arxiv cache") as err:
        load_dataset("ogbn-arxiv", root=tmp_path / "ogb")
    assert "\n" not in str(err.value) and not marker.exists()
    # Where OGB's bare torch.load() would be the full unpickler, OGB is not run at all.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ConfigError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        load_dataset("ogbn-arxiv", root=tmp_path / "ogb")
    assert not marker.exists()


def test_cache_writable_by_others_is_refused(planetoid_root):
    load_dataset("planetoid:Cora", root=planetoid_root)
    data_pt = _processed("planetoid", "Cora") / "data.pt"
    data_pt.chmod(data_pt.stat().st_mode | 0o002)
    old = os.umask(0o022)  # under umask 000, world-writable would be the user's own choice
    try:
        with pytest.raises(DatasetError, match=r"cache .*data\.pt: writable by every user"):
            load_dataset("planetoid:Cora", root=planetoid_root)
        os.umask(0)
        assert load_dataset("planetoid:Cora", root=planetoid_root).num_nodes == 2708
    finally:
        os.umask(old)


def test_heterophilous_object_arrays_are_never_unpickled(heterophilous_root, tmp_path):
    raw = tmp_path / "data" / "tolokers" / "raw"
    raw.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with np.load(heterophilous_root / "tolokers" / "raw" / "tolokers.npz") as real:
        arrays = dict(real)
    arrays["node_features"] = np.array([_Payload(marker)], dtype=object)
    np.savez(raw / "tolokers.npz", **arrays)
    with pytest.raises(DatasetError, match=r"tolokers\.npz: .*allow_pickle=False") as err:
        load_dataset("heterophilous:Tolokers", root=tmp_path / "data")
    assert "\n" not in str(err.value) and not marker.exists()
