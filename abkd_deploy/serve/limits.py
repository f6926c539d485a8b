"""Connection limits of the HTTP server: read timeouts, keep-alive, concurrency.

uvicorn bounds the keep-alive idle time (``timeout_keep_alive``) and the number of
concurrent connections (``limit_concurrency``: beyond it, requests get 503), and h11 bounds
the header size (16 KiB). What neither bounds is the time a client may take to *send* its
headers: a connection that sends nothing, or half a request line, stays open forever.
:func:`bounded_h11` adds that deadline; the body read deadline is enforced by the app
(``create_app(body_timeout_s=...)`` answers 408).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from abkd_deploy.errors import ConfigError


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection bounds of the server (all times in seconds).

    Attributes:
        header_timeout_s: from connect (or the end of the previous response) until a
            request's headers are complete; then the connection is closed.
        body_timeout_s: to receive a request's whole body; then 408 and close.
        keep_alive_s: how long an idle keep-alive connection stays open.
        max_connections: concurrent connections (+ running requests) served; requests
            beyond it get 503.
        graceful_timeout_s: on shutdown, how long in-flight requests may still take.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_connections: int = 4096
    graceful_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "graceful_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {value!r}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")


def bounded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for receiving each request's headers.

    The deadline starts when the connection is made and again when a response is
    complete (the keep-alive wait counts towards it); it is met when the next request's
    headers are parsed (uvicorn then starts a new request cycle). A missed deadline
    closes the connection.
    """

    class BoundedH11Protocol(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            self._arm_header_deadline()  # before super(): it may start a pipelined request
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_timer = self.loop.call_later(
                header_timeout_s, self._header_deadline_missed, self.cycle
            )

        def _cancel_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline_missed(self, cycle_when_armed: Any) -> None:
            self._header_timer = None
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()  # no new request arrived in time

    return BoundedH11Protocol


def uvicorn_config(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: HttpLimits | None = None,
    log_level: str = "info",
) -> Any:
    """The ``uvicorn.Config`` that :func:`abkd_deploy.serve.server.serve` runs ``app`` with."""
    import uvicorn

    limits = limits or HttpLimits()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=bounded_h11(limits.header_timeout_s),
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=limits.graceful_timeout_s,
    )
