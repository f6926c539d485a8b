"""Serving metrics in the Prometheus text exposition format (version 0.0.4).

Hand-written (a few counters and histograms) so the serving process needs no extra
dependency. Each app gets its own :class:`ServeMetrics`; every method is thread-safe.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Batch-size buckets (node ids per model run).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Latency buckets in seconds (0.25 ms .. 10 s).
LATENCY_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    """A cumulative histogram without labels.

    Args:
        name: metric name.
        help: one-line description.
        buckets: increasing upper bounds (``+Inf`` is added).
    """

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Adds one observation (the caller holds the lock)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            cum += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cum}')
        lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class Counter:
    """A counter with zero or more labels.

    Args:
        name: metric name (ends in ``_total``).
        help: one-line description.
        labels: label names.
    """

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {} if self.labels else {(): 0.0}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        """Adds ``amount`` to the series of ``label_values`` (the caller holds the lock)."""
        key = tuple(str(v) for v in label_values)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *label_values: str) -> float:
        """Current value of one series (0 if never incremented)."""
        return self.values.get(tuple(str(v) for v in label_values), 0.0)

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, n in sorted(self.values.items()):
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(self.labels, key))
            lines.append(f"{self.name}{{{pairs}}} {_num(n)}" if pairs else f"{self.name} {_num(n)}")
        return lines


class ServeMetrics:
    """The serving process's metrics.

    Args:
        prefix: metric-name prefix.
        info: constant labels of an ``<prefix>_info`` gauge (provider, format, ...).
    """

    def __init__(self, prefix: str = "abkd_serve", info: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self.prefix = prefix
        self.info = dict(info or {})
        self.requests = Counter(
            f"{prefix}_requests_total", "Prediction requests answered, by HTTP status.", ("code",)
        )
        self.errors = Counter(
            f"{prefix}_errors_total",
            "Prediction requests answered with an error, by HTTP status and reason.",
            ("code", "reason"),
        )
        self.node_ids = Counter(f"{prefix}_node_ids_total", "Node ids classified.")
        self.batch_size = Histogram(
            f"{prefix}_batch_size", "Node ids per model run (after micro-batching).", BATCH_BUCKETS
        )
        self.request_latency = Histogram(
            f"{prefix}_request_latency_seconds",
            "Time from request received to response ready.",
            LATENCY_BUCKETS,
        )
        self.inference_latency = Histogram(
            f"{prefix}_inference_latency_seconds", "Time of one model run.", LATENCY_BUCKETS
        )

    def observe_request(self, status: int, seconds: float, error_code: str | None = None) -> None:
        """Records one answered prediction request.

        Args:
            status: the HTTP status sent.
            seconds: time spent on it.
            error_code: machine-readable reason of a non-2xx answer (``invalid_node_ids``).
        """
        with self._lock:
            self.requests.inc(str(status))
            if status >= 400:
                self.errors.inc(str(status), error_code or "error")
            self.request_latency.observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Records one model run of ``size`` node ids."""
        with self._lock:
            self.batch_size.observe(size)
            self.inference_latency.observe(seconds)
            self.node_ids.inc(amount=float(size))

    def render(self) -> str:
        """The whole exposition text."""
        with self._lock:
            lines: list[str] = []
            if self.info:
                labels = ",".join(f'{k}="{_escape(str(v))}"' for k, v in self.info.items())
                lines += [
                    f"# HELP {self.prefix}_info The served model and execution provider.",
                    f"# TYPE {self.prefix}_info gauge",
                    f"{self.prefix}_info{{{labels}}} 1",
                ]
            for metric in (
                self.requests,
                self.errors,
                self.node_ids,
                self.batch_size,
                self.request_latency,
                self.inference_latency,
            ):
                lines += metric.render()
        return "\n".join(lines) + "\n"
