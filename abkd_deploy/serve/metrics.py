"""Serving metrics with prometheus_client, in the Prometheus text format (version 0.0.4).

One process (``serve``): each app's :class:`ServeMetrics` has its own registry.

Several workers (``serve --workers N``): :func:`multiprocess_dir` (run by the parent)
creates a private temporary directory, points ``PROMETHEUS_MULTIPROC_DIR`` at it for the
workers and removes it at exit. prometheus_client then keeps each worker's values in
memory-mapped files there, and ``/metrics``, whichever worker answers, renders the sum over
all workers (its multiprocess mode). The variable must be set before a worker imports
prometheus_client, which the ``spawn`` start method guarantees.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: What ``generate_latest`` writes (prometheus_client's CONTENT_TYPE_LATEST may name a newer
#: version than the text it renders).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Batch-size buckets (node ids per model run).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Latency buckets in seconds (0.25 ms .. 10 s).
LATENCY_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

prometheus_client.disable_created_metrics()  # no *_created series: counts only


def is_multiprocess() -> bool:
    """Whether this process records into a shared multiprocess directory."""
    return bool(os.environ.get(MULTIPROC_ENV))


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the workers started inside the block
    (created here, mode 0700, removed on exit; the previous value is restored)."""
    path = tempfile.mkdtemp(prefix="abkd-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


class ServeMetrics:
    """The serving process's metrics (thread-safe; summed over workers in multiprocess mode).

    Args:
        prefix: metric-name prefix.
        info: constant labels of an ``<prefix>_info`` gauge (provider, format, ...).
    """

    def __init__(self, prefix: str = "abkd_serve", info: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.info = {k: str(v) for k, v in (info or {}).items()}
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            f"{prefix}_requests", "Prediction requests answered, by HTTP status.", ["code"],
            registry=reg,
        )  # fmt: skip
        self.errors = Counter(
            f"{prefix}_errors",
            "Prediction requests answered with an error, by HTTP status and reason.",
            ["code", "reason"],
            registry=reg,
        )
        self._requests_by_status: dict[int, Any] = {}
        self.node_ids = Counter(f"{prefix}_node_ids", "Node ids classified.", registry=reg)
        self.batch_size = Histogram(
            f"{prefix}_batch_size",
            "Node ids per model run (after micro-batching).",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.request_latency = Histogram(
            f"{prefix}_request_latency_seconds",
            "Time from request received to response ready.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inference_latency = Histogram(
            f"{prefix}_inference_latency_seconds",
            "Time of one model run.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        if self.info:
            gauge = Gauge(
                f"{prefix}_info",
                "The served model and execution provider.",
                list(self.info),
                registry=reg,
                multiprocess_mode="max",
            )
            gauge.labels(**self.info).set(1)

    def observe_request(self, status: int, seconds: float, error_code: str | None = None) -> None:
        """Records one answered prediction request.

        Args:
            status: the HTTP status sent.
            seconds: time spent on it.
            error_code: machine-readable reason of a non-2xx answer (``invalid_node_ids``).
        """
        child = self._requests_by_status.get(status)
        if child is None:  # one label lookup per status, not per request
            child = self._requests_by_status[status] = self.requests.labels(str(status))
        child.inc()
        if status >= 400:
            self.errors.labels(str(status), error_code or "error").inc()
        self.request_latency.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Records one model run of ``size`` node ids."""
        self.batch_size.observe(size)
        self.inference_latency.observe(seconds)
        self.node_ids.inc(size)

    def render(self) -> str:
        """The whole exposition text (all workers' sum in multiprocess mode)."""
        if is_multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry).decode()
        return generate_latest(self.registry).decode()
