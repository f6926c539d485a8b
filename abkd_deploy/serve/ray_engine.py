"""``serve --engine ray``: the student as a Ray Serve application (the ``ray`` extra).

Two deployments, both speaking the built-in server's wire format
(:mod:`abkd_deploy.serve.wire`, the error handling of :mod:`abkd_deploy.serve.server`):

* ``StudentModel`` (``--replicas N``): each replica loads the export with
  :class:`~abkd_deploy.serve.predictor.Predictor` (hashes verified) and runs requests in
  ``@serve.batch`` micro-batches of at most ``max_batch`` node ids, waiting at most
  ``max_wait_ms`` for company.
* ``HttpFront`` (as many replicas): the FastAPI ingress behind Ray's HTTP proxy. It reads and
  checks the body exactly like the built-in server (same 400/408/413/422 JSON errors), asks
  a model replica, and encodes the answer. A model replica that dies with the request in
  flight (process killed, node lost) is retried once on another replica; if that fails too
  the client gets a JSON 503 ``replica_failed``. A full queue is a JSON 503 ``unavailable``.

``/healthz`` answers from one model replica (its pid, provider and model) plus the limits;
``/metrics`` is not served (Ray exports its own metrics). Ray is imported lazily: without
the extra, :func:`serve_ray` raises a one-line :class:`ServeError` naming it.
"""

# No `from __future__ import annotations`: the routes are pickled to the replicas, where
# FastAPI must see real annotation objects (a string "Request" would not resolve there).
import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from abkd_deploy.errors import ServeError, first_line
from abkd_deploy.serve.errors import Unavailable
from abkd_deploy.serve.limits import HttpLimits
from abkd_deploy.serve.manifest import load_manifest
from abkd_deploy.serve.new_nodes import NewNodeLimits, new_node_limits
from abkd_deploy.serve.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

RAY_EXTRA = "ray"
APP_NAME = "abkd-deploy"
MODEL_DEPLOYMENT = "StudentModel"
HTTP_DEPLOYMENT = "HttpFront"
#: Requests one model replica holds at once (queued in its batcher or running).
MODEL_MAX_ONGOING = 256
#: Requests waiting for a model replica before the front answers 503 ``unavailable``.
MODEL_MAX_QUEUED = 10_000
#: Ray Serve's logging of the proxy and replicas: warnings only, no access-log line per
#: request (which costs throughput).
QUIET_LOGS = {"log_level": "WARNING", "enable_access_log": False}


