"""Planetoid's raw ``ind.<name>.*`` files read without running code from them.

PyG's ``torch_geometric.io.planetoid.read_planetoid_data`` unpickles the files with
``pickle.load``, so a crafted file runs code. :func:`read_planetoid_data` is the same
read step (Cora, CiteSeer and PubMed; same tensors, same order) on top of
:func:`abkd_deploy.data.restricted_pickle.load_restricted`, with the shapes checked so a
malformed file is one :class:`DatasetError` line naming it, not an error from torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.data import Data
from torch_geometric.io.planetoid import edge_index_from_dict
from torch_geometric.utils import index_to_mask

from abkd_deploy.data.restricted_pickle import load_restricted
from abkd_deploy.errors import DatasetError

#: Refuse to densify a feature matrix larger than this (PubMed's allx is 9.1e6 entries).
MAX_DENSE_ENTRIES = 1 << 30


def read_planetoid_data(folder: Path, prefix: str) -> Data:
    """Reads ``folder/ind.<prefix>.{x,tx,allx,y,ty,ally,graph,test.index}`` like PyG does.

    Args:
        folder: The ``raw`` folder.
        prefix: ``cora``, ``citeseer`` or ``pubmed`` (any case).

    Returns:
        ``Data`` with x [N, F] float, edge_index [2, E] int64 (no self loops, coalesced),
        y [N] int64 and the public train/val/test masks [N] bool, equal to PyG's.

    Raises:
        DatasetError: a file is unsafe or malformed; the message names it.
    """
    prefix = prefix.lower()

    def path(name: str) -> Path:
        # Resolved: the cache mirrors the user's files through symlinks; name the real one.
        return (folder / f"ind.{prefix}.{name}").resolve()

    x, tx, allx = (_matrix(path(n)) for n in ("x", "tx", "allx"))
    y, ty, ally = (_matrix(path(n)) for n in ("y", "ty", "ally"))
    graph = _graph(path("graph"))
    test_index = _test_index(path("test.index"))
    folder = path("x").parent
    for a, b, what in ((x, y, "x/y"), (tx, ty, "tx/ty"), (allx, ally, "allx/ally")):
        if a.shape[0] != b.shape[0]:
            raise DatasetError(f"{folder}: {what} have {a.shape[0]} and {b.shape[0]} rows")
    for a, b, what in ((tx, allx, "tx/allx"), (ty, ally, "ty/ally")):
        if a.shape[1] != b.shape[1]:
            raise DatasetError(f"{folder}: {what} have {a.shape[1]} and {b.shape[1]} columns")

    sorted_test_index = test_index.sort()[0]
    if prefix == "citeseer":
        # Isolated CiteSeer nodes have no test row: PyG adds zero rows for them.
        lo = int(test_index.min())
        size = int(test_index.max()) - lo + 1
        if tx.shape[0] != test_index.numel():
            raise DatasetError(f"{path('tx')}: {tx.shape[0]} rows for {size} test ids")
        tx_ext = torch.zeros(size, tx.size(1), dtype=tx.dtype)
        tx_ext[sorted_test_index - lo, :] = tx
        ty_ext = torch.zeros(size, ty.size(1), dtype=ty.dtype)
        ty_ext[sorted_test_index - lo, :] = ty
        tx, ty = tx_ext, ty_ext

    x_all = torch.cat([allx, tx], dim=0)
    n = x_all.size(0)
    if int(test_index.min()) < 0 or int(test_index.max()) >= n:
        raise DatasetError(f"{path('test.index')}: ids outside 0..{n - 1}")
    if y.shape[0] + 500 > n:
        raise DatasetError(f"{folder}: {n} nodes, too few for {y.shape[0]} train + 500 val")
    x_all[test_index] = x_all[sorted_test_index]
    labels = torch.cat([ally, ty], dim=0).max(dim=1)[1]
    labels[test_index] = labels[sorted_test_index]
    _check_graph(graph, n, path("graph"))

    data = Data(x=x_all, edge_index=edge_index_from_dict(graph, num_nodes=n), y=labels)
    data.train_mask = index_to_mask(torch.arange(y.size(0)), size=n)
    data.val_mask = index_to_mask(torch.arange(y.size(0), y.size(0) + 500), size=n)
    data.test_mask = index_to_mask(test_index, size=n)
    return data


def _matrix(path: Path) -> torch.Tensor:
    obj = load_restricted(path)
    if not (sp.issparse(obj) or isinstance(obj, np.ndarray)) or obj.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D array or sparse matrix, got {_what(obj)}")
    if obj.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: expected numbers, got dtype {obj.dtype}")
    if obj.shape[0] * obj.shape[1] > MAX_DENSE_ENTRIES:
        raise DatasetError(f"{path}: {obj.shape[0]} x {obj.shape[1]} is too large to densify")
    dense = np.asarray(obj.todense() if sp.issparse(obj) else obj)
    return torch.from_numpy(dense).to(torch.float)


def _graph(path: Path) -> dict[int, list[int]]:
    obj = load_restricted(path)
    if not isinstance(obj, dict) or not all(
        isinstance(k, int) and isinstance(v, list) and all(isinstance(j, int) for j in v)
        for k, v in obj.items()
    ):
        raise DatasetError(f"{path}: expected a dict of node id -> list of ids, got {_what(obj)}")
    return obj


def _check_graph(graph: dict[int, list[int]], n: int, path: Path) -> None:
    ids = [k for k in graph] + [j for v in graph.values() for j in v]
    if ids and (min(ids) < 0 or max(ids) >= n):
        raise DatasetError(f"{path}: node ids outside 0..{n - 1}")


def _test_index(path: Path) -> torch.Tensor:
    try:
        ids = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise DatasetError(f"{path}: expected one integer per line ({msg})") from None
    if ids.ndim != 1 or ids.size == 0:
        raise DatasetError(f"{path}: expected one integer per line")
    return torch.from_numpy(ids)


def _what(obj: object) -> str:
    shape = getattr(obj, "shape", None)
    return type(obj).__name__ + (f" of shape {shape}" if shape is not None else "")
