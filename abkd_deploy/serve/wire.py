"""The wire format of ``POST /v1/predict``: request parsing and response encoding.

Requests are parsed with orjson. Anything orjson refuses, or a document that fails the
checks, is parsed again with the standard library's ``json`` so that every error is
exactly what it was before (``1e400`` is valid JSON that ``json`` reads as ``inf``, ids
above 2**64 stay integers, UTF-16 bodies are accepted, ...): only good requests take the
fast path, and they parse identically with both.

Responses:

* JSON (default): ``{"predictions": [...], "scores": [[...]]}`` written by orjson straight
  from the numpy arrays; float32 values are written with the shortest decimal that reads
  back as the same float32 (``0.1``, not ``0.10000000149011612``).
* ``"format": "top1"``: ``{"predictions": [...]}`` (no scores).
* ``"nodes": [{"features": [...], "neighbors": [ids]}]``: nodes that are not in the export
  (:mod:`abkd_deploy.serve.new_nodes`), alone or after ``node_ids``; their answers follow
  the ids' answers in the same lists, each part in request order.
* Serving a model directory (``REPO/<model>``): ``"model_version": N`` in every JSON
  answer and an ``x-model-version`` header on every answer (binary ones included).
* ``Accept: application/octet-stream``: a binary body, :data:`BINARY_HEADER` then the
  arrays (see :func:`encode_binary`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from abkd_deploy.serve.errors import BatchTooLarge, RequestError
from abkd_deploy.serve.new_nodes import InvalidNewNodes, NewNodeLimits, NewNodes, as_new_nodes
from abkd_deploy.serve.predictor import Prediction
from abkd_deploy.serve.request_validation import as_node_ids, fast_node_ids

FIELDS = ("node_ids", "nodes", "return_embedding", "format")
FORMATS = ("full", "top1")
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
#: Little-endian header of a binary answer: magic ``b"ABKD"``, version (u16, 1), flags
#: (u16: 1 = scores follow, 2 = embeddings follow), n ids (u32), classes C (u32),
#: embedding width D (u32, 0 without embeddings), reserved (u32, 0). 24 bytes, so the
#: int64 ``predictions[n]`` that follow are 8-byte aligned; then float32 ``scores[n, C]``
#: and float32 ``embeddings[n, D]`` when their flag is set.
BINARY_HEADER = struct.Struct("<4sHHIIII")
BINARY_MAGIC = b"ABKD"
BINARY_VERSION = 1
FLAG_SCORES, FLAG_EMBEDDINGS = 1, 2
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


class BadRequest(RequestError):
    """Malformed JSON (400) or a body of the wrong shape (422)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code


