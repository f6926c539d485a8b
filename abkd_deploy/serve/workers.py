"""``serve --workers N``: N server processes on one port (pre-fork with ``SO_REUSEPORT``).

The parent reserves the port (bound, not listening), starts N workers with the ``spawn``
method (no fork of a process holding onnxruntime threads), and supervises them. Each
worker loads the model, listens on its own ``SO_REUSEPORT`` socket (the kernel spreads
new connections over the workers) once its model is loaded, and serves exactly like the
single-process server.

Memory: each worker has its own onnxruntime session; file-backed pages of the artifact
that onnxruntime maps are shared through the page cache, the rest is per worker (the
tests print each worker's RSS and PSS from ``/proc/<pid>/smaps_rollup``).

``/metrics`` answers the sum over all workers (prometheus_client's multiprocess mode, in
a temporary directory the parent creates and removes: :func:`.metrics.multiprocess_dir`);
``/healthz`` answers for the worker that got the connection (its ``pid``, its queue).

Shutdown: SIGTERM or SIGINT to the parent is passed on as SIGTERM to every worker; each
drains like the single server. The parent exits 0 only if every worker drained cleanly;
a worker that cut off requests, or died, makes :func:`serve_workers` raise.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from abkd_deploy.errors import AbkdError, ServeError
from abkd_deploy.serve.metrics import multiprocess_dir
from abkd_deploy.serve.server import AppSettings, bind_socket, cut_off_error, model_line, run_app

#: Seconds the parent waits for every worker to load its model and listen.
STARTUP_TIMEOUT_S = 300.0


def _worker(settings: AppSettings, host: str, port: int, ready: Any) -> None:
    """A worker process: load, listen, serve, drain; exit 1 if requests were cut off."""
    pid = os.getpid()
    try:
        app = settings.build()
        sock = bind_socket(host, port, reuse_port=True)
    except AbkdError as exc:
        ready.put(("error", pid, str(exc)))
        sys.exit(1)
    print(f"abkd-deploy serve: worker {pid}: {model_line(app)}", flush=True)
    cut = run_app(app, sock, settings, on_started=lambda: ready.put(("ready", pid, "")))
    if cut:
        print(f"error: worker {pid}: {cut_off_error(cut, settings.limits)}", flush=True)
        sys.exit(1)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_workers(settings: AppSettings, host: str, port: int, workers: int) -> None:
    """Serves with ``workers`` processes until SIGTERM/SIGINT (see the module docstring).

    Raises:
        ServeError: the port is in use, a worker failed to start (its one-line error) or
            died, or shutdown cut off requests in some worker.
    """
    reserve = bind_socket(host, port, reuse_port=True, listen=False)
    bound = reserve.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(settings, host, bound, ready), name=f"abkd-worker-{i}")
        for i in range(workers)
    ]
    stop = threading.Event()
    failure = ""
    with _stop_on_signals(stop), multiprocess_dir():
        for proc in procs:
            proc.start()
        try:
            failure = _wait_until_ready(procs, ready, stop, workers)
            if not failure:
                print(f"abkd-deploy serve: {workers} workers listening on http://{host}:{bound}")
                sys.stdout.flush()
            while not failure and not stop.wait(0.2):
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    failure = f"worker {dead[0].pid} exited with status {dead[0].exitcode}"
        finally:
            for proc in procs:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.join()
            reserve.close()
    if failure:
        raise ServeError(f"{failure}; stopped the other workers")
    unclean = [p.pid for p in procs if p.exitcode != 0]
    if unclean:
        raise ServeError(
            f"{len(unclean)} of {workers} workers did not drain cleanly (pids {unclean}; "
            "see their errors above)"
        )
    print("abkd-deploy serve: stopped after draining in-flight requests", flush=True)


def _wait_until_ready(procs: list[Any], ready: Any, stop: threading.Event, workers: int) -> str:
    """Waits for every worker's ``ready``; returns a failure message ('' when all are up)."""
    up: set[int] = set()
    waited = 0.0
    while len(up) < workers and not stop.is_set():
        try:
            kind, pid, message = ready.get(timeout=0.2)
        except queue.Empty:
            waited += 0.2
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                return f"worker {dead[0].pid} exited with status {dead[0].exitcode} at startup"
            if waited > STARTUP_TIMEOUT_S:
                return f"workers not ready after {STARTUP_TIMEOUT_S:g} s"
            continue
        if kind == "error":
            return message
        up.add(pid)
    return ""
