"""ASGI middleware that records the status of every prediction response actually sent.

One place for the metrics of ``/v1/predict`` (whatever branch answered): it reads the
status from the ``http.response.start`` message that goes to the client. It also turns
what would otherwise become uvicorn's text/plain 500 into JSON:

* an exception escaping the app: 500 ``{"error": {"code": "internal"}}`` (logged once);
* a request cancelled because the graceful-shutdown timeout ran out: 503
  ``{"error": {"code": "shutdown"}}``, counted in :attr:`RequestTally.cut_off` so the
  server can report that shutdown did not drain cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from abkd_deploy.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Scope key where an endpoint leaves the machine-readable reason of an error answer.
ERROR_CODE_KEY = "abkd.error_code"


def error_response(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a JSON error answer (the connection is closed after it)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


@dataclass
class RequestTally:
    """Live request counts of one app (event-loop thread only).

    Attributes:
        in_flight: requests to the recorded path being answered now.
        cut_off: requests cancelled before they were answered (graceful-shutdown timeout).
    """

    in_flight: int = 0
    cut_off: int = 0


class RequestAccounting:
    """Wraps an ASGI app; counts and times requests to ``path`` by the status really sent.

    Args:
        app: the wrapped ASGI app.
        metrics: where requests are recorded.
        tally: live counts, shared with the server (``app.state.tally``).
        path: the path whose requests are recorded.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServeMetrics,
        tally: RequestTally,
        path: str = "/v1/predict",
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tally = tally
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent: dict[str, int] = {}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = int(message["status"])
            await send(message)

        counted = scope.get("path") == self.path
        self.tally.in_flight += counted
        try:
            await self.app(scope, receive, tracking_send)
        except (asyncio.CancelledError, Exception) as exc:
            answered = "status" in sent
            _, code = await answer_failure(
                exc, scope.get("path"), tracking_send, self.tally, answered
            )
            if not answered:
                scope[ERROR_CODE_KEY] = code
        finally:
            self.tally.in_flight -= counted
            if counted:
                status = sent.get("status", 500)
                reason = scope.get(ERROR_CODE_KEY) if status >= 400 else None
                self.metrics.observe_request(status, time.perf_counter() - start, reason)


async def answer_failure(
    exc: BaseException, path: Any, send: Send, tally: RequestTally, answered: bool
) -> tuple[int, str]:
    """What a request that ended in an exception gets (logged once), unless ``answered``:
    cancelled by the graceful-shutdown timeout, a JSON 503 ``shutdown`` (counted in
    ``tally.cut_off``); any other exception, a JSON 500 ``internal``. Rather than
    uvicorn's text 500.

    Returns:
        ``(status, code)`` of that answer.
    """
    if isinstance(exc, asyncio.CancelledError):
        tally.cut_off += 1
        log.error("request to %s cut off unanswered by shutdown", path)
        status, code = 503, "shutdown"
        msg = "the server shut down before this request was answered; retry"
    else:
        log.error("request to %s failed", path, exc_info=exc)
        status, code, msg = 500, "internal", f"internal error: {type(exc).__name__}"
    if not answered:
        await send_error(send, status, code, msg)
    return status, code


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """Sends a whole JSON error answer (:func:`error_response`)."""
    headers, body = error_response(status, code, message)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
