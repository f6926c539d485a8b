"""Requests/s of ``serve --engine ray`` against the built-in server, same export, same load.

Each server runs as ``abkd-deploy serve`` in its own process (tree) on a free loopback
port; ``--concurrency`` closed-loop keep-alive clients (threads) send ``--ids`` random node
ids per request for ``--seconds`` after a warm-up, and every answer is checked for status
200. Reported per server: requests/s, p50 and p99 latency. Servers, in order: built-in
(1 process), built-in ``--workers N``, Ray Serve ``--replicas N``.

Without ``--export``, a synthetic ``embedded`` export (Gather -> MatMul -> Relu -> MatMul,
``--nodes`` x ``--features`` features) is written to a temporary directory.

Usage::

    nice -n 10 python benchmarks/ray_vs_builtin.py --replicas 2 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serve.live_server import Client  # noqa: E402
from tests.serve.tiny_export import make_tiny, write_embedded  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(export: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "abkd_deploy.cli", "serve", str(export), "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if json.load(r)["status"] == "ok":
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server {args} did not start:\n{log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _load(port: int, num_nodes: int, ids: int, clients: int, warmup_s: float, seconds: float):
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    t_start = time.monotonic() + warmup_s
    t_end = t_start + seconds

    def loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        c = Client(port)
        mine: list[float] = []
        try:
            while (now := time.monotonic()) < t_end:
                batch = rng.integers(0, num_nodes, size=ids).tolist()
                t0 = time.perf_counter()
                status, body = c.predict(batch)
                took = time.perf_counter() - t0
                if status != 200:
                    with lock:
                        errors.append(f"{status} {str(body)[:100]}")
                elif now >= t_start:
                    mine.append(took)
        finally:
            c.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[:3]}")
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "rps": len(lat) / seconds,
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=None, help="an embedded export directory")
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ids", type=int, default=64, help="node ids per request")
    ap.add_argument("--replicas", type=int, default=2, help="Ray replicas / builtin workers")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per process")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--only", choices=["builtin", "ray"], default=None, help="benchmark one engine only"
    )
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        export = args.export
        if export is None:
            tiny = make_tiny(args.nodes, args.features, args.hidden, args.classes)
            export = write_embedded(Path(tmp) / "export", tiny)
        num_nodes = json.loads((export / "manifest.json").read_text())["graph"]["num_nodes"]
        common = ["--device", "cpu", "--threads", str(args.threads), "--max-ids", str(args.ids)]
        n = str(args.replicas)
        servers = {
            "builtin, 1 process": common,
            f"builtin, --workers {n}": [*common, "--workers", n],
            f"ray, --replicas {n}": [*common, "--engine", "ray", "--replicas", n],
        }
        if args.only:
            servers = {k: v for k, v in servers.items() if k.startswith(args.only)}
        results: dict[str, Any] = {}
        for name, server_args in servers.items():
            proc, port = _start(export, server_args, Path(tmp) / "server.log")
            try:
                results[name] = _load(
                    port, num_nodes, args.ids, args.concurrency, args.warmup, args.seconds
                )
            finally:
                _stop(proc)
            r = results[name]
            print(f"{name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f}")

    print("\n| server | requests/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"export": str(export)}, "results": results},
                indent=2,
                default=str,
            )
        )
    print(f"\ncpus: {os.cpu_count()}; load: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
