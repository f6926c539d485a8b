"""``POST /v1/predict`` as a plain ASGI endpoint: the serving hot path.

Every request of a serving process goes through this one function, so it does only what
the request needs: no framework request object, dependency solving, routing or
middleware, which cost a bare FastAPI app ~100 us per request (measured with
``benchmarks/http_overhead.py``). :class:`~abkd_deploy.serve.server.ServingApp` hands
``POST /v1/predict`` straight to it; every other request (``/healthz``, ``/metrics``, a
``GET /v1/predict`` that gets its 405) goes through FastAPI.

It also does what :class:`~abkd_deploy.serve.accounting.RequestAccounting` does for the
other paths: it records every answer in the metrics by the status actually sent, and
answers an unexpected exception or a shutdown cut-off as that middleware does
(:func:`~abkd_deploy.serve.accounting.answer_failure`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect

from abkd_deploy.serve.accounting import Receive, RequestTally, Scope, Send, answer_failure
from abkd_deploy.serve.errors import BatchTooLarge, RequestError, RequestTimeout, Unavailable
from abkd_deploy.serve.metrics import ServeMetrics
from abkd_deploy.serve.wire import BINARY_TYPE, JSON_TYPE, BadRequest, wants_binary

#: ``asyncio.timeout`` (Python 3.11+), else ``None``.
_timeout = getattr(asyncio, "timeout", None)
_JSON = JSON_TYPE.encode()
_BINARY = BINARY_TYPE.encode()

#: ``answer(body, binary)`` -> ``(response body, extra headers)``; raises RequestError or
#: Unavailable for a request that gets an error answer.
Answer = Callable[[bytes, bool], Awaitable[tuple[bytes, list[tuple[bytes, bytes]]]]]


def error_body(exc: Exception, code: str) -> dict[str, Any]:
    """``{"error": {"code", "message", ...}}`` for a request error (``values`` lists the
    offending ids; ``size`` and ``limit`` for too many ids)."""
    err: dict[str, Any] = {"code": code, "message": str(exc)}
    if hasattr(exc, "values"):
        err["values"] = exc.values
    if isinstance(exc, BatchTooLarge):
        err["size"], err["limit"] = exc.size, exc.limit
    return {"error": err}


async def receive_body(
    receive: Receive, content_length: bytes | None, limit: int, timeout_s: float
) -> bytes:
    """Reads a request body from ASGI ``receive`` messages.

    Args:
        receive: the ASGI receive callable.
        content_length: the request's ``content-length`` header, if any.
        limit: most bytes accepted.
        timeout_s: the whole body must arrive within this time.

    Raises:
        BadRequest: more than ``limit`` bytes (413), refused before reading when the
            header says so.
        RequestTimeout: the body did not arrive within ``timeout_s`` (408).
        ClientDisconnect: the client went away first.
    """
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise BadRequest(
            f"body has {content_length.decode()} bytes; at most {limit} are allowed",
            413,
            "too_large",
        )

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"body exceeds {limit} bytes", 413, "too_large")
            if not message.get("more_body", False):
                return chunk if not chunks else b"".join([*chunks, chunk])
            chunks.append(chunk)

    try:
        if _timeout is None:  # Python 3.10
            return await asyncio.wait_for(read(), timeout_s)
        # a deadline on this task: no extra task and loop iterations, which wait_for costs
        async with _timeout(timeout_s):
            return await read()
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s; closing the connection"
        ) from None


def _error_json(content: dict[str, Any]) -> bytes:
    """An error body, written as Starlette's ``JSONResponse`` writes it (stdlib ``json``:
    ids beyond 64 bits, which orjson refuses, are echoed back as they came)."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class PredictEndpoint:
    """The ASGI app of ``POST /v1/predict``.

    Args:
        answer: parses a body and answers it (model run included).
        metrics: where every answer is recorded.
        tally: live request counts shared with the server.
        max_body: most body bytes accepted (413 beyond).
        body_timeout_s: the body must arrive within this time (408).
    """

    def __init__(
        self,
        answer: Answer,
        metrics: ServeMetrics,
        tally: RequestTally,
        max_body: int,
        body_timeout_s: float,
    ) -> None:
        self.answer = answer
        self.metrics = metrics
        self.tally = tally
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status, reason, started = 500, "internal", False
        self.tally.in_flight += 1
        try:
            length = accept = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = value
                elif name == b"accept":
                    accept = value
            binary = accept is not None and wants_binary(accept.decode("latin-1"))
            try:
                body = await receive_body(receive, length, self.max_body, self.body_timeout_s)
                content, headers = await self.answer(body, binary)
                status, reason = 200, None
                kind = _BINARY if binary else _JSON
            except (RequestError, Unavailable) as exc:
                status, reason = exc.http_status, exc.code
                content = _error_json(error_body(exc, exc.code))
                kind, headers = _JSON, []
                if isinstance(exc, RequestTimeout) or exc.code == "too_large":
                    headers = [(b"connection", b"close")]  # the rest of the body may come
            started = True
            await _respond(send, status, kind, content, headers)
        except ClientDisconnect:
            status, reason = 499, "client_disconnected"  # nginx's code: nothing was sent
        except (asyncio.CancelledError, Exception) as exc:
            failed = await answer_failure(exc, scope["path"], send, self.tally, started)
            if not started:
                status, reason = failed
        finally:
            self.tally.in_flight -= 1
            self.metrics.observe_request(status, time.perf_counter() - start, reason)


async def _respond(
    send: Send, status: int, kind: bytes, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    head = [(b"content-type", kind), (b"content-length", b"%d" % len(body)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})
