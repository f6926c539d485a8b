"""Requests about nodes that are not in the export (numpy + onnxruntime only).

An ``embedded`` export of a ``gcn``/``sage`` student carries ``new_nodes.onnx``
(:mod:`abkd_deploy.export.new_nodes`): it answers a node from its features and the ids
of the stored nodes it is joined to. This module checks such nodes
(:func:`as_new_nodes`: every problem is an :class:`InvalidNewNodes`, HTTP 422, naming the
node and the value) and runs the graph (:class:`NewNodeModel`).

A new node is ``{"features": [F floats], "neighbors": [ids]}``: finite features of the
export's width, distinct neighbour ids in ``[0, num_nodes)``, at most ``max_neighbors``
of them (the largest fanout; layer ``l`` reads the first ``K_l``), none is fine.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abkd_deploy.errors import first_line
from abkd_deploy.serve.errors import ArtifactError, BatchTooLarge, RequestError
from abkd_deploy.serve.providers import create_session

#: Padding of the ``neighbors`` input.
PAD = -1
#: Types a JSON feature value may have (``bool`` is excluded on purpose).
_PLAIN_NUMBERS = {int, float}
#: Keys of one new node.
NODE_FIELDS = ("features", "neighbors")


class InvalidNewNodes(RequestError):
    """A new node with wrong features or neighbours (HTTP 422)."""

    http_status = 422
    code = "invalid_nodes"


@dataclass(frozen=True)
class NewNodes:
    """Checked new nodes, row ``i`` for node ``i``.

    Attributes:
        features: ``[M, F]`` float32.
        neighbors: ``[M, K]`` int64 neighbour ids, padded with -1.
    """

    features: np.ndarray
    neighbors: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class NewNodeLimits:
    """What a new node must fit: feature width, neighbour count and id range."""

    feature_width: int
    max_neighbors: int
    num_nodes: int


def new_node_limits(manifest: dict[str, Any]) -> NewNodeLimits | None:
    """What the new nodes of an export must fit, from its manifest (``None``: it has no
    new-node graph)."""
    entry = manifest.get("new_nodes")
    if not isinstance(entry, dict):
        return None
    try:
        width, k = int(entry["inputs"][0]["shape"][1]), int(entry["max_neighbors"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise ArtifactError(f"manifest.json has a malformed 'new_nodes' entry: {entry!r}") from None
    return NewNodeLimits(width, k, int(manifest["graph"]["num_nodes"]))


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _features(i: int, value: Any, width: int) -> np.ndarray:
    if not isinstance(value, list | tuple | np.ndarray):
        raise InvalidNewNodes(
            f"nodes[{i}].features must be a list of {width} numbers, got {type(value).__name__}"
        )
    if len(value) != width:
        raise InvalidNewNodes(
            f"nodes[{i}].features has {len(value)} values; this model takes {width}"
        )
    if isinstance(value, np.ndarray):
        ok = value.dtype.kind in "fiu"
    else:
        ok = set(map(type, value)) <= _PLAIN_NUMBERS  # C speed; bools are not numbers here
    if ok:
        row = np.asarray(value, dtype=np.float64)
        if np.isfinite(row).all():
            return row
    for j, v in enumerate(value):  # the slow path names the first bad value
        if not isinstance(v, int | float | np.number) or isinstance(v, bool | np.bool_):
            raise InvalidNewNodes(f"nodes[{i}].features[{j}] = {v!r} is not a number")
        if not math.isfinite(float(v)):
            raise InvalidNewNodes(f"nodes[{i}].features[{j}] = {v!r}; features must be finite")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def _neighbors(i: int, value: Any, limits: NewNodeLimits) -> list[int]:
    if not isinstance(value, list | tuple | np.ndarray):
        raise InvalidNewNodes(
            f"nodes[{i}].neighbors must be a list of node ids, got {type(value).__name__}"
        )
    if len(value) > limits.max_neighbors:
        raise InvalidNewNodes(
            f"nodes[{i}] has {len(value)} neighbours; this model takes at most "
            f"{limits.max_neighbors} (its largest fanout)"
        )
    plain = not isinstance(value, np.ndarray) and set(map(type, value)) <= {int}
    if not plain:
        for v in value:
            if not _is_int(v):
                raise InvalidNewNodes(f"nodes[{i}].neighbors holds {v!r}; expected node ids")
    for v in value:
        if not 0 <= int(v) < limits.num_nodes:
            raise InvalidNewNodes(
                f"nodes[{i}].neighbors holds unknown node id {int(v)}; expected ids in "
                f"[0, {limits.num_nodes})"
            )
    ids = [int(v) for v in value]
    if len(set(ids)) != len(ids):
        dup = next(v for v in ids if ids.count(v) > 1)
        raise InvalidNewNodes(f"nodes[{i}].neighbors lists node id {dup} twice")
    return ids


def _checked_at_once(nodes: Any, limits: NewNodeLimits) -> NewNodes | None:
    """The nodes as arrays when every one of them is well formed (whole-batch numpy
    checks), else ``None``: :func:`as_new_nodes` then walks them one by one to name the
    first problem. Same checks and same result as that walk."""
    width, k, n = limits.feature_width, limits.max_neighbors, limits.num_nodes
    try:
        if not all(
            type(v) is dict and len(v) == 2 and "features" in v and "neighbors" in v for v in nodes
        ):
            return None
        feats = [v["features"] for v in nodes]
        nbrs = [v["neighbors"] for v in nodes]
        if not all(type(f) is list and len(f) == width for f in feats):
            return None
        if not all(type(b) is list and len(b) <= k for b in nbrs):
            return None
        if not set(map(type, itertools.chain.from_iterable(feats))) <= _PLAIN_NUMBERS:
            return None
        flat = list(itertools.chain.from_iterable(nbrs))
        if not set(map(type, flat)) <= {int}:
            return None
        x = np.array(feats, dtype=np.float64).reshape(len(feats), width)
        ids = np.array(flat, dtype=np.int64)
    except (OverflowError, ValueError, TypeError):
        return None
    if not np.isfinite(x).all() or ((ids < 0) | (ids >= n)).any():
        return None
    lens = np.fromiter(map(len, nbrs), dtype=np.int64, count=len(nbrs))
    row = np.repeat(np.arange(len(nbrs)), lens)
    if np.unique(row * n + ids).size != ids.size:  # a duplicate within one node
        return None
    start = np.repeat(np.cumsum(lens) - lens, lens)
    neighbors = np.full((len(nbrs), k), PAD, dtype=np.int64)
    neighbors[row, np.arange(ids.size) - start] = ids
    return NewNodes(x.astype(np.float32), neighbors)


def as_new_nodes(nodes: Any, limits: NewNodeLimits, max_batch: int | None = None) -> NewNodes:
    """Checks a list of new nodes (``{"features": [...], "neighbors": [...]}`` each).

    Raises:
        InvalidNewNodes: not a list of such objects, or a node that does not fit ``limits``
            (the message names the node, the field and the bad value).
        BatchTooLarge: more than ``max_batch`` nodes.
    """
    if not isinstance(nodes, list | tuple):
        raise InvalidNewNodes(
            f"nodes must be a list of {{features, neighbors}} objects, got {type(nodes).__name__}"
        )
    if max_batch is not None and len(nodes) > max_batch:
        raise BatchTooLarge(len(nodes), max_batch, what="request")
    fast = _checked_at_once(nodes, limits)
    if fast is not None:
        return fast
    width, k = limits.feature_width, limits.max_neighbors
    features = np.empty((len(nodes), width), dtype=np.float32)
    neighbors = np.full((len(nodes), k), PAD, dtype=np.int64)
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise InvalidNewNodes(
                f"nodes[{i}] must be an object with 'features' and 'neighbors', got "
                f"{type(node).__name__}"
            )
        unknown = sorted(set(node) - set(NODE_FIELDS))
        missing = [f for f in NODE_FIELDS if f not in node]
        if unknown or missing:
            raise InvalidNewNodes(
                f"nodes[{i}] must have exactly {list(NODE_FIELDS)}; missing {missing}, "
                f"unexpected {unknown}"
            )
        features[i] = _features(i, node["features"], width)
        ids = _neighbors(i, node["neighbors"], limits)
        neighbors[i, : len(ids)] = ids
    return NewNodes(features, neighbors)


class NewNodeModel:
    """``new_nodes.onnx`` of an export in onnxruntime.

    Args:
        export_dir: the export folder.
        entry: the manifest's ``new_nodes`` object.
        num_nodes: stored nodes (neighbour ids must be below).
        device / threads / spinning: as for the main model's session.

    Raises:
        ArtifactError: the file cannot be loaded or its inputs disagree with ``entry``.
    """

    def __init__(
        self,
        export_dir: Path,
        entry: dict[str, Any],
        num_nodes: int,
        device: str,
        threads: int | None,
        spinning: bool | None,
    ) -> None:
        path = export_dir / str(entry.get("file", ""))
        try:
            width = int(entry["inputs"][0]["shape"][1])
            k = int(entry["max_neighbors"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ArtifactError(
                f"manifest.json has a malformed 'new_nodes' entry: {entry!r}"
            ) from None
        try:
            info = create_session(path, device, threads, spinning)
        except Exception as exc:
            raise ArtifactError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
        self.session = info.session
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        shapes_ok = sorted(inputs) == sorted(NODE_FIELDS) and (
            inputs["features"][-1] == width and inputs["neighbors"][-1] == k
        )
        if not shapes_ok:
            raise ArtifactError(
                f"{path.name} has inputs {inputs}; the manifest says features [nodes, "
                f"{width}] and neighbors [nodes, {k}]"
            )
        self.limits = NewNodeLimits(width, k, int(num_nodes))
        self._dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32

    def run(self, nodes: NewNodes, names: list[str]) -> list[np.ndarray]:
        """The outputs ``names`` (``logits``, ``embedding``) for checked ``nodes``."""
        feed = {"features": nodes.features.astype(self._dtype, copy=False)}
        feed["neighbors"] = nodes.neighbors
        return self.session.run(names, feed)
