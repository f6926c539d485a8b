"""Validation of node-id batches: integers, in ``[0, num_nodes)``, not empty, not too many."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from abkd_deploy.serve.errors import BatchTooLarge, InvalidNodeIds, preview

_INT64_MAX = np.iinfo(np.int64).max


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def as_node_ids(node_ids: Any, num_nodes: int, max_batch: int | None = None) -> np.ndarray:
    """Checks a batch of node ids and returns it as a contiguous int64 array.

    Args:
        node_ids: a 1-D numpy integer array, or a list/tuple of Python/numpy ints
            (``bool`` and floats such as ``3.0`` are rejected).
        num_nodes: ids must lie in ``[0, num_nodes)``.
        max_batch: the most ids allowed (``None``: no limit).

    Raises:
        InvalidNodeIds: not a 1-D integer sequence, empty, or ids out of range (the error
            lists the offending values, truncated).
        BatchTooLarge: more than ``max_batch`` ids.
    """
    if isinstance(node_ids, np.ndarray):
        arr = _from_array(node_ids, num_nodes)
    elif isinstance(node_ids, (str, bytes, dict)) or not isinstance(node_ids, Iterable):
        raise InvalidNodeIds(
            f"node_ids must be a list of integers, got {type(node_ids).__name__}",
            [node_ids] if not isinstance(node_ids, dict) else [],
        )
    else:
        values = node_ids if isinstance(node_ids, (list, tuple)) else list(node_ids)
        if max_batch is not None and len(values) > max_batch:
            raise BatchTooLarge(len(values), max_batch)
        arr = fast_node_ids(values, num_nodes)
        if arr is not None:
            return arr
        arr = _from_list(values, num_nodes)
    if arr.size == 0:
        raise InvalidNodeIds("node_ids is empty; expected at least one node id")
    if max_batch is not None and arr.size > max_batch:
        raise BatchTooLarge(int(arr.size), max_batch)
    if int(np.maximum.reduce(arr.view(np.uint64))) >= num_nodes:  # negatives are huge
        bad = arr[(arr < 0) | (arr >= num_nodes)].tolist()
        raise InvalidNodeIds(_out_of_range(bad, num_nodes), bad)
    return np.ascontiguousarray(arr)


def _from_array(a: np.ndarray, num_nodes: int) -> np.ndarray:
    if a.ndim != 1:
        raise InvalidNodeIds(f"node_ids must be 1-D, got an array of shape {tuple(a.shape)}")
    if a.dtype.kind not in "iu":
        raise InvalidNodeIds(f"node_ids must have an integer dtype, got {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        bad = a[a >= num_nodes].tolist()
        raise InvalidNodeIds(_out_of_range(bad, num_nodes), bad)
    return a.astype(np.int64, copy=False)


def fast_node_ids(values: list[Any] | tuple[Any, ...], num_nodes: int) -> np.ndarray | None:
    """The common case in a few C loops: a non-empty list of plain Python ints, all valid.

    Returns the ``[n]`` int64 ids, or ``None`` for anything else (empty, other types such as
    ``bool``/``float``/numpy scalars, ids beyond int64 or outside ``[0, num_nodes)``): the
    element-wise path then gives exactly the error it always gave.
    """
    if not values or set(map(type, values)) != {int}:
        return None
    try:
        arr = np.array(values, dtype=np.int64)
    except OverflowError:
        return None
    # one reduction checks both ends: negative ids are huge as uint64
    if int(np.maximum.reduce(arr.view(np.uint64))) >= num_nodes:
        return None
    return arr


def _from_list(values: list[Any] | tuple[Any, ...], num_nodes: int) -> np.ndarray:
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise InvalidNodeIds(
            f"node_ids must be integers; got {len(bad)} non-integer value(s) {preview(bad)}",
            bad,
        )
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        bad = [int(v) for v in values if not 0 <= int(v) < num_nodes]
        raise InvalidNodeIds(_out_of_range(bad, num_nodes), bad) from None


def _out_of_range(bad: list[int], num_nodes: int) -> str:
    return f"{len(bad)} node id(s) outside [0, {num_nodes}): {preview(bad)}"
