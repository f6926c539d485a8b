"""HTTP serving: a FastAPI app over a :class:`Predictor` and a :class:`MicroBatcher`.

Endpoints:

* ``POST /v1/predict`` ``{"node_ids": [...], "return_embedding": false}`` ->
  ``{"predictions": [class per id], "scores": [[probability per class] per id]}``, plus
  ``"embeddings"`` when asked for. Errors answer ``{"error": {"code", "message", ...}}``:
  malformed JSON 400, a bad body or invalid ids 422 (``values`` lists the offending ids),
  too many ids or too large a body 413, shutting down / overloaded 503.
* ``GET /healthz``: provider, model and limits.
* ``GET /metrics``: Prometheus text (see :mod:`abkd_deploy.serve.metrics`).

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and waits for in-flight
requests; the app's lifespan shutdown then drains the micro-batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve.batcher import MicroBatcher
from abkd_deploy.serve.errors import BatchTooLarge, RequestError, Unavailable
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


async def _read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing more than ``limit`` bytes (413) without buffering it all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _BadRequest(f"body has {length} bytes; at most {limit} are allowed", 413, "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(f"body exceeds {limit} bytes", 413, "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[Any, bool]:
    """Parses ``{"node_ids": [...], "return_embedding": bool}``."""
    try:
        payload = json.loads(body)
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
) -> FastAPI:
    """Builds the serving app (the batcher starts and drains with the app's lifespan).

    Args:
        predictor: the loaded model (an ``embedded`` export).
        max_batch: node ids per model run (default: ``min(predictor.max_batch, 1024)``).
        max_wait_ms: how long a request waits for others to share its run.
        max_ids_per_request: node ids allowed in one request (default ``max_batch``).
        max_queue: requests allowed to wait; more are answered 503.

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
    max_body = 4096 + 64 * max_ids
    with_embedding = predictor.has_embedding
    metrics = ServeMetrics(info={"provider": predictor.provider, "format": predictor.format})

    def run_batch(ids: Any) -> Prediction:
        start = time.perf_counter()
        pred = predictor.predict(ids, return_embedding=with_embedding)
        metrics.observe_batch(len(pred), time.perf_counter() - start)
        return pred

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = MicroBatcher(run_batch, max_batch, max_wait_ms, max_queue=max_queue)
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

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        code = None
        try:
            node_ids, want_emb = _parse(await _read_body(request, max_body))
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
            code = exc.code
            status = exc.http_status
            content = _error_body(exc, code)
        except Exception as exc:
            log.exception("prediction failed")
            code, status = "internal", 500
            content = _error_body(RuntimeError(f"internal error: {type(exc).__name__}"), code)
        metrics.observe_request(status, time.perf_counter() - start, code)
        return JSONResponse(content, status_code=status)

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
    graceful_timeout_s: float = 30.0,
) -> None:
    """Loads ``export_dir`` and serves it over HTTP with uvicorn until SIGTERM/SIGINT.

    On SIGTERM or SIGINT, uvicorn stops accepting connections, lets in-flight requests
    finish (up to ``graceful_timeout_s``; a second SIGINT forces the exit), the batcher
    drains, and this function returns normally (exit status 0 from the CLI).

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
        graceful_timeout_s: how long to wait for in-flight requests on shutdown.
    """
    import uvicorn

    predictor = Predictor(export_dir, device=device, threads=threads, max_batch=max_batch)
    app = create_app(predictor, max_batch, max_wait_ms, max_ids)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API has no authentication; expose it with care", host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    note = f" ({predictor.info()['device_note']})" if predictor.info()["device_note"] else ""
    print(f"abkd-deploy serve: {predictor.format} model on {predictor.provider}{note}", flush=True)
    server = uvicorn.Server(config)
    with _exit_quietly_after_drain():
        server.run()
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
