"""Graph deltas: reading (strict, named errors) and applying (edge multiset semantics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.delta import apply_delta, read_delta, write_delta
from abkd_deploy.errors import DatasetError


def _graph():
    # 0-1, 1-2, 2-3 undirected
    ei = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    return CSR.from_edge_index(ei, 4), torch.arange(8, dtype=torch.float32).reshape(4, 2)


def _edges(csr):
    return {
        (int(s), int(d)) for d, s in zip(csr.dst_index().tolist(), csr.col.tolist(), strict=False)
    }


def test_apply_adds_removes_symmetrises_and_marks_changes(tmp_path):
    csr, x = _graph()
    path = write_delta(
        tmp_path / "d.npz",
        add_edges=np.array([[4, 0], [0, 1]]),  # new node 4 -> 0, and 0 -> 1 (exists)
        remove_edges=np.array([[2], [3]]),
        new_x=np.array([[9.0, 9.0]]),
        update_ids=np.array([1]),
        update_x=np.array([[-1.0, -1.0]]),
    )
    delta = read_delta(path, 4, 2)
    up = apply_delta(csr, x, delta, undirected=True)
    assert _edges(up.csr) == {(0, 1), (1, 0), (1, 2), (2, 1), (4, 0), (0, 4)}
    assert up.csr.num_nodes == 5
    assert up.changed.tolist() == [True, False, True, True, True]
    assert up.updated.tolist() == [False, True, False, False, True]
    assert up.x[4].tolist() == [9.0, 9.0] and up.x[1].tolist() == [-1.0, -1.0]
    assert up.x[0].tolist() == x[0].tolist()
    # lists stay sorted by source within each destination (CSR convention)
    for v in range(5):
        seg = up.csr.col[up.csr.rowptr[v] : up.csr.rowptr[v + 1]]
        assert torch.equal(seg, seg.sort().values)
    directed = apply_delta(csr, x, delta, undirected=False)
    assert (0, 4) not in _edges(directed.csr) and (4, 0) in _edges(directed.csr)


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ({"add_edges": np.array([[0], [9]])}, "outside"),
        ({"add_edges": np.array([[2], [2]])}, "self loop"),
        ({"add_edges": np.array([0, 1])}, r"expected integer \[2, E\]"),
        ({"new_x": np.ones((1, 3))}, r"expected numeric \[rows, 2\]"),
        ({"update_ids": np.array([1, 1]), "update_x": np.ones((2, 2))}, "twice"),
        ({"update_ids": np.array([5]), "update_x": np.ones((1, 2))}, "outside the existing"),
        ({"update_ids": np.array([1]), "update_x": np.ones((2, 2))}, "one row per id"),
        ({"update_ids": np.array([1]), "update_x": np.array([[np.inf, 0]])}, "NaN or inf"),
        ({}, "no change"),
    ],
)
def test_read_refuses_malformed_deltas(tmp_path, parts, match):
    path = tmp_path / "d.npz"
    np.savez(path, **parts)
    with pytest.raises(DatasetError, match=match):
        read_delta(path, 4, 2)


def test_read_refuses_unknown_keys_and_files(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, add_edge=np.array([[0], [1]]))
    with pytest.raises(DatasetError, match="unknown key 'add_edge'"):
        read_delta(path, 4, 2)
    with pytest.raises(DatasetError, match="not found"):
        read_delta(tmp_path / "missing.npz", 4, 2)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable"):
        read_delta(tmp_path / "junk.npz", 4, 2)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, new_x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError):  # allow_pickle=False: never unpickled
        read_delta(pickled, 4, 2)


def test_apply_refuses_removing_a_missing_edge_or_adding_and_removing(tmp_path):
    csr, x = _graph()
    missing = read_delta(write_delta(tmp_path / "a.npz", remove_edges=np.array([[0], [3]])), 4, 2)
    with pytest.raises(DatasetError, match="0 -> 3, which is not an edge"):
        apply_delta(csr, x, missing, undirected=True)
    both = read_delta(
        write_delta(
            tmp_path / "b.npz", add_edges=np.array([[0], [1]]), remove_edges=np.array([[1], [0]])
        ),
        4,
        2,
    )
    with pytest.raises(DatasetError, match="both added and removed"):
        apply_delta(csr, x, both, undirected=True)
