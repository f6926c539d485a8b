"""HTTP serving: a FastAPI app over a :class:`Predictor` and a :class:`MicroBatcher`.

Endpoints:

* ``POST /v1/predict`` ``{"node_ids": [...], "return_embedding": false}`` ->
  ``{"predictions": [class per id], "scores": [[probability per class] per id]}``, plus
  ``"embeddings"`` when asked for. Errors answer ``{"error": {"code", "message", ...}}``:
  malformed JSON 400 (also ``NaN``/``Infinity``, which are not JSON), a body that does not
  arrive within the body timeout 408, a bad body or invalid ids 422 (``values`` lists the
  offending ids), too many ids or too large a body 413, shutting down / overloaded 503.
  Every error, including 404/405 and an internal 500, is a JSON body.
* ``GET /healthz``: provider, model and limits.
* ``GET /metrics``: Prometheus text (see :mod:`abkd_deploy.serve.metrics`).

Metrics of ``/v1/predict`` are recorded in one place, from the status actually sent
(:mod:`abkd_deploy.serve.accounting`). Connections have bounded header/body read times, a
bounded keep-alive and a bound on their number (:mod:`abkd_deploy.serve.limits`).

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and waits for in-flight
requests (up to the graceful timeout); the app's lifespan shutdown then drains the
micro-batcher. Requests cut off by the timeout get a JSON 503 and make :func:`serve` fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from abkd_deploy.errors import ConfigError, ServeError
from abkd_deploy.serve.accounting import ERROR_CODE_KEY, RequestAccounting, RequestTally
from abkd_deploy.serve.batcher import MicroBatcher
from abkd_deploy.serve.errors import BatchTooLarge, RequestError, RequestTimeout, Unavailable
from abkd_deploy.serve.limits import HttpLimits, uvicorn_config
from abkd_deploy.serve.metrics import CONTENT_TYPE, ServeMetrics
from abkd_deploy.serve.predictor import Prediction, Predictor
from abkd_deploy.serve.validate import as_node_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_WAIT_MS = 2.0
_FIELDS = {"node_ids", "return_embedding"}


class _BadRequest(RequestError):
    """Malformed JSON (400) or a body of the wrong shape (422)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code


