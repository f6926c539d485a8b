"""Graph deltas: new nodes, added / removed edges and feature updates (``refresh``).

A delta is an ``.npz`` file (``numpy.savez``, read with ``allow_pickle=False``), all keys
optional but at least one change (DESIGN.md section 9, docs/FORMATS.md "Delta"):

================  ===========  ====================================================
key               shape        content
================  ===========  ====================================================
``add_edges``     [2, E+]      integer ``(source, destination)`` ids in [0, N + M)
``remove_edges``  [2, E-]      integer ids of existing edges, in [0, N)
``new_x``         [M, F]       features of the new nodes; they get ids N .. N+M-1
``update_ids``    [U]          distinct ids of existing nodes whose features change
``update_x``      [U, F]       their new features
================  ===========  ====================================================

Edges are symmetrised when the graph is undirected (as the dataset loaders do). Adding
an edge that exists already changes nothing; removing one that does not exist, a self
loop, an edge both added and removed, NaN / inf features or an unknown key is refused
with a :class:`~abkd_deploy.errors.DatasetError` naming the key and the value.
:func:`write_delta` writes one from Python.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from abkd_deploy.data.csr import CSR
from abkd_deploy.errors import DatasetError
from abkd_deploy.files import atomic_path

KEYS = ("add_edges", "remove_edges", "new_x", "update_ids", "update_x")


@dataclass
class Delta:
    """One validated change set (see the module docstring for the shapes)."""

    add_edges: np.ndarray
    remove_edges: np.ndarray
    new_x: np.ndarray
    update_ids: np.ndarray
    update_x: np.ndarray

    @property
    def num_new_nodes(self) -> int:
        return int(self.new_x.shape[0])

    def counts(self) -> dict[str, int]:
        """Sizes of the delta's parts, for the manifest and the log."""
        return {
            "new_nodes": self.num_new_nodes,
            "added_edges": int(self.add_edges.shape[1]),
            "removed_edges": int(self.remove_edges.shape[1]),
            "updated_features": int(self.update_ids.shape[0]),
        }


def write_delta(
    path: str | Path,
    add_edges: np.ndarray | None = None,
    remove_edges: np.ndarray | None = None,
    new_x: np.ndarray | None = None,
    update_ids: np.ndarray | None = None,
    update_x: np.ndarray | None = None,
) -> Path:
    """Writes a delta file (atomically); ``None`` parts are left out."""
    parts = {
        "add_edges": add_edges,
        "remove_edges": remove_edges,
        "new_x": new_x,
        "update_ids": update_ids,
        "update_x": update_x,
    }
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in parts.items() if v is not None})
    return path


