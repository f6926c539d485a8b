"""The Planetoid read step equals PyG's, also for CiteSeer's test-id gaps (synthetic files)."""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch_geometric.io.planetoid import read_planetoid_data as pyg_read_planetoid_data

from abkd_deploy.data.planetoid_raw import read_planetoid_data
from abkd_deploy.errors import DatasetError

N_TRAIN, N_ALL, F, C = 8, 540, 6, 3


def write_planetoid(folder: Path, prefix: str, test_ids: np.ndarray, seed: int = 0) -> None:
    """Writes ``ind.<prefix>.*`` as the Planetoid scripts did (csr features, one-hot labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = N_ALL + len(test_ids)

    def features(rows: int) -> sp.csr_matrix:
        return sp.csr_matrix(rng.random((rows, F)) * (rng.random((rows, F)) < 0.4))

    def labels(rows: int) -> np.ndarray:
        return np.eye(C, dtype=np.int32)[rng.integers(0, C, rows)]

    allx, ally = features(N_ALL), labels(N_ALL)
    parts = {
        "x": allx[:N_TRAIN],
        "y": ally[:N_TRAIN],
        "allx": allx,
        "ally": ally,
        "tx": features(len(test_ids)),
        "ty": labels(len(test_ids)),
    }
    top = max(n, int(test_ids.max()) + 1)
    graph = collections.defaultdict(list)
    for a, b in rng.integers(0, top, (4 * top, 2)):
        graph[int(a)].append(int(b))
    graph[3].append(3)  # a self loop, as the real files have
    parts["graph"] = graph
    for name, obj in parts.items():
        (folder / f"ind.{prefix}.{name}").write_bytes(pickle.dumps(obj, protocol=2))
    (folder / f"ind.{prefix}.test.index").write_text("".join(f"{i}\n" for i in test_ids))


@pytest.mark.parametrize("prefix", ["cora", "citeseer"])
def test_equals_pyg_read_step(tmp_path, prefix):
    rng = np.random.default_rng(1)
    if prefix == "citeseer":  # 20 test ids spread over 30 slots: PyG adds zero rows
        test_ids = N_ALL + np.sort(rng.choice(30, 20, replace=False))
    else:
        test_ids = N_ALL + np.arange(20)
    rng.shuffle(test_ids)  # the files list test ids unsorted
    write_planetoid(tmp_path, prefix, test_ids)
    ours = read_planetoid_data(tmp_path, prefix)
    ref = pyg_read_planetoid_data(str(tmp_path), prefix)  # files written by this test
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert ours[key].dtype == ref[key].dtype, key
        assert torch.equal(ours[key], ref[key]), key
    assert ours.num_nodes == (N_ALL + 30 if prefix == "citeseer" else N_ALL + 20)


def test_inconsistent_files_are_named(tmp_path):
    write_planetoid(tmp_path, "cora", N_ALL + np.arange(20))
    (tmp_path / "ind.cora.ty").write_bytes(pickle.dumps(np.eye(C)[[0] * 5], protocol=2))
    with pytest.raises(DatasetError, match=r"tx/ty have 20 and 5 rows"):
        read_planetoid_data(tmp_path, "cora")
    write_planetoid(tmp_path, "cora", N_ALL + np.arange(20))
    graph = {0: [1], 1: [10_000]}
    (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps(graph, protocol=2))
    with pytest.raises(DatasetError, match=r"ind\.cora\.graph: node ids outside 0\.\.559"):
        read_planetoid_data(tmp_path, "cora")
    (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps({0: "1"}, protocol=2))
    with pytest.raises(DatasetError, match=r"ind\.cora\.graph: expected a dict of node id"):
        read_planetoid_data(tmp_path, "cora")
