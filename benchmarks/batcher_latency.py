"""Micro-batcher latency and throughput: this tree's MicroBatcher against another version.

The model is a fake of realistic cost that, like onnxruntime's Run, releases the GIL: it
hashes a buffer sized to take ``--cost-ms`` (plus ``--cost-us-per-id`` per id). Callers
are asyncio tasks (as in the server) or threads. Reported, as medians over ``--repeats``
runs that alternate between the versions:

* lone request: p50/p99 of one request at a time (concurrency 1) through ``apredict``
  (asyncio, as the server calls it) and ``predict`` (blocking threads);
* concurrency 32: closed-loop asyncio clients, requests/s and mean ids per model run.

Usage (the fixed-delay batcher it replaced, b258809, reconstructed from git)::

    git show b258809:abkd_deploy/serve/batcher.py > /tmp/old_batcher.py
    nice -n 10 python benchmarks/batcher_latency.py --old /tmp/old_batcher.py
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from abkd_deploy.serve.batcher import MicroBatcher


class FakeModel:
    """Costs ``base_ms + per_id_us * len(ids)`` of GIL-free hashing; returns ``ids``."""

    def __init__(self, base_ms: float, per_id_us: float) -> None:
        self.buf = np.random.default_rng(0).bytes(1 << 22)
        chunk = memoryview(self.buf)[: 1 << 18]
        best = float("inf")
        for _ in range(50):  # the fastest of many: the machine's speed without contention
            start = time.perf_counter()
            hashlib.sha256(chunk).digest()
            best = min(best, time.perf_counter() - start)
        self.bytes_per_s = len(chunk) / best
        self.base_s, self.per_id_s = base_ms / 1e3, per_id_us / 1e6
        self.sizes: list[int] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.sizes.append(int(ids.size))
        n = int((self.base_s + self.per_id_s * ids.size) * self.bytes_per_s)
        view = memoryview(self.buf)
        while n > 0:
            hashlib.sha256(view[: min(n, len(self.buf))]).digest()
            n -= len(self.buf)
        return ids


def load_batcher(path: str) -> type:
    """``MicroBatcher`` from a batcher.py file (e.g. the committed version, via git show)."""
    spec = importlib.util.spec_from_file_location("other_batcher", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (dataclasses look it up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.MicroBatcher


def _pcts(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def lone_async(batcher: Any, n: int, ids: np.ndarray) -> dict[str, float]:
    async def main() -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await batcher.apredict(ids)
            times.append(time.perf_counter() - t)
        return times

    return _pcts(asyncio.run(main())[n // 10 :])


def lone_sync(batcher: Any, n: int, ids: np.ndarray) -> dict[str, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        batcher.predict(ids, timeout=10)
        times.append(time.perf_counter() - t)
    return _pcts(times[n // 10 :])


def concurrent_async(
    batcher: Any, model: FakeModel, clients: int, seconds: float, ids: np.ndarray
) -> dict[str, float]:
    done = 0

    async def client(stop: float) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await batcher.apredict(ids)
            done += 1

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(start + seconds) for _ in range(clients)))
        return time.perf_counter() - start

    model.sizes.clear()
    elapsed = asyncio.run(main())
    return {"requests_per_s": done / elapsed, "ids_per_run": float(np.mean(model.sizes))}


def measure(
    make: Callable[[], Any], model: FakeModel, args: argparse.Namespace
) -> dict[str, float]:
    ids1 = np.arange(args.ids, dtype=np.int64)
    out: dict[str, float] = {}
    batcher = make()
    try:
        for key, value in lone_async(batcher, args.requests, ids1).items():
            out[f"lone_async_{key}"] = value
        for key, value in lone_sync(batcher, args.requests, ids1).items():
            out[f"lone_sync_{key}"] = value
        for key, value in concurrent_async(batcher, model, 32, args.seconds, ids1).items():
            out[f"c32_{key}"] = value
    finally:
        batcher.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", help="another batcher.py to compare with (e.g. from git show)")
    p.add_argument("--cost-ms", type=float, default=0.2, help="model cost per run")
    p.add_argument("--cost-us-per-id", type=float, default=0.2, help="model cost per id")
    p.add_argument("--ids", type=int, default=64, help="ids per request")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--requests", type=int, default=2000, help="lone requests per run")
    p.add_argument("--seconds", type=float, default=2.0, help="length of a concurrency-32 run")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    model = FakeModel(args.cost_ms, args.cost_us_per_id)
    versions: dict[str, Callable[[], Any]] = {
        "new": lambda: MicroBatcher(model, args.max_batch, args.max_wait_ms),
    }
    if args.old:
        old = load_batcher(args.old)
        versions["old"] = lambda: old(model, args.max_batch, args.max_wait_ms)
        versions["old_wait0"] = lambda: old(model, args.max_batch, 0.0)
    model_call = []
    for _ in range(args.requests):
        t = time.perf_counter()
        model(np.arange(args.ids))
        model_call.append(time.perf_counter() - t)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    for _ in range(args.repeats):
        for name, make in versions.items():
            runs[name].append(measure(make, model, args))
    report = {
        "config": {k: v for k, v in vars(args).items() if k != "old"},
        # the model alone, called in a loop: the floor (and this machine's tail) for both
        "model_call": {k: round(v, 1) for k, v in _pcts(model_call).items()},
        "python": sys.version.split()[0],
    }
    for name, results in runs.items():
        report[name] = {k: round(statistics.median(r[k] for r in results), 1) for k in results[0]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
