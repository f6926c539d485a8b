"""Connection limits of the HTTP server: read timeouts, keep-alive, concurrency.

uvicorn bounds the keep-alive idle time (``timeout_keep_alive``) and the number of
concurrent connections (``limit_concurrency``: beyond it, requests get 503), and h11 bounds
the header size (16 KiB). What neither bounds is the time a client may take to *send* its
headers: a connection that sends nothing, or half a request line, stays open forever.
:class:`BoundedH11Protocol` and :class:`BoundedHttpToolsProtocol` (the faster parser,
used when httptools is installed; it also gets h11's header size bound) add that deadline;
the body read deadline is enforced by the app (``create_app(body_timeout_s=...)`` answers
408). Beyond ``max_connections`` both answer a JSON 503 ``overloaded`` instead of uvicorn's
plain text. uvloop is used when installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import uvicorn
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


#: Largest request line + headers accepted (h11's own bound; httptools gets the same).
MAX_HEADER_BYTES = 16 * 1024


def _header_timeout(config: Any) -> float:
    return float(getattr(config, "header_timeout_s", HttpLimits.header_timeout_s))


class _ServerTasks:
    """The request tasks of this process's uvicorn server (``ServerState.tasks``: one per
    request whose headers were parsed, until it is answered), once a connection is made."""

    tasks: set[Any] | None = None


def open_requests() -> int:
    """Requests this process's uvicorn server has parsed and not yet answered, those
    whose task has not started included (0 when not served by uvicorn's protocols)."""
    tasks = _ServerTasks.tasks
    return 0 if tasks is None else len(tasks)


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: a deadline for receiving each request's headers.

    The deadline starts when the connection is made and again when a response is
    complete (the keep-alive wait counts towards it); it is met when the next request's
    headers are parsed (uvicorn then starts a new request cycle). A missed deadline
    closes the connection. The time comes from ``config.header_timeout_s``
    (:class:`ServeConfig`), so the protocol class is importable by name in worker processes.
    """

    _header_timer: Any = None
    config: Any
    cycle: Any
    loop: Any
    transport: Any

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        _ServerTasks.tasks = getattr(self, "tasks", None)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        self._arm_header_deadline()  # before super(): it may start a pipelined request
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_timer = self.loop.call_later(
            _header_timeout(self.config), self._header_deadline_missed, self.cycle
        )

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_missed(self, cycle_when_armed: Any) -> None:
        self._header_timer = None
        if self.cycle is cycle_when_armed and not self.transport.is_closing():
            self.transport.close()  # no new request arrived in time


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The answer beyond ``--max-connections``: a JSON 503 (uvicorn's own is plain text)."""
    from abkd_deploy.serve.accounting import send_error

    msg = "the server is at its connection limit (--max-connections); retry later"
    await send_error(send, 503, "overloaded", msg)


class _JsonOverload:
    """Mixin for a uvicorn HTTP protocol: over the concurrency limit, a JSON 503.

    uvicorn checks ``limit_concurrency`` when a request's headers are complete and then
    runs its plain-text ``service_unavailable`` app instead of ``self.app``. This mixin
    takes the limit over (uvicorn's own check is switched off) and makes ``self.app``,
    which uvicorn reads right there, :func:`_overloaded` while the same bound is exceeded.
    """

    connections: Any
    tasks: Any
    logger: Any
    limit_concurrency: int | None
    _app: Any = None
    _max_concurrency: int | None = None

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        self._max_concurrency, self.limit_concurrency = self.limit_concurrency, None

    @property
    def app(self) -> Any:
        limit = self._max_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit.")
            return _overloaded
        return self._app

    @app.setter
    def app(self, app: Any) -> None:
        self._app = app


class BoundedH11Protocol(_JsonOverload, _HeaderDeadline, H11Protocol):
    """uvicorn's pure-Python h11 protocol with the header deadline (h11 bounds header size)."""


def _httptools_protocol() -> type | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools not installed
        return None

    class BoundedHttpToolsProtocol(_JsonOverload, _HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools (llhttp) protocol with the header deadline and h11's header
        size bound: llhttp itself buffers headers without limit.

        Bytes are counted per read while a request's headers are incomplete; a read in
        which one request's headers end and the next one's begin (pipelining) is not
        counted, so the bound is :data:`MAX_HEADER_BYTES` plus at most one read.
        Oversized headers get uvicorn's own 400 and the connection is closed, as with h11.
        """

        _in_headers = True
        _header_bytes = 0
        _headers_ended = False

        def data_received(self, data: bytes) -> None:
            self._headers_ended = False
            super().data_received(data)
            if not self._in_headers or self._headers_ended:
                self._header_bytes = 0
                return
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self.logger.warning("request headers exceed %d bytes", MAX_HEADER_BYTES)
                self.send_400_response("Invalid HTTP request received.")

        def on_message_begin(self) -> None:
            self._in_headers = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_headers, self._headers_ended = False, True
            super().on_headers_complete()

    BoundedHttpToolsProtocol.__module__ = __name__
    BoundedHttpToolsProtocol.__qualname__ = "BoundedHttpToolsProtocol"
    return BoundedHttpToolsProtocol


#: httptools' protocol with the same bounds, or ``None`` where httptools is not installed.
BoundedHttpToolsProtocol = _httptools_protocol()

#: The HTTP parsers :func:`uvicorn_config` accepts (``auto``: httptools when installed).
HTTP_PARSERS = ("auto", "httptools", "h11")


def http_protocol(parser: str = "auto") -> type:
    """The bounded uvicorn protocol class of ``parser`` (``auto``: httptools if installed).

    Raises:
        ConfigError: an unknown parser, or ``httptools`` when it is not installed.
    """
    if parser not in HTTP_PARSERS:
        raise ConfigError(f"unknown HTTP parser {parser!r}; expected one of {list(HTTP_PARSERS)}")
    if parser == "h11" or (parser == "auto" and BoundedHttpToolsProtocol is None):
        return BoundedH11Protocol
    if BoundedHttpToolsProtocol is None:
        raise ConfigError("the httptools parser is not installed (pip install httptools)")
    return BoundedHttpToolsProtocol


def event_loop(loop: str = "auto") -> str:
    """uvicorn's loop setting: ``uvloop`` when installed (``auto``), else ``asyncio``."""
    if loop != "auto":
        return loop
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


class ServeConfig(uvicorn.Config):
    """``uvicorn.Config`` that also carries the header deadline (picklable, for workers)."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s


def uvicorn_config(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: HttpLimits | None = None,
    log_level: str = "info",
    http: str = "auto",
    **kwargs: Any,
) -> ServeConfig:
    """The uvicorn config that :func:`abkd_deploy.serve.server.serve` runs ``app`` with.

    Args:
        app: the ASGI app, or a picklable app factory with ``factory=True``.
        host: interface.
        port: TCP port.
        limits: connection bounds.
        log_level: uvicorn log level.
        http: ``auto`` (httptools when installed, else h11), ``httptools`` or ``h11``.
        **kwargs: more ``uvicorn.Config`` arguments (``factory``, ``workers``).
    """
    limits = limits or HttpLimits()
    return ServeConfig(
        app,
        host=host,
        port=port,
        http=http_protocol(http),
        loop=event_loop(),
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=limits.graceful_timeout_s,
        header_timeout_s=limits.header_timeout_s,
        **kwargs,
    )