def _error_body(exc: Exception, code: str) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": str(exc)}
    if hasattr(exc, "values"):
        err["values"] = exc.values
    if isinstance(exc, BatchTooLarge):
        err["size"], err["limit"] = exc.size, exc.limit
    return {"error": err}


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """Reads the body, refusing more than ``limit`` bytes (413) without buffering it all,
    and a body that has not fully arrived after ``timeout_s`` seconds (408)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _BadRequest(f"body has {length} bytes; at most {limit} are allowed", 413, "too_large")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BadRequest(f"body exceeds {limit} bytes", 413, "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s; closing the connection"
        ) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _parse(body: bytes) -> tuple[Any, bool]:
    """Parses ``{"node_ids": [...], "return_embedding": bool}``."""
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(f"body is not valid JSON: {exc}", 400, "malformed_json") from None
    if not isinstance(payload, dict):
        raise _BadRequest(
            f"body must be a JSON object, got {type(payload).__name__}", 422, "invalid_request"
        )
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise _BadRequest(
            f"unknown field(s) {unknown}; expected {sorted(_FIELDS)}", 422, "invalid_request"
        )
    if "node_ids" not in payload:
        raise _BadRequest("body needs 'node_ids': a list of node ids", 422, "invalid_request")
    want_emb = payload.get("return_embedding", False)
    if not isinstance(want_emb, bool):
        raise _BadRequest(
            f"return_embedding must be true or false, got {want_emb!r}", 422, "invalid_request"
        )
    return payload["node_ids"], want_emb


def create_app(
    predictor: Predictor,
    max_batch: int | None = None,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_ids_per_request: int | None = None,
    max_queue: int = 10_000,
    body_timeout_s: float = HttpLimits.body_timeout_s,
    min_batch: int = 1,
) -> FastAPI:
    """Builds the serving app (the batcher starts and drains with the app's lifespan).

    Args:
        predictor: the loaded model (an ``embedded`` export).
        max_batch: node ids per model run (default: ``min(predictor.max_batch, 1024)``).
        max_wait_ms: the longest a request waits for others to reach ``min_batch`` ids
            (an upper bound, not a delay: a free model runs a request at once).
        max_ids_per_request: node ids allowed in one request (default ``max_batch``).
        max_queue: requests allowed to wait; more are answered 503.
        body_timeout_s: a request body must arrive within this time, else 408.
        min_batch: ids worth waiting for (up to ``max_wait_ms``); 1: never wait.

    Raises:
        ConfigError: limits that do not fit together, or a non-``embedded`` export.
    """
    if predictor.format != "embedded":
        raise ConfigError(
            f"serve needs an 'embedded' export; {predictor.export_dir} is {predictor.format!r}"
        )
    max_batch = int(max_batch or min(predictor.max_batch, DEFAULT_MAX_BATCH))
    max_ids = int(max_ids_per_request or max_batch)
    if not 1 <= max_batch <= predictor.max_batch:
        raise ConfigError(f"max_batch must be in [1, {predictor.max_batch}], got {max_batch}")
    if not 1 <= max_ids <= max_batch:
        raise ConfigError(
            f"max_ids_per_request must be in [1, max_batch={max_batch}], got {max_ids}"
        )
    if not 1 <= min_batch <= max_batch:
        raise ConfigError(f"min_batch must be in [1, max_batch={max_batch}], got {min_batch}")
    if not body_timeout_s > 0:
        raise ConfigError(f"body_timeout_s must be > 0 seconds, got {body_timeout_s!r}")
    max_body = 4096 + 64 * max_ids
    with_embedding = predictor.has_embedding
    metrics = ServeMetrics(info={"provider": predictor.provider, "format": predictor.format})
    tally = RequestTally()

    def run_batch(ids: Any) -> Prediction:
        start = time.perf_counter()
        pred = predictor.predict(ids, return_embedding=with_embedding)
        metrics.observe_batch(len(pred), time.perf_counter() - start)
        return pred

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(
            run_batch, max_batch, max_wait_ms, max_queue=max_queue, min_batch=min_batch
        )
        app.state.batcher = batcher
        log.info("serving %r: max_batch=%d max_wait_ms=%s", predictor, max_batch, max_wait_ms)
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)
            log.info("micro-batcher drained")

    app = FastAPI(
        title="abkd-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.metrics = metrics
    app.state.predictor = predictor
    app.state.tally = tally
    app.add_middleware(RequestAccounting, metrics=metrics, tally=tally)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        request.scope[ERROR_CODE_KEY] = code
        body = {
            "error": {"code": code, "message": f"{request.method} {request.url.path}: {exc.detail}"}
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        headers = None
        try:
            node_ids, want_emb = _parse(await _read_body(request, max_body, body_timeout_s))
            if want_emb and not with_embedding:
                raise _BadRequest("this model has no embedding output", 422, "invalid_request")
            if isinstance(node_ids, list) and len(node_ids) > max_ids:
                raise BatchTooLarge(len(node_ids), max_ids, what="request")
            ids = as_node_ids(node_ids, predictor.num_nodes, max_ids)
            pred = await request.app.state.batcher.apredict(ids)
            content: dict[str, Any] = {
                "predictions": pred.classes.tolist(),
                "scores": pred.scores.tolist(),
            }
            if want_emb:
                content["embeddings"] = pred.embedding.tolist()
            status = 200
        except (RequestError, Unavailable) as exc:
            request.scope[ERROR_CODE_KEY] = exc.code
            status = exc.http_status
            content = _error_body(exc, exc.code)
            if isinstance(exc, RequestTimeout) or exc.code == "too_large":
                headers = {"connection": "close"}  # the rest of the body may still come
        return JSONResponse(content, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        batcher = getattr(request.app.state, "batcher", None)
        ok = batcher is not None and not batcher.closed
        body = {
            "status": "ok" if ok else "unavailable",
            **predictor.info(),
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "max_ids_per_request": max_ids,
            "queued": batcher.queued if batcher is not None else 0,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``SO_REUSEADDR``, like uvicorn's own).

    Raises:
        ServeError: the port is in use, not ours to bind, or the address is not local.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        where = f"port {port} on {host}"
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"{where} is already in use (another server is running there?); stop it or "
                "pick another port with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ServeError(
                f"{where}: permission denied (ports below 1024 need privileges); "
                "pick another port with --port"
            ) from None
        raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    export_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_ids: int | None = None,
    log_level: str = "info",
    limits: HttpLimits | None = None,
) -> None:
    """Loads ``export_dir`` and serves it over HTTP with uvicorn until SIGTERM/SIGINT.

    On SIGTERM or SIGINT, uvicorn stops accepting connections, lets in-flight requests
    finish (up to ``limits.graceful_timeout_s``; a second SIGINT forces the exit), the
    batcher drains, and this function returns normally (exit status 0 from the CLI). If
    the timeout cut off requests, they get a JSON 503 and this function raises.

    Args:
        export_dir: an ``embedded`` export directory.
        host: interface to bind (loopback by default: the API has no authentication).
        port: TCP port (0 picks a free one).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: onnxruntime intra-op threads.
        max_batch: node ids per model run.
        max_wait_ms: micro-batching wait.
        max_ids: node ids per request (default ``max_batch``).
        log_level: uvicorn log level.
        limits: read timeouts, keep-alive, connection bound, graceful timeout.

    Raises:
        ServeError: the port cannot be bound (in use: one line, exit 1), or shutdown cut
            off requests still in flight after the graceful timeout.
    """
    import uvicorn

    limits = limits or HttpLimits()
    predictor = Predictor(export_dir, device=device, threads=threads, max_batch=max_batch)
    app = create_app(
        predictor, max_batch, max_wait_ms, max_ids, body_timeout_s=limits.body_timeout_s
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API has no authentication; expose it with care", host)
    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn_config(app, host, bound, limits, log_level)
    note = f" ({predictor.info()['device_note']})" if predictor.info()["device_note"] else ""
    print(f"abkd-deploy serve: {predictor.format} model on {predictor.provider}{note}", flush=True)
    print(f"abkd-deploy serve: listening on http://{host}:{bound}", flush=True)
    server = uvicorn.Server(config)
    try:
        with _exit_quietly_after_drain():
            server.run(sockets=[sock])
    finally:
        sock.close()
    cut = app.state.tally.cut_off
    if cut:
        raise ServeError(
            f"shutdown cut off {cut} request(s) still unanswered after the "
            f"{limits.graceful_timeout_s:g} s graceful timeout (they got 503)"
        )
    print("abkd-deploy serve: stopped after draining in-flight requests", flush=True)


@contextlib.contextmanager
def _exit_quietly_after_drain() -> Iterator[None]:
    """Makes a graceful shutdown end the process with status 0.

    uvicorn handles SIGTERM/SIGINT itself and, once drained, re-raises the signal with the
    handler it found installed; with these no-op handlers that ends :func:`serve` normally
    instead of killing the process or raising KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