@dataclass(frozen=True)
class PredictRequest:
    """A checked prediction request.

    Attributes:
        ids: ``[n]`` int64 node ids, valid for the model.
        return_embedding: also answer the last hidden layer.
        format: ``full`` (predictions and scores) or ``top1`` (predictions only).
        nodes: new nodes (answered after ``ids``), or ``None``.
    """

    ids: np.ndarray
    return_embedding: bool
    format: str
    nodes: NewNodes | None = None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _stdlib_loads(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", 400, "malformed_json") from None


def _checked(
    payload: Any,
    num_nodes: int,
    max_ids: int,
    with_embedding: bool,
    new_nodes: NewNodeLimits | None = None,
) -> PredictRequest:
    if not isinstance(payload, dict):
        raise BadRequest(
            f"body must be a JSON object, got {type(payload).__name__}", 422, "invalid_request"
        )
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadRequest(
            f"unknown field(s) {unknown}; expected {sorted(FIELDS)}", 422, "invalid_request"
        )
    if "node_ids" not in payload and "nodes" not in payload:
        raise BadRequest(
            "body needs 'node_ids' (a list of node ids) or 'nodes' (new nodes)",
            422,
            "invalid_request",
        )
    want_emb = payload.get("return_embedding", False)
    if not isinstance(want_emb, bool):
        raise BadRequest(
            f"return_embedding must be true or false, got {want_emb!r}", 422, "invalid_request"
        )
    fmt = payload.get("format", "full")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BadRequest(
            f"format must be one of {list(FORMATS)}, got {fmt!r}", 422, "invalid_request"
        )
    if want_emb and not with_embedding:
        raise BadRequest("this model has no embedding output", 422, "invalid_request")
    if "nodes" in payload:
        return _with_nodes(payload, num_nodes, max_ids, want_emb, fmt, new_nodes)
    node_ids = payload["node_ids"]
    if isinstance(node_ids, list) and len(node_ids) > max_ids:
        raise BatchTooLarge(len(node_ids), max_ids, what="request")
    return PredictRequest(as_node_ids(node_ids, num_nodes, max_ids), want_emb, fmt)


def _with_nodes(
    payload: dict[str, Any],
    num_nodes: int,
    max_ids: int,
    want_emb: bool,
    fmt: str,
    limits: NewNodeLimits | None,
) -> PredictRequest:
    """A request with ``nodes`` (and maybe ``node_ids``): both count towards ``max_ids``."""
    if limits is None:
        raise InvalidNewNodes(
            "this model cannot answer for new nodes (its export has no new_nodes.onnx); "
            "send node_ids only"
        )
    node_ids = payload.get("node_ids", [])
    nodes = payload["nodes"]
    n_ids = len(node_ids) if isinstance(node_ids, list) else 0
    n_nodes = len(nodes) if isinstance(nodes, list) else 0
    if n_ids + n_nodes > max_ids:
        raise BatchTooLarge(n_ids + n_nodes, max_ids, what="request")
    checked = as_new_nodes(nodes, limits, max_ids)
    if isinstance(node_ids, list) and not node_ids:
        if not len(checked):
            raise BadRequest("node_ids and nodes are both empty", 422, "invalid_request")
        return PredictRequest(np.empty(0, dtype=np.int64), want_emb, fmt, checked)
    return PredictRequest(as_node_ids(node_ids, num_nodes, max_ids), want_emb, fmt, checked)


def parse_request(
    body: bytes,
    num_nodes: int,
    max_ids: int,
    with_embedding: bool,
    new_nodes: NewNodeLimits | None = None,
) -> PredictRequest:
    """Parses and checks ``{"node_ids": [...], "nodes": [...], "return_embedding": bool,
    "format": str}`` (``nodes``: new nodes, :mod:`abkd_deploy.serve.new_nodes`, accepted
    when ``new_nodes`` gives their limits).

    Raises:
        BadRequest: not JSON (400; also ``NaN``/``Infinity``), or a body of the wrong shape.
        InvalidNodeIds: ids that are not integers in ``[0, num_nodes)`` (422).
        InvalidNewNodes: a bad new node, or new nodes for a model without their graph (422).
        BatchTooLarge: more than ``max_ids`` ids and nodes (413).
    """
    try:
        payload = orjson.loads(body)
        if type(payload) is dict and len(payload) == 1:  # the common request, in a few C calls
            ids = payload.get("node_ids")
            if type(ids) is list and len(ids) <= max_ids:
                arr = fast_node_ids(ids, num_nodes)
                if arr is not None:
                    return PredictRequest(arr, False, "full")
        return _checked(payload, num_nodes, max_ids, with_embedding, new_nodes)
    except (orjson.JSONDecodeError, RequestError):
        pass  # the standard library gives this body the answer it always got
    return _checked(_stdlib_loads(body), num_nodes, max_ids, with_embedding, new_nodes)


def wants_binary(accept: str) -> bool:
    """Whether an ``Accept`` header asks for the binary answer."""
    return BINARY_TYPE in accept.lower()


def encode_json(
    pred: Prediction, request: PredictRequest, model_version: int | None = None
) -> bytes:
    """The JSON answer: ``predictions`` [n] ints, ``scores`` [n, C] (not for ``top1``),
    ``embeddings`` [n, D] when asked for, ``model_version`` when serving a model directory."""
    content: dict[str, Any] = {"predictions": np.ascontiguousarray(pred.classes)}
    if request.format == "full":
        content["scores"] = np.ascontiguousarray(pred.scores, dtype=np.float32)
    if request.return_embedding:
        content["embeddings"] = np.ascontiguousarray(pred.embedding, dtype=np.float32)
    if model_version is not None:
        content["model_version"] = int(model_version)
    return orjson.dumps(content, option=_NUMPY)


def encode_binary(pred: Prediction, request: PredictRequest) -> bytes:
    """The binary answer: :data:`BINARY_HEADER`, int64 ``predictions[n]``, then float32
    ``scores[n, C]`` (not for ``top1``) and float32 ``embeddings[n, D]`` (when asked for),
    all little-endian and C-ordered."""
    n = len(pred)
    parts = [np.ascontiguousarray(pred.classes, dtype="<i8").tobytes()]
    flags, num_classes, dim = 0, int(pred.scores.shape[1]), 0
    if request.format == "full":
        flags |= FLAG_SCORES
        parts.append(np.ascontiguousarray(pred.scores, dtype="<f4").tobytes())
    if request.return_embedding:
        flags |= FLAG_EMBEDDINGS
        dim = int(pred.embedding.shape[1])
        parts.append(np.ascontiguousarray(pred.embedding, dtype="<f4").tobytes())
    head = BINARY_HEADER.pack(BINARY_MAGIC, BINARY_VERSION, flags, n, num_classes, dim, 0)
    return head + b"".join(parts)


def decode_binary(body: bytes) -> dict[str, np.ndarray]:
    """Reads a binary answer back (for clients and tests): ``predictions`` and, when
    present, ``scores`` and ``embeddings``.

    Raises:
        ValueError: not a version-1 binary answer, or a body of the wrong length.
    """
    magic, version, flags, n, c, d, _ = BINARY_HEADER.unpack_from(body)
    if magic != BINARY_MAGIC or version != BINARY_VERSION:
        raise ValueError(f"not an abkd binary answer (magic {magic!r}, version {version})")
    sizes = {"predictions": (np.dtype("<i8"), (n,))}
    if flags & FLAG_SCORES:
        sizes["scores"] = (np.dtype("<f4"), (n, c))
    if flags & FLAG_EMBEDDINGS:
        sizes["embeddings"] = (np.dtype("<f4"), (n, d))
    out, offset = {}, BINARY_HEADER.size
    for name, (dtype, shape) in sizes.items():
        count = int(np.prod(shape))
        out[name] = np.frombuffer(body, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    if offset != len(body):
        raise ValueError(f"binary answer has {len(body)} bytes; its header says {offset}")
    return out
