"""``Predictor.predict``: a batch of new nodes against a batch of stored ids, one run.

Exports a 2-layer student of a ``csbm`` graph (``embedded``, fanouts 10,10, which also
writes ``new_nodes.onnx``), then times, interleaved, ``predict(node_ids=64 ids)`` and
``predict(nodes=64 new nodes)``, the new nodes given as the HTTP API receives them (lists
of ``{"features", "neighbors"}``, checked on every call) and as pre-checked arrays
(:class:`~abkd_deploy.serve.new_nodes.NewNodes`). Reports per-call medians over
``--trials`` trials of ``--calls`` calls, the ratios to the ids' median, and the median of
the per-trial ratios (each trial times the cases back to back, so on a shared machine its
ratio is steadier than the ratio of medians).

Usage:
    python benchmarks/new_nodes.py --num-nodes 100000 --out new_nodes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from csbm_student import csbm_student_run  # benchmarks/, next to this script

from abkd_deploy.export import export
from abkd_deploy.serve import Predictor
from abkd_deploy.serve.new_nodes import NewNodes


def per_call_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=100_000)
    p.add_argument("--arch", default="sage")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--neighbors", type=int, default=10)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmpdir = tempfile.TemporaryDirectory()  # removed when the timing block below ends
    run = Path(tmpdir.name) / "run"
    data = csbm_student_run(run, args.num_nodes, args.arch, args.hidden, epochs=0)
    rng = np.random.default_rng(0)
    b, k = args.batch, args.neighbors
    ids = rng.integers(0, args.num_nodes, b)
    feats = data.x[rng.integers(0, args.num_nodes, b)].numpy() + 0.1 * rng.normal(
        size=(b, data.num_features)
    )
    nbrs = np.stack([rng.choice(args.num_nodes, k, replace=False) for _ in range(b)])
    as_json = [
        {"features": f.astype(np.float32).tolist(), "neighbors": n.tolist()}
        for f, n in zip(feats, nbrs, strict=True)
    ]
    checked = NewNodes(feats.astype(np.float32), nbrs.astype(np.int64))
    with tmpdir as tmp:
        out = Path(tmp) / "export"
        export(run, out, fanouts="10,10", progress=False)
        pred = Predictor(out, device="cpu", threads=args.threads)
        cases = {
            "ids": lambda: pred.predict(ids),
            "new_nodes_json": lambda: pred.predict(nodes=as_json),
            "new_nodes_arrays": lambda: pred.predict(nodes=checked),
        }
        for fn in cases.values():
            per_call_ms(fn, 20)  # warm-up
        samples = {name: [] for name in cases}
        for _ in range(args.trials):
            for name, fn in cases.items():
                samples[name].append(per_call_ms(fn, args.calls))
    med = {name: statistics.median(v) for name, v in samples.items()}
    report = {
        "machine": {
            "cpu_threads": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "median_ms": {k: round(v, 4) for k, v in med.items()},
        "ratio_to_ids": {k: round(v / med["ids"], 2) for k, v in med.items()},
        # each trial times the cases back to back: its ratio shares that moment's load
        "paired_ratio_median": {
            k: round(statistics.median(a / b for a, b in zip(v, samples["ids"], strict=True)), 2)
            for k, v in samples.items()
        },
        "trials_ms": {k: [round(x, 4) for x in v] for k, v in samples.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
