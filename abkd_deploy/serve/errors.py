"""Serving errors, each with the HTTP status the server answers it with."""

from __future__ import annotations

import json
from typing import Any

from abkd_deploy.errors import ServeError

#: How many offending values an error message / HTTP error body lists at most.
MAX_LISTED = 20


def _short_repr(value: Any, max_chars: int = 60) -> str:
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def preview(values: list[Any], limit: int = 10) -> str:
    """Formats the first ``limit`` values of a list (each shortened), noting how many more."""
    shown = ", ".join(_short_repr(v) for v in values[:limit])
    more = len(values) - limit
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def json_safe(value: Any, max_chars: int = 100) -> Any:
    """``value`` if strict JSON can carry it in at most ``max_chars`` characters, else a
    short ``repr`` string (``NaN``/``Infinity``, strings with lone surrogates, which UTF-8
    cannot carry, long strings, big nested values), so an error body that echoes client
    values can always be rendered."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return _short_repr(value, max_chars)
    return value if len(text) <= max_chars else _short_repr(value, max_chars)


class ArtifactError(ServeError):
    """The export directory is missing, malformed or fails its integrity check."""


class RequestError(ServeError):
    """A request the caller got wrong; :attr:`http_status` is the status to answer with."""

    http_status: int = 400
    code: str = "bad_request"


class InvalidInput(RequestError):
    """A raw ``run()`` feed that does not match the model's inputs (names, dtype, rank)."""

    http_status = 422
    code = "invalid_input"


class InvalidNodeIds(RequestError):
    """Node ids that are not integers, not in ``[0, num_nodes)``, or an empty batch.

    Attributes:
        values: the offending values (at most :data:`MAX_LISTED`), empty for an empty batch.
    """

    http_status = 422
    code = "invalid_node_ids"

    def __init__(self, message: str, values: list[Any] | None = None) -> None:
        super().__init__(message)
        self.values = [json_safe(v) for v in list(values or [])[:MAX_LISTED]]


class BatchTooLarge(RequestError):
    """More node ids in one call than allowed.

    Attributes:
        size: how many ids were sent.
        limit: the most allowed.
    """

    http_status = 413
    code = "too_many_ids"

    def __init__(self, size: int, limit: int, what: str = "batch") -> None:
        super().__init__(f"{what} has {size} node ids; at most {limit} are allowed")
        self.size = size
        self.limit = limit


class RequestTimeout(RequestError):
    """The request body did not arrive within the body read timeout."""

    http_status = 408
    code = "request_timeout"


class Unavailable(ServeError):
    """The batcher is closed (shutting down) or its queue is full: try again later."""

    http_status = 503
    code = "unavailable"
