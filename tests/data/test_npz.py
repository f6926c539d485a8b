"""The npz bring-your-own-graph format: round trip and clear errors on malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.utils import is_undirected

from abkd_deploy.data.npz import read_npz, save_npz
from abkd_deploy.data.registry import load_dataset
from abkd_deploy.errors import ConfigError, DatasetError

N = 12


def _arrays(**over) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = {
        "x": rng.normal(size=(N, 5)).astype(np.float32),
        "edge_index": np.array(
            [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 5]]
        ),
        "y": np.arange(N) % 3,
        "train_mask": np.arange(N) < 6,
        "val_mask": (np.arange(N) >= 6) & (np.arange(N) < 9),
        "test_mask": np.arange(N) >= 9,
    }
    a.update(over)
    return {k: v for k, v in a.items() if v is not None}


def _write(tmp_path: Path, **over) -> Path:
    path = tmp_path / "graph.npz"
    np.savez(path, **_arrays(**over))
    return path


def test_load_symmetrises_and_drops_self_loops(tmp_path):
    data = load_dataset(f"npz:{_write(tmp_path)}")
    assert data.num_nodes == N and data.num_classes == 3 and data.metric == "accuracy"
    assert is_undirected(data.edge_index) and data.edge_index.size(1) == 22  # 11 pairs, x2
    assert data.train_mask.sum() == 6 and data.x.dtype == torch.float32
    # A directory holding graph.npz works too, and so does --root.
    assert torch.equal(load_dataset(f"npz:{tmp_path}").edge_index, data.edge_index)
    assert torch.equal(load_dataset("npz", root=tmp_path).edge_index, data.edge_index)


def test_index_arrays_edges_and_options(tmp_path):
    path = _write(
        tmp_path,
        edge_index=None,
        edges=np.array([[0, 1], [1, 2], [2, 0]]),
        train_mask=None,
        train_idx=np.array([0, 1, 2]),
        num_classes=np.array(5),
        directed=np.array(True),
    )
    data = read_npz(path)
    assert data.edge_index.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert data.train_mask.nonzero().view(-1).tolist() == [0, 1, 2]
    assert data.num_classes == 5


def test_round_trip(tmp_path):
    data = read_npz(_write(tmp_path))
    data.metric = "roc_auc"
    out = save_npz(data, tmp_path / "sub" / "copy.npz")
    back = load_dataset(f"npz:{out}")
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(back[key], data[key]), key
    assert back.num_classes == 3 and back.metric == "roc_auc"
    assert [p.name for p in out.parent.iterdir()] == ["copy.npz"]  # no temp file left


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        read_npz(path)
    with pytest.raises(DatasetError, match="not found"):
        read_npz(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"y": None}, r"missing key 'y'"),
        ({"edge_index": None}, r"missing key 'edge_index'"),
        ({"test_mask": None}, r"missing key 'test_mask' \(or 'test_idx'\)"),
        ({"x": np.zeros((N, 2, 2))}, r"'x' has shape \(12, 2, 2\).*expected \[N, F\]"),
        ({"x": np.array(["a"] * N)[:, None]}, r"'x' has shape \(12, 1\) dtype <U1"),
        ({"edge_index": np.array([[0, 1], [1, 12]])}, r"'edge_index' holds node ids in \[0, 12\]"),
        ({"edge_index": np.array([[0, -1], [1, 2]])}, r"'edge_index' holds node ids in \[-1, 2\]"),
        ({"edge_index": np.zeros((3, 4), dtype=int)}, r"'edge_index' has shape \(3, 4\)"),
        ({"y": np.linspace(0, 1, N)}, r"'y' has shape \(12,\) dtype float64"),
        ({"y": np.arange(N - 1)}, r"'y' has shape \(11,\).*expected \[12\]"),
        ({"train_mask": np.ones(N, dtype=int)}, r"'train_mask' has shape \(12,\) dtype int64"),
        ({"train_mask": None, "train_idx": np.array([0, 40])}, r"'train_idx' holds node ids"),
        ({"num_classes": np.array(2)}, r"'y' holds labels in \[0, 2\], expected \[0, 2\)"),
        ({"num_classes": np.array([3, 4])}, r"'num_classes' has shape \(2,\)"),
    ],
)
def test_malformed_arrays_are_named(tmp_path, over, match):
    with pytest.raises(DatasetError, match=match):
        read_npz(_write(tmp_path, **over))


def test_bad_names(tmp_path):
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("npz")
    with pytest.raises(ConfigError, match="split '2'"):
        load_dataset(f"npz:{_write(tmp_path)}", split=2)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DatasetError, match=r"single \.npy array"):
        read_npz(tmp_path / "single.npy")