def read_delta(path: str | Path, num_nodes: int, num_features: int) -> Delta:
    """Reads and checks a delta against a graph of ``num_nodes`` nodes, ``num_features`` wide.

    Raises:
        DatasetError: unreadable file, unknown key, wrong shape / dtype, id out of range,
            duplicate update id, non-finite feature, or no change at all.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DatasetError(f"{path} is a single .npy array, expected an .npz delta")
            arrays = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise DatasetError(f"delta file {str(path)!r} not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path} is not a readable .npz delta: {exc}") from None
    unknown = sorted(set(arrays) - set(KEYS))
    if unknown:
        raise DatasetError(f"delta {path.name}: unknown key {unknown[0]!r}; expected any of {KEYS}")
    width = int(num_features)
    new_x = _features(arrays.get("new_x"), "new_x", width, path)
    total = int(num_nodes) + new_x.shape[0]
    add = _edges(arrays.get("add_edges"), "add_edges", total, path)
    remove = _edges(arrays.get("remove_edges"), "remove_edges", int(num_nodes), path)
    ids = _ids(arrays.get("update_ids"), int(num_nodes), path)
    update_x = _features(arrays.get("update_x"), "update_x", width, path)
    if update_x.shape[0] != ids.shape[0]:
        raise DatasetError(
            f"delta {path.name}: update_x has {update_x.shape[0]} rows but update_ids has "
            f"{ids.shape[0]} ids; expected one row per id"
        )
    delta = Delta(add, remove, new_x, ids, update_x)
    if not any(delta.counts().values()):
        raise DatasetError(f"delta {path.name} holds no change (expected any of {KEYS})")
    return delta


def _edges(value: np.ndarray | None, key: str, limit: int, path: Path) -> np.ndarray:
    if value is None:
        return np.zeros((2, 0), dtype=np.int64)
    if value.ndim != 2 or value.shape[0] != 2 or not np.issubdtype(value.dtype, np.integer):
        raise DatasetError(
            f"delta {path.name}: {key} is {value.dtype}{list(value.shape)}; expected integer [2, E]"
        )
    edges = value.astype(np.int64)
    bad = (edges < 0) | (edges >= limit)
    if bad.any():
        j = int(np.argwhere(bad.any(0))[0, 0])
        raise DatasetError(
            f"delta {path.name}: {key} edge {j} ({edges[0, j]} -> {edges[1, j]}) names a node "
            f"outside [0, {limit})"
        )
    loops = edges[0] == edges[1]
    if loops.any():
        j = int(np.argmax(loops))
        raise DatasetError(
            f"delta {path.name}: {key} edge {j} is a self loop ({edges[0, j]} -> {edges[1, j]}); "
            "the layers' self terms are implicit"
        )
    return edges


def _features(value: np.ndarray | None, key: str, width: int, path: Path) -> np.ndarray:
    if value is None:
        return np.zeros((0, width), dtype=np.float32)
    numeric = np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_
    if value.ndim != 2 or value.shape[1] != width or not numeric:
        raise DatasetError(
            f"delta {path.name}: {key} is {value.dtype}{list(value.shape)}; expected numeric "
            f"[rows, {width}]"
        )
    x = value.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise DatasetError(f"delta {path.name}: {key} row {row} holds NaN or inf")
    return x


def _ids(value: np.ndarray | None, num_nodes: int, path: Path) -> np.ndarray:
    if value is None:
        return np.zeros(0, dtype=np.int64)
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
        raise DatasetError(
            f"delta {path.name}: update_ids is {value.dtype}{list(value.shape)}; expected "
            "integer [U]"
        )
    ids = value.astype(np.int64)
    out = (ids < 0) | (ids >= num_nodes)
    if out.any():
        raise DatasetError(
            f"delta {path.name}: update_ids holds {ids[out][0]}, outside the existing nodes "
            f"[0, {num_nodes}) (new nodes take their features from new_x)"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(f"delta {path.name}: update_ids lists node {uniq[counts > 1][0]} twice")
    return ids


@dataclass
class GraphUpdate:
    """A graph after a delta, and what the delta touched.

    Attributes:
        csr: In-neighbour lists of the updated graph (``N + M`` nodes).
        x: [N + M, F] features.
        changed: [N + M] bool, nodes whose in-neighbour list changed (new nodes included).
        updated: [N + M] bool, nodes whose features changed (new nodes included).
    """

    csr: CSR
    x: Tensor
    changed: Tensor
    updated: Tensor


def apply_delta(csr: CSR, x: Tensor, delta: Delta, undirected: bool) -> GraphUpdate:
    """Applies ``delta`` to the graph ``(csr, x)`` (edges symmetrised if ``undirected``).

    The edge multiset of ``csr`` is kept as it is except for the removed edges (all
    copies) and the added ones not present yet; lists stay sorted by source.

    Raises:
        DatasetError: a removed edge that does not exist, or an edge both added and removed.
    """
    n_old, m = csr.num_nodes, delta.num_new_nodes
    n = n_old + m
    add, remove = delta.add_edges, delta.remove_edges
    old = csr.dst_index().numpy() * n + csr.col.numpy()  # sorted: CSR is by (dst, src)
    missing = ~_isin_sorted(remove[1] * n + remove[0], old)  # as the delta names them
    if missing.any():
        j = int(np.argmax(missing))
        raise DatasetError(
            f"delta: remove_edges names {remove[0, j]} -> {remove[1, j]}, which is not an edge"
        )
    if undirected:
        add, remove = _symmetrise(add), _symmetrise(remove)
    add_keys = np.unique(add[1] * n + add[0])
    remove_keys = np.unique(remove[1] * n + remove[0])
    both = np.intersect1d(add_keys, remove_keys)
    if both.size:
        raise DatasetError(f"delta: edge {both[0] % n} -> {both[0] // n} is both added and removed")
    kept = old[~_isin_sorted(old, remove_keys)] if remove_keys.size else old
    fresh = add_keys[~_isin_sorted(add_keys, old)]
    keys = np.sort(np.concatenate([kept, fresh]), kind="stable")
    dst, src = keys // n, keys % n
    rowptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=rowptr[1:])
    changed = np.zeros(n, dtype=bool)
    changed[fresh // n] = True
    changed[remove_keys // n] = True
    changed[n_old:] = True
    new_x = torch.cat([x, torch.from_numpy(delta.new_x).to(x.dtype)])
    if delta.update_ids.size:
        new_x[torch.from_numpy(delta.update_ids)] = torch.from_numpy(delta.update_x).to(x.dtype)
    updated = np.zeros(n, dtype=bool)
    updated[delta.update_ids] = True
    updated[n_old:] = True
    return GraphUpdate(
        csr=CSR(torch.from_numpy(rowptr), torch.from_numpy(src), n),
        x=new_x,
        changed=torch.from_numpy(changed),
        updated=torch.from_numpy(updated),
    )


def _symmetrise(edges: np.ndarray) -> np.ndarray:
    return np.concatenate([edges, edges[::-1]], axis=1)


def _isin_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_keys)`` by binary search (``sorted_keys`` ascending)."""
    if not sorted_keys.size:
        return np.zeros(values.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, values).clip(max=sorted_keys.size - 1)
    return sorted_keys[pos] == values