def require_ray() -> None:
    """Raises a one-line :class:`ServeError` when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ServeError(
            f"--engine ray needs Ray Serve ({exc.name or 'ray'} is not installed); install it "
            f'with pip install "abkd-deploy[{RAY_EXTRA}]"'
        ) from None


def _split(pred: Prediction, sizes: list[int], wants: list[bool]) -> list[Prediction]:
    """Rows of one model run, back to the requests that made it up (``[n_i]`` ids each)."""
    out, start = [], 0
    for size, want in zip(sizes, wants, strict=True):
        part = pred[start : start + size]
        out.append(part if want else Prediction(part.classes, part.scores))
        start += size
    return out


@dataclass(frozen=True)
class FrontSettings:
    """What the HTTP front checks and reports (fields as in :func:`build_application`)."""

    replicas: int
    max_batch: int
    max_wait_ms: float
    max_ids: int
    body_timeout_s: float


def build_http_app(
    model: Any,
    num_nodes: int,
    with_embedding: bool,
    front: FrontSettings,
    new_nodes: NewNodeLimits | None = None,
) -> FastAPI:
    """The FastAPI ingress of the Ray application (built on each ``HttpFront`` replica).

    Args:
        model: a handle whose ``predict.remote((ids, want_embedding))`` and
            ``predict_nodes.remote((new nodes, want_embedding))`` answer a
            :class:`Prediction` and ``info.remote()`` a replica's ``/healthz`` fields.
        num_nodes: ids must lie in ``[0, num_nodes)``.
        with_embedding: whether the model has an ``embedding`` output.
        front: limits.
        new_nodes: what a new node must fit (``None``: the export answers stored ids only).
    """
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from abkd_deploy.serve.errors import RequestError, RequestTimeout
    from abkd_deploy.serve.predict_endpoint import error_body
    from abkd_deploy.serve.server import http_error, read_body
    from abkd_deploy.serve.wire import (
        BINARY_TYPE,
        JSON_TYPE,
        encode_binary,
        encode_json,
        parse_request,
        wants_binary,
    )

    max_ids, max_body = front.max_ids, 4096 + 64 * front.max_ids  # as the built-in server
    body_timeout_s = front.body_timeout_s
    app = FastAPI(title="abkd-deploy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, http_error)
    died = (RayActorError, ActorUnavailableError)

    async def ask(method: Any, item: Any) -> Prediction:
        try:
            try:
                return await method.remote(item)
            except died as exc:
                log.warning("a model replica failed with a request in flight: %s", exc)
            try:
                return await method.remote(item)  # idempotent: once more
            except died as exc:
                raise ReplicaFailed(
                    f"the model replica serving this request failed "
                    f"({type(exc).__name__}), and so did the retry; try again"
                ) from None
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise Unavailable(f"no model replica can take the request now: {exc}") from None

    async def ask_model(req: Any) -> Prediction:
        ids = (req.ids, req.return_embedding)
        if req.nodes is None:
            return await ask(model.predict, ids)
        # new nodes: their own graph, not micro-batched; ids first, as the built-in server
        parts = [ask(model.predict, ids)] if req.ids.size else []
        if len(req.nodes):
            parts.append(ask(model.predict_nodes, (req.nodes, req.return_embedding)))
        return Prediction.concat(list(await asyncio.gather(*parts)))

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        try:
            body = await read_body(request, max_body, body_timeout_s)
            req = parse_request(body, num_nodes, max_ids, with_embedding, new_nodes)
            pred = await ask_model(req)
        except (RequestError, Unavailable) as exc:
            headers = None
            if isinstance(exc, RequestTimeout) or exc.code == "too_large":
                headers = {"connection": "close"}  # the rest of the body may still come
            return JSONResponse(error_body(exc, exc.code), exc.http_status, headers=headers)
        if wants_binary(request.headers.get("accept", "")):
            return Response(encode_binary(pred, req), media_type=BINARY_TYPE)
        return Response(encode_json(pred, req), media_type=JSON_TYPE)

    @app.get("/healthz")
    async def healthz() -> Response:
        limits = {
            "engine": "ray",
            "replicas": front.replicas,
            "max_batch": front.max_batch,
            "max_wait_ms": front.max_wait_ms,
            "max_ids_per_request": max_ids,
        }
        try:
            info = await model.info.remote()
        except Exception as exc:  # no replica answers: unhealthy, not a 500
            body = {"status": "unavailable", "error": f"{type(exc).__name__}", **limits}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", **info, **limits})

    return app


def build_application(
    export_dir: str,
    replicas: int,
    device: str = "auto",
    threads: int | None = None,
    max_batch: int = 1024,
    max_wait_ms: float = 2.0,
    max_ids: int | None = None,
    body_timeout_s: float = HttpLimits.body_timeout_s,
) -> Any:
    """The bound Ray Serve application (``serve.run`` it); Ray must be installed.

    Args:
        export_dir: an ``embedded`` export directory (readable from every Ray node).
        replicas: model replicas (and HTTP front replicas).
        device: ``auto`` (CPU: replicas get no GPU from Ray), ``cpu``, or ``cuda`` /
            ``cuda:N`` (each replica asks Ray for one GPU and runs on the one it gets).
        threads: onnxruntime intra-op threads per model replica.
        max_batch: node ids per model run (``@serve.batch`` max_batch_size, counted in ids).
        max_wait_ms: ``@serve.batch`` batch_wait_timeout_s, in milliseconds.
        max_ids: node ids per request (default ``max_batch``).
        body_timeout_s: a request body must arrive within this time, else 408.
    """
    from ray import serve

    front = FrontSettings(
        replicas, max_batch, max_wait_ms, int(max_ids or max_batch), body_timeout_s
    )
    on_cuda = device.startswith("cuda")
    replica_device = "cuda" if on_cuda else device

    @serve.deployment(
        name=MODEL_DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=MODEL_MAX_ONGOING,
        max_queued_requests=MODEL_MAX_QUEUED,
        # Ray hides GPUs from actors that do not ask for one, and shows the one it assigns
        # as device 0: a cuda replica asks for a GPU and runs on "cuda".
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if on_cuda else 0},
        logging_config=QUIET_LOGS,
    )
    class StudentModel:
        """One Predictor; requests are micro-batched by ``@serve.batch``."""

        def __init__(self) -> None:
            self.predictor = Predictor(export_dir, replica_device, threads, max_batch)
            self.with_embedding = self.predictor.has_embedding
            self.predict.set_max_batch_size(max_batch)
            self.predict.set_batch_wait_timeout_s(max_wait_ms / 1000.0)

        @serve.batch(
            max_batch_size=max_batch,
            batch_wait_timeout_s=max_wait_ms / 1000.0,
            batch_size_fn=lambda items: sum(len(ids) for ids, _ in items),
        )
        async def predict(self, items: list[tuple[Any, bool]]) -> list[Prediction]:
            """``items``: (``[n_i]`` int64 ids, want embedding); one model run for all."""
            import numpy as np

            sizes = [len(ids) for ids, _ in items]
            ids = np.concatenate([ids for ids, _ in items])
            pred = self.predictor.predict(ids, return_embedding=self.with_embedding)
            return _split(pred, sizes, [want for _, want in items])

        def predict_nodes(self, item: tuple[Any, bool]) -> Prediction:
            """``item``: (checked new nodes, want embedding); one run of the new-node graph."""
            nodes, want = item
            return self.predictor.predict_nodes(nodes, return_embedding=want)

        def info(self) -> dict[str, Any]:
            """``Predictor.info()`` and this replica's pid."""
            return {**self.predictor.info(), "pid": os.getpid()}

        def check_health(self) -> None:
            """Ray's health probe: the session must still answer."""
            self.predictor.predict([0])

    @serve.deployment(
        name=HTTP_DEPLOYMENT,
        num_replicas=replicas,
        max_ongoing_requests=MODEL_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        logging_config=QUIET_LOGS,
    )
    @serve.ingress()
    class HttpFront:
        """FastAPI ingress: request checks and encoding, the model behind a handle."""

        def __init__(
            self,
            model: Any,
            num_nodes: int,
            with_embedding: bool,
            new_nodes: NewNodeLimits | None,
        ) -> None:
            self.model = model
            self.num_nodes = num_nodes
            self.with_embedding = with_embedding
            self.new_nodes = new_nodes

        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_http_app(
                self.model, self.num_nodes, self.with_embedding, front, self.new_nodes
            )

    manifest = load_manifest(Path(export_dir))  # the Predictor checked it against the model
    with_embedding = any(o["name"] == "embedding" for o in manifest["outputs"])
    num_nodes = int(manifest["graph"]["num_nodes"])
    limits = new_node_limits(manifest)
    return HttpFront.bind(StudentModel.bind(), num_nodes, with_embedding, limits)


