"""Bring your own graph: the ``npz`` dataset format (``--dataset npz:PATH``).

``PATH`` is a ``.npz`` file (``numpy.savez``), or a directory holding ``graph.npz``.
It is read with ``allow_pickle=False``: only plain numeric arrays, never objects.

Required arrays (N nodes, F features, E edges):

===============  ===========  ===================================================
key              shape        content
===============  ===========  ===================================================
``x``            [N, F]       node features, float (integer / bool are converted)
``edge_index``   [2, E]       integer node ids in [0, N), source row then target
                              (or ``edges`` [E, 2], one ``(src, dst)`` pair a row)
``y``            [N]          integer class labels in [0, num_classes)
``train_mask``   [N]          boolean; likewise ``val_mask`` and ``test_mask`` ...
``train_idx``    [K]          ... or integer node ids instead of each mask
                              (``train_idx``, ``val_idx``, ``test_idx``)
===============  ===========  ===================================================

Optional: ``num_classes`` (integer scalar, default ``max(y) + 1``), ``directed``
(bool scalar, default ``False``: edges are symmetrised; ``True`` keeps them as given),
``metric`` (string scalar, ``accuracy`` (default) or ``roc_auc``).
Self loops and duplicate edges are dropped on load. Example::

    np.savez("graph.npz", x=x, edge_index=ei, y=y, train_mask=tr, val_mask=va, test_mask=te)

:func:`save_npz` writes any loaded dataset in this format.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.utils import is_undirected

from abkd_deploy.data.pyg_datasets import clean_edges
from abkd_deploy.data.registry import DATASETS, METRICS
from abkd_deploy.errors import ConfigError, DatasetError
from abkd_deploy.files import atomic_path

_PARTS = ("train", "val", "test")


@DATASETS.register("npz")
def load_npz(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> Data:
    """Loads ``npz:PATH`` (``PATH`` relative to ``root`` when given and not absolute)."""
    if not arg and root is None:
        raise ConfigError("the npz dataset needs a path: npz:/path/graph.npz (or a folder)")
    if split not in (None, "0"):
        raise ConfigError(f"unknown split {split!r} for npz; the file holds one split (use 0)")
    path = Path(arg).expanduser() if arg else Path(root)  # type: ignore[arg-type]
    if root is not None and arg and not path.is_absolute():
        path = Path(root) / path
    return read_npz(path)


def read_npz(path: str | Path) -> Data:
    """Reads a graph in the format above into a contract ``Data``.

    Raises:
        DatasetError: missing file or key, malformed array (the message names the key,
            its shape and the expected one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "graph.npz"
    if not path.is_file():
        raise DatasetError(f"npz dataset file {str(path)!r} not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path} is not a readable .npz archive: {e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} is a single .npy array, expected an .npz archive")
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DatasetError(f"{path}: array {key!r} is unreadable: {e}") from None
    return _from_arrays(arrays, path)


def _from_arrays(a: dict[str, np.ndarray], path: Path) -> Data:
    def need(key: str) -> np.ndarray:
        if key not in a:
            raise DatasetError(f"{path}: missing key {key!r} (keys present: {sorted(a)})")
        return a[key]

    def bad(key: str, expected: str) -> DatasetError:
        arr = a[key]
        return DatasetError(
            f"{path}: {key!r} has shape {arr.shape} dtype {arr.dtype}, expected {expected}"
        )

    x = need("x")
    if x.ndim != 2 or x.dtype.kind not in "biuf":  # bool, int, uint, float
        raise bad("x", "[N, F] float")
    n = x.shape[0]
    if "edge_index" in a or "edges" not in a:
        key, ei = "edge_index", need("edge_index")
        if ei.ndim != 2 or ei.shape[0] != 2 or not np.issubdtype(ei.dtype, np.integer):
            raise bad(key, "[2, E] integer")
    else:
        key, ei = "edges", a["edges"]
        if ei.ndim != 2 or ei.shape[1] != 2 or not np.issubdtype(ei.dtype, np.integer):
            raise bad(key, "[E, 2] integer")
        ei = ei.T
    if ei.size and (ei.min() < 0 or ei.max() >= n):
        raise DatasetError(
            f"{path}: {key!r} holds node ids in [{ei.min()}, {ei.max()}], expected [0, {n})"
        )
    y = need("y")
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise bad("y", f"[{n}] integer (non-integer labels are not class ids)")
    num_classes = int(_scalar(a, "num_classes", int(y.max()) + 1 if n else 0, path))
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(
            f"{path}: 'y' holds labels in [{y.min()}, {y.max()}], expected [0, {num_classes})"
        )
    directed = bool(_scalar(a, "directed", False, path))
    edge_index = torch.from_numpy(np.ascontiguousarray(ei, dtype=np.int64))
    data = Data(
        x=torch.from_numpy(np.asarray(x, dtype=np.float32)),
        edge_index=clean_edges(edge_index, n, directed=directed),
        y=torch.from_numpy(y.astype(np.int64)),
    )
    for part in _PARTS:
        data[f"{part}_mask"] = torch.from_numpy(_mask(a, part, n, path))
    data.num_classes = num_classes
    data.metric = str(_scalar(a, "metric", "accuracy", path))
    if data.metric not in METRICS:
        raise DatasetError(f"{path}: 'metric' is {data.metric!r}, expected one of {METRICS}")
    return data


def _scalar(a: dict[str, np.ndarray], key: str, default, path: Path):
    if key not in a:
        return default
    arr = a[key]
    if arr.size != 1 or arr.ndim > 1:
        raise DatasetError(f"{path}: {key!r} has shape {arr.shape}, expected a scalar")
    value = arr.reshape(()).item()
    if isinstance(default, bool | int) and not isinstance(value, bool | int):
        raise DatasetError(f"{path}: {key!r} is {value!r}, expected an integer/bool scalar")
    return value


def _mask(a: dict[str, np.ndarray], part: str, n: int, path: Path) -> np.ndarray:
    mkey, ikey = f"{part}_mask", f"{part}_idx"
    if mkey in a:
        m = a[mkey]
        if m.shape != (n,) or m.dtype != bool:
            raise DatasetError(
                f"{path}: {mkey!r} has shape {m.shape} dtype {m.dtype}, expected [{n}] bool"
            )
        return m.copy()
    if ikey not in a:
        raise DatasetError(f"{path}: missing key {mkey!r} (or {ikey!r}); keys present: {sorted(a)}")
    idx = a[ikey]
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DatasetError(
            f"{path}: {ikey!r} has shape {idx.shape} dtype {idx.dtype}, expected [K] integer"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DatasetError(
            f"{path}: {ikey!r} holds node ids in [{idx.min()}, {idx.max()}], expected [0, {n})"
        )
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m


def save_npz(data: Data, path: str | Path, compress: bool = True) -> Path:
    """Writes ``data`` in the npz format above, atomically (never a half-written file).

    Args:
        data: A contract ``Data`` (``x``, ``edge_index``, ``y``, the three masks).
        path: Target ``.npz`` file.
        compress: Use ``numpy.savez_compressed`` (smaller, slower to write).

    Returns:
        ``path``.
    """
    path = Path(path)
    arrays = {
        "x": data.x.detach().cpu().float().numpy(),
        "edge_index": data.edge_index.detach().cpu().long().numpy(),
        "y": data.y.detach().cpu().long().numpy(),
        "directed": np.array(not is_undirected(data.edge_index, num_nodes=data.num_nodes)),
        "metric": np.array(str(getattr(data, "metric", "accuracy"))),
    }
    for part in _PARTS:
        arrays[f"{part}_mask"] = data[f"{part}_mask"].detach().cpu().bool().numpy()
    if getattr(data, "num_classes", None) is not None:
        arrays["num_classes"] = np.array(int(data.num_classes), dtype=np.int64)
    save = np.savez_compressed if compress else np.savez
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(f, **arrays)
    return path
