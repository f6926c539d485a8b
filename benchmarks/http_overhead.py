"""Per-request cost of the serving app inside the process: no sockets, no HTTP parser.

Calls the ASGI apps directly, one request at a time (as one keep-alive client would), on
one event loop (uvloop when installed): ``create_app`` over an ``embedded`` export against
the ``bench --http`` floor app (a bare FastAPI route that parses the body with orjson and
answers fixed bytes). What a client sees over loopback is this plus the cost of the
connection (the same for both), so the difference here is the server's own overhead: the
model call, validation, encoding, metrics and whatever the framework adds. The two apps
alternate; medians over ``--repeats`` rounds of ``--requests`` calls.

Usage::

    python benchmarks/http_overhead.py EXPORT_DIR --batch-sizes 1,64 --out overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import numpy as np

from abkd_deploy.serve.bench_floor import floor_app
from abkd_deploy.serve.predictor import Predictor
from abkd_deploy.serve.server import create_app


def _scope(length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % length),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _round(app: Any, bodies: list[bytes], n: int) -> float:
    """Median microseconds of ``n`` calls of ``app``; every answer must be a 200."""
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    times = []
    for i in range(n):
        body = bodies[i % len(bodies)]
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive(messages: list = messages) -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # never: the body came in one message
            raise AssertionError

        start = time.perf_counter()
        await app(_scope(len(body)), receive, send)
        times.append(time.perf_counter() - start)
    if set(statuses) != {200}:
        raise SystemExit(f"error: answers other than 200: {sorted(set(statuses))}")
    return statistics.median(times) * 1e6


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    predictor = Predictor(args.export)
    app = create_app(predictor)
    rng = np.random.default_rng(0)
    results = []
    async with app.router.lifespan_context(app):
        for batch in args.batch_sizes:
            bodies = [
                json.dumps({"node_ids": rng.choice(predictor.num_nodes, batch).tolist()}).encode()
                for _ in range(64)
            ]
            floor = floor_app({batch: b'{"predictions": [0]}'})
            for target in (app, floor):  # warm-up
                await _round(target, bodies, 200)
            serve_us, floor_us = [], []
            for _ in range(args.repeats):
                serve_us.append(await _round(app, bodies, args.requests))
                floor_us.append(await _round(floor, bodies, args.requests))
            row = {
                "batch": batch,
                "serve_us": statistics.median(serve_us),
                "floor_us": statistics.median(floor_us),
                "extra_us": statistics.median(
                    s - f for s, f in zip(serve_us, floor_us, strict=True)
                ),
                "rounds": {"serve_us": serve_us, "floor_us": floor_us},
            }
            results.append(row)
            print(
                f"batch {batch:>4}: serve {row['serve_us']:.1f} us, floor {row['floor_us']:.1f} us"
                f" per request (median extra {row['extra_us']:.1f} us)",
                flush=True,
            )
    return {"export": args.export, "requests": args.requests, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", help="an embedded export directory")
    p.add_argument("--batch-sizes", default="1,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--requests", type=int, default=2000, help="calls per round and app")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds per app")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    try:
        from uvloop import run
    except ImportError:  # the standard event loop
        run = asyncio.run
    report = run(_main(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
