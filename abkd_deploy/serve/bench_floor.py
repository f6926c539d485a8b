"""The floor of ``bench --http``: a bare FastAPI app that answers precomputed bytes.

``POST /v1/predict`` reads the body, parses it with orjson, and answers the precomputed
response body for that many ids (a body the real server sent for a request of that
size), so the client's load and the bytes on the wire are the same as against
``abkd-deploy serve`` with no model, batcher, validation or metrics. It runs with the very
uvicorn settings of ``serve`` (:func:`~abkd_deploy.serve.limits.uvicorn_config`: the same
HTTP parser, event loop and limits) and the same number of worker processes
(``SO_REUSEPORT``, like ``serve --workers``).

Run: ``python -m abkd_deploy.serve.bench_floor BODIES.json PORT WORKERS HTTP READY_DIR``
with ``BODIES.json`` = ``{"<ids>": "<response body>"}`` (waited for: the bench starts the
floor while ``serve`` loads, and writes the file once ``serve`` has answered); each
serving process creates ``READY_DIR/<pid>`` once it accepts connections.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

JSON_TYPE = "application/json"
#: Seconds the floor waits for its bodies file.
BODIES_TIMEOUT_S = 300.0


def floor_app(bodies: dict[int, bytes]) -> FastAPI:
    """The floor app: ``{ids in the request: response body}`` -> FastAPI app."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    unknown = b'{"error": {"code": "invalid_request", "message": "no body for this size"}}'

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        n = len(orjson.loads(await request.body())["node_ids"])
        body = bodies.get(n)
        if body is None:
            return Response(unknown, status_code=422, media_type=JSON_TYPE)
        return Response(body, media_type=JSON_TYPE)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status": "ok"}', media_type=JSON_TYPE)

    return app


def _serve_one(bodies: dict[int, bytes], port: int, http: str, ready_dir: str, reuse: bool) -> None:
    import uvicorn

    from abkd_deploy.serve.limits import HttpLimits, uvicorn_config
    from abkd_deploy.serve.server import bind_socket

    sock = bind_socket("127.0.0.1", port, reuse_port=reuse)
    config = uvicorn_config(floor_app(bodies), "127.0.0.1", port, HttpLimits(), "warning", http)
    server = uvicorn.Server(config)

    def notify() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            Path(ready_dir, str(os.getpid())).touch()

    threading.Thread(target=notify, daemon=True).start()
    # uvicorn re-raises SIGTERM/SIGINT with the handler it found once it has drained:
    # no-op handlers make that a normal exit (status 0), as in `abkd-deploy serve`
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])


def main(argv: list[str]) -> None:
    """Serves until SIGTERM/SIGINT (see the module docstring for ``argv``)."""
    bodies_path, port, workers, http, ready_dir = argv
    deadline = time.monotonic() + BODIES_TIMEOUT_S
    while not Path(bodies_path).is_file():
        if time.monotonic() > deadline:
            sys.exit(f"error: {bodies_path} did not appear within {BODIES_TIMEOUT_S:g} s")
        time.sleep(0.02)
    bodies = {int(k): v.encode() for k, v in json.loads(Path(bodies_path).read_text()).items()}
    if int(workers) == 1:
        _serve_one(bodies, int(port), http, ready_dir, reuse=False)
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve_one, args=(bodies, int(port), http, ready_dir, True))
        for _ in range(int(workers))
    ]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for proc in procs:
        proc.start()
    while not stop.wait(0.2) and all(p.is_alive() for p in procs):
        pass
    for proc in procs:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join()


if __name__ == "__main__":
    main(sys.argv[1:])
