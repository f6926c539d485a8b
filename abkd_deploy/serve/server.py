"""HTTP serving: a FastAPI app over a :class:`Predictor` and a :class:`MicroBatcher`.

Endpoints:

* ``POST /v1/predict`` ``{"node_ids": [...], "return_embedding": false, "format": "full"}``
  -> ``{"predictions": [class per id], "scores": [[probability per class] per id]}``, plus
  ``"embeddings"`` when asked for; ``"format": "top1"`` drops the scores, and
  ``Accept: application/octet-stream`` gets a binary body (:mod:`abkd_deploy.serve.wire`:
  orjson parsing and encoding, float32 shortest decimals). ``"nodes": [{"features": [...],
  "neighbors": [ids]}]`` asks about nodes that are not in the export (alone or after
  ``node_ids``; :mod:`abkd_deploy.serve.new_nodes`), answered after the ids. Errors are always JSON,
  ``{"error": {"code", "message", ...}}``:
  malformed JSON 400 (also ``NaN``/``Infinity``, which are not JSON), a body that does not
  arrive within the body timeout 408, a bad body or invalid ids 422 (``values`` lists the
  offending ids), too many ids or too large a body 413, shutting down / overloaded 503.
  Every error, including 404/405 and an internal 500, is a JSON body.
* ``GET /healthz``: provider, model, limits and the answering process's ``pid``.
* ``GET /metrics``: Prometheus text (see :mod:`abkd_deploy.serve.metrics`).

Metrics of ``/v1/predict`` are recorded in one place, from the status actually sent
(:mod:`abkd_deploy.serve.accounting`). Connections have bounded header/body read times, a
bounded keep-alive and a bound on their number (:mod:`abkd_deploy.serve.limits`).

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections and waits for in-flight
requests (up to the graceful timeout); the app's lifespan shutdown then drains the
micro-batcher. Requests cut off by the timeout get a JSON 503 and make :func:`serve` fail.
``workers > 1``: see :mod:`abkd_deploy.serve.workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from abkd_deploy.errors import ConfigError, ServeError
from abkd_deploy.serve.accounting import (
    ERROR_CODE_KEY,
    Receive,
    RequestAccounting,
    RequestTally,
    Scope,
    Send,
)
from abkd_deploy.serve.batcher import MicroBatcher
from abkd_deploy.serve.limits import HttpLimits, http_protocol, open_requests, uvicorn_config
from abkd_deploy.serve.metrics import CONTENT_TYPE, ServeMetrics
from abkd_deploy.serve.predict_endpoint import PredictEndpoint, receive_body
from abkd_deploy.serve.predictor import Prediction, Predictor
from abkd_deploy.serve.versions import (
    DEFAULT_POLL_S,
    ModelVersions,
    ServedModel,
    VersionMetrics,
    VersionWatcher,
)
from abkd_deploy.serve.wire import PredictRequest, encode_binary, encode_json, parse_request

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_WAIT_MS = 2.0
#: A request of at most this many ids that finds the model free runs at once on the event
#: loop (no future, no thread hand-off): such a run costs about as much as the hand-off.
INLINE_IDS = 256


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """The JSON answer to a routing error (404 ``not_found``, 405 ``method_not_allowed``)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    request.scope[ERROR_CODE_KEY] = code
    body = {
        "error": {"code": code, "message": f"{request.method} {request.url.path}: {exc.detail}"}
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """:func:`~abkd_deploy.serve.predict_endpoint.receive_body` for a framework ``Request``
    (413 beyond ``limit`` bytes, 408 after ``timeout_s``)."""
    length = request.headers.get("content-length")
    encoded = None if length is None else length.encode()
    return await receive_body(request.receive, encoded, limit, timeout_s)


class ServingApp(FastAPI):
    """The serving app: FastAPI, except that ``POST /v1/predict`` goes straight to its
    :class:`~abkd_deploy.serve.predict_endpoint.PredictEndpoint` (no middleware, routing
    or request object on the hot path; the endpoint does its own accounting)."""

    predict_endpoint: PredictEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.predict_endpoint
        if (
            endpoint is not None
            and scope["type"] == "http"
            and scope["path"] == "/v1/predict"
            and scope["method"] == "POST"
        ):
            await endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    predictor: Predictor | ModelVersions,
    max_batch: int | None = None,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_ids_per_request: int | None = None,
    max_queue: int = 10_000,
    body_timeout_s: float = HttpLimits.body_timeout_s,
    min_batch: int = 1,
) -> ServingApp:
    """Builds the serving app (the batcher starts and drains with the app's lifespan).

    Args:
        predictor: the loaded model (an ``embedded`` export), or the versions of a model
            directory (:class:`~abkd_deploy.serve.versions.ModelVersions`: hot swap, and
            ``model_version`` in every answer).
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
    if isinstance(predictor, ModelVersions):
        models = predictor
        predictor = models.current.predictor
    else:
        models = ModelVersions(ServedModel(predictor, None, predictor.export_dir))
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
    # requests queued or running that asked for embeddings (written by the event loop,
    # read by the runs): a run fetches the embedding output only while one is
    embedding_wanted = [0]
    metrics = ServeMetrics(info={"provider": predictor.provider, "format": predictor.format})
    if models.watcher is not None:
        models.metrics = VersionMetrics(metrics)
        models.watcher.attach(models.metrics, models.current)
    tally = RequestTally()

    def make_batcher(model: Predictor) -> MicroBatcher:
        """One batcher per model version: a run never mixes versions."""

        def run_batch(ids: Any) -> Prediction:
            start = time.perf_counter()
            wanted = embedding_wanted[0] > 0 and model.has_embedding
            pred = model.predict_ids(ids, return_embedding=wanted)  # checked when parsed
            seconds = time.perf_counter() - start
            try:  # a run on the event loop (inline): recorded once the answer is out
                asyncio.get_running_loop().call_soon(metrics.observe_batch, len(pred), seconds)
            except RuntimeError:  # the batcher's thread
                metrics.observe_batch(len(pred), seconds)
            return pred

        return MicroBatcher(
            run_batch,
            max_batch,
            max_wait_ms,
            max_queue=max_queue,
            min_batch=min_batch,
            inline_ids=INLINE_IDS,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models.start(make_batcher)
        app.state.batcher = models.current.batcher
        log.info("serving %r: max_batch=%d max_wait_ms=%s", predictor, max_batch, max_wait_ms)
        try:
            yield
        finally:
            await asyncio.to_thread(models.close)
            log.info("micro-batcher drained")

    app = ServingApp(
        title="abkd-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.metrics = metrics
    app.state.predictor = predictor
    app.state.models = models
    app.state.tally = tally
    app.add_middleware(RequestAccounting, metrics=metrics, tally=tally)

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def run_ids(batcher: MicroBatcher, req: PredictRequest) -> Prediction:
        # nobody else being read or answered, nor parsed and waiting for its task to start
        alone = tally.in_flight <= 1 and open_requests() <= 1
        if not req.return_embedding:
            return await batcher.apredict(req.ids, alone)
        embedding_wanted[0] += 1
        try:
            return await batcher.apredict(req.ids, alone)
        finally:
            embedding_wanted[0] -= 1

    async def run_request(served: ServedModel, req: PredictRequest) -> Prediction:
        if req.nodes is None:
            return await run_ids(served.batcher, req)
        # new nodes: their own small graph, off the event loop, while the ids go through
        # the batcher; the answers come back ids first
        parts = []
        if req.ids.size:
            parts.append(run_ids(served.batcher, req))
        if len(req.nodes):
            predict_nodes = served.predictor.predict_nodes
            parts.append(asyncio.to_thread(predict_nodes, req.nodes, req.return_embedding))
        return Prediction.concat(list(await asyncio.gather(*parts)))

    def parse_for(served: ServedModel, body: bytes) -> PredictRequest:
        model = served.predictor
        limits = None if model.new_nodes is None else model.new_nodes.limits
        return parse_request(body, model.num_nodes, max_ids, with_embedding, limits)

    async def answer(body: bytes, binary: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        served, req, pred = await models.apredict(lambda s: parse_for(s, body), run_request)
        version = served.version
        headers = [] if version is None else [(b"x-model-version", b"%d" % version)]
        if binary:
            return encode_binary(pred, req), headers
        return encode_json(pred, req, version), headers

    endpoint = PredictEndpoint(answer, metrics, tally, max_body, body_timeout_s)
    app.predict_endpoint = endpoint
    # ServingApp hands every POST straight to the endpoint; the route is there so that
    # FastAPI answers the other methods with its JSON 405 (and counts them)
    app.router.routes.append(Route("/v1/predict", endpoint, methods=["POST"]))

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        served = models.current
        batcher = served.batcher
        ok = batcher is not None and not batcher.closed
        body = {
            "status": "ok" if ok else "unavailable",
            **served.predictor.info(),
            **({} if served.version is None else {"model_version": served.version}),
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "min_batch": min_batch,
            "max_ids_per_request": max_ids,
            "pid": os.getpid(),
            "queued": batcher.queued if batcher is not None else 0,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


def bind_socket(
    host: str, port: int, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEADDR``, like uvicorn's own).

    Args:
        host: interface.
        port: TCP port (0 picks a free one).
        reuse_port: also ``SO_REUSEPORT``: each worker process listens on its own socket on
            the same port and the kernel spreads new connections over them.
        listen: start listening (``False``: only reserve the port).

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
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
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


@dataclass(frozen=True)
class AppSettings:
    """Everything a serving process needs to load its model and build its app (picklable:
    worker processes get a copy). Fields as in :func:`serve`."""

    export_dir: str
    device: str = "auto"
    threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_ids: int | None = None
    min_batch: int = 1
    limits: HttpLimits = field(default_factory=HttpLimits)
    log_level: str = "info"
    http: str = "auto"
    poll_s: float = DEFAULT_POLL_S

    def load(self, export_dir: str | Path) -> Predictor:
        """One export directory's :class:`Predictor` (every file's hash checked)."""
        return Predictor(
            export_dir, device=self.device, threads=self.threads, max_batch=self.max_batch
        )

    def build(self) -> FastAPI:
        """Loads the model and builds the app (``app.state.predictor``). A model directory
        ``REPO/<model>`` of version folders is served with hot swap (:mod:`.versions`)."""
        from abkd_deploy.model_repo import is_model_dir

        if is_model_dir(self.export_dir):
            if not self.poll_s > 0:
                raise ConfigError(f"poll_s must be > 0 seconds, got {self.poll_s!r}")
            watcher = VersionWatcher(self.export_dir, self.load)
            predictor: Predictor | ModelVersions = ModelVersions(
                watcher.initial(), watcher, self.poll_s
            )
        else:
            predictor = self.load(self.export_dir)
        return create_app(
            predictor,
            self.max_batch,
            self.max_wait_ms,
            self.max_ids,
            body_timeout_s=self.limits.body_timeout_s,
            min_batch=self.min_batch,
        )


def model_line(app: FastAPI) -> str:
    """``embedded model on CPUExecutionProvider`` (plus the device note, if any)."""
    served = app.state.models.current
    info = served.predictor.info()
    note = f" ({info['device_note']})" if info["device_note"] else ""
    where = "" if served.version is None else f" version {served.version} ({served.path})"
    return f"{info['format']} model{where} on {info['provider']}{note}"


def run_app(
    app: FastAPI, sock: socket.socket, settings: AppSettings, on_started: Any = None
) -> int:
    """Runs ``app`` with uvicorn on the listening ``sock`` until SIGTERM/SIGINT and a drain.

    Args:
        app: from :meth:`AppSettings.build`.
        sock: a listening socket (:func:`bind_socket`); closed on return.
        settings: limits, log level, HTTP parser.
        on_started: called (from another thread) once uvicorn accepts connections.

    Returns:
        How many requests the graceful-shutdown timeout cut off (0: a clean drain).
    """
    import uvicorn

    host, bound = sock.getsockname()[:2]
    config = uvicorn_config(app, host, bound, settings.limits, settings.log_level, settings.http)
    server = uvicorn.Server(config)
    if on_started is not None:

        def notify() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.02)
            if server.started:
                on_started()

        threading.Thread(target=notify, daemon=True).start()
    try:
        with _exit_quietly_after_drain():
            server.run(sockets=[sock])
    finally:
        sock.close()
    return app.state.tally.cut_off


def cut_off_error(cut: int, limits: HttpLimits) -> ServeError:
    """The error :func:`serve` raises when shutdown cut off ``cut`` requests."""
    return ServeError(
        f"shutdown cut off {cut} request(s) still unanswered after the "
        f"{limits.graceful_timeout_s:g} s graceful timeout (they got 503)"
    )


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
    min_batch: int = 1,
    workers: int = 1,
    http: str = "auto",
    poll_s: float = DEFAULT_POLL_S,
) -> None:
    """Loads ``export_dir`` and serves it over HTTP with uvicorn until SIGTERM/SIGINT.

    On SIGTERM or SIGINT, uvicorn stops accepting connections, lets in-flight requests
    finish (up to ``limits.graceful_timeout_s``; a second SIGINT forces the exit), the
    batcher drains, and this function returns normally (exit status 0 from the CLI). If
    the timeout cut off requests, they get a JSON 503 and this function raises.

    Args:
        export_dir: an ``embedded`` export directory, or a model directory
            ``REPO/<model>`` of integer version folders (the newest valid one is served and
            swapped while running: :mod:`abkd_deploy.serve.versions`).
        host: interface to bind (loopback by default: the API has no authentication).
        port: TCP port (0 picks a free one).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: onnxruntime intra-op threads (per worker).
        max_batch: node ids per model run.
        max_wait_ms: the longest a request waits for ``min_batch`` ids (an upper bound:
            a free model runs a request at once).
        max_ids: node ids per request (default ``max_batch``).
        log_level: uvicorn log level.
        limits: read timeouts, keep-alive, connection bound, graceful timeout.
        min_batch: ids worth waiting for (up to ``max_wait_ms``); 1: never wait.
        workers: server processes (each loads the model; see :mod:`.workers`).
        http: HTTP parser: ``auto`` (httptools when installed), ``httptools`` or ``h11``.
        poll_s: a model directory is scanned for new and removed versions this often.

    Raises:
        ServeError: the port cannot be bound (in use: one line, exit 1), or shutdown cut
            off requests still in flight after the graceful timeout.
        ConfigError: ``workers`` < 1, or limits that do not fit together.
    """
    settings = AppSettings(
        str(export_dir),
        device,
        threads,
        max_batch,
        max_wait_ms,
        max_ids,
        min_batch,
        limits or HttpLimits(),
        log_level,
        http,
        poll_s,
    )
    http_protocol(http)  # an unknown or missing parser fails before anything loads
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the API has no authentication; expose it with care", host)
    if workers > 1:
        from abkd_deploy.serve.workers import serve_workers

        serve_workers(settings, host, port, workers)
        return
    app = settings.build()
    sock = bind_socket(host, port)
    print(f"abkd-deploy serve: {model_line(app)}", flush=True)
    print(f"abkd-deploy serve: listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    cut = run_app(app, sock, settings)
    if cut:
        raise cut_off_error(cut, settings.limits)
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