class ReplicaFailed(Unavailable):
    """The model replica died with the request in flight, and the retry failed too."""

    code = "replica_failed"


def serve_ray(
    export_dir: str,
    replicas: int = 1,
    ray_address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    threads: int | None = None,
    max_batch: int = 1024,
    max_wait_ms: float = 2.0,
    max_ids: int | None = None,
    limits: HttpLimits | None = None,
) -> None:
    """Serves ``export_dir`` with Ray Serve on ``host:port`` until SIGTERM/SIGINT.

    Without ``ray_address`` a local Ray instance is started (and shut down on exit);
    with it, the application is deployed on that cluster (and deleted on exit; the
    cluster and its Serve instance stay up). Every node must have this package installed
    and see ``export_dir`` at the same path.

    Args:
        export_dir: an ``embedded`` export directory.
        replicas: model replicas (``@serve.batch`` each) and HTTP front replicas.
        ray_address: an existing cluster (``ray://host:10001``, ``host:6379`` or ``auto``).
        host: interface of Ray's HTTP proxy.
        port: its TCP port (0: a free one).
        device: per replica, as in :func:`build_application`.
        threads: onnxruntime intra-op threads per model replica.
        max_batch: node ids per model run (``max_batch_size``).
        max_wait_ms: the longest a request waits for company (``batch_wait_timeout_s``).
        max_ids: node ids per request (default ``max_batch``).
        limits: only ``body_timeout_s`` applies (Ray's proxy owns the connections).

    Raises:
        ServeError: Ray Serve not installed, the cluster cannot be reached, or the port
            is in use.
        ConfigError: limits that do not fit together, or ``replicas`` < 1.
        ArtifactError: the export fails to load or its hashes do not match.
    """
    from abkd_deploy.errors import ConfigError
    from abkd_deploy.serve.server import bind_socket, create_app

    require_ray()
    if replicas < 1:
        raise ConfigError(f"replicas must be >= 1, got {replicas}")
    limits = limits or HttpLimits()
    # the same checks as the built-in server (limits, embedded format, hashes) before Ray;
    # on the CPU: the GPUs (if any) are for the replicas
    create_app(
        Predictor(export_dir, "cpu", threads, max_batch),
        max_batch,
        max_wait_ms,
        max_ids,
        body_timeout_s=limits.body_timeout_s,
    )
    probe = bind_socket(host, port, listen=False)  # in use: the built-in server's error
    port = probe.getsockname()[1]
    probe.close()

    import ray
    from ray import serve

    try:
        if ray_address:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        else:
            ray.init(  # "local": a new instance, never one that happens to be running
                address="local",
                num_cpus=max(os.cpu_count() or 1, replicas),
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = ray_address or "a local instance"
        hint = ""
        if ray_address and "RAY_AUTH_MODE" not in os.environ:
            hint = " (a token-authenticated cluster needs RAY_AUTH_MODE=token and its token)"
        raise ServeError(f"cannot start Ray ({where}): {first_line(exc)}{hint}") from None
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        app = build_application(
            export_dir,
            replicas,
            device,
            threads,
            max_batch,
            max_wait_ms,
            max_ids,
            limits.body_timeout_s,
        )
        try:
            serve.start(http_options={"host": host, "port": port}, logging_config=QUIET_LOGS)
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:  # e.g. a replica that cannot load the export on its node
            raise ServeError(
                f"Ray Serve could not deploy {export_dir}: {first_line(exc)}"
            ) from None
        print(f"abkd-deploy serve: Ray Serve, {replicas} replica(s) of {export_dir}", flush=True)
        print(f"abkd-deploy serve: listening on http://{host}:{port}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ray_address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    print("abkd-deploy serve: stopped", flush=True)
