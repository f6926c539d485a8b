"""Incremental ``refresh`` against a full export of the updated graph, timed in one run.

Trains a 2-layer student on a ``csbm`` graph for a few full-batch epochs, exports it
(``embedded``, fanouts 10,10), draws a delta (by default 1% of the edges added, 0.1% new
nodes, 1% feature updates), then times, alternating, ``refresh(parent, delta)`` and
``export(run, dataset=<the updated graph>)``: the Python API, in this process, so
neither pays the interpreter start or the imports. Reports the medians, their ratio,
the max abs diff of both exports' outputs over every node, and the refresh's own stages.

Usage:
    python benchmarks/refresh.py --num-nodes 100000 --repeats 3 --out refresh.json
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
import torch
from csbm_student import csbm_student_run  # benchmarks/, next to this script

from abkd_deploy.data.delta import write_delta
from abkd_deploy.data.npz import save_npz
from abkd_deploy.export import export
from abkd_deploy.export.refresh import refresh


def make_delta(data, rng, edges: float, nodes: float, updates: float) -> dict[str, np.ndarray]:
    """Random delta: ``edges`` x E/2 undirected edges added (a tenth of them to the new
    nodes), ``nodes`` x N new nodes, ``updates`` x N feature updates."""
    n = data.num_nodes
    m = max(1, round(nodes * n))
    k = max(1, round(edges * data.edge_index.size(1) / 2))
    src = rng.integers(0, n, k)
    src[: k // 10] = rng.integers(n, n + m, k // 10)
    src[:m] = np.arange(n, n + m)  # every new node gets an edge
    dst = rng.integers(0, n, k)
    keep = src != dst
    u = max(1, round(updates * n))
    return {
        "add_edges": np.stack([src[keep], dst[keep]]),
        "new_x": rng.normal(size=(m, data.num_features)).astype(np.float32),
        "update_ids": rng.choice(n, u, replace=False),
        "update_x": rng.normal(size=(u, data.num_features)).astype(np.float32),
    }


def updated_data(data, delta):
    """The updated graph as a dataset (for the full export)."""
    n_new = delta["new_x"].shape[0]
    out = data.clone()
    add = torch.from_numpy(delta["add_edges"])
    out.edge_index = torch.cat([data.edge_index, add, add.flip(0)], 1)  # npz dedupes
    out.x = torch.cat([data.x, torch.from_numpy(delta["new_x"])])
    out.x[torch.from_numpy(delta["update_ids"])] = torch.from_numpy(delta["update_x"])
    out.num_nodes = data.num_nodes + n_new
    out.y = torch.cat([data.y, torch.zeros(n_new, dtype=data.y.dtype)])
    for part in ("train", "val", "test"):
        out[f"{part}_mask"] = torch.cat([data[f"{part}_mask"], torch.zeros(n_new, dtype=bool)])
    return out


def outputs(export_dir: Path, n: int) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.arange(n, dtype=np.int64)
    return [
        np.concatenate(p)
        for p in zip(
            *(sess.run(None, {"node_ids": c}) for c in np.array_split(ids, 50)), strict=True
        )
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=100_000)
    p.add_argument("--arch", default="sage")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--edges", type=float, default=0.01)
    p.add_argument("--nodes", type=float, default=0.001)
    p.add_argument("--updates", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    threads = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        data = csbm_student_run(run, args.num_nodes, args.arch, args.hidden, args.epochs)
        delta = make_delta(data, np.random.default_rng(0), args.edges, args.nodes, args.updates)
        parent = tmp / "parent"
        export(run, parent, fanouts="10,10", progress=False)
        delta_file = write_delta(tmp / "delta.npz", **delta)
        snapshot = save_npz(updated_data(data, delta), tmp / "updated.npz", compress=False)
        t_refresh, t_full, stages = [], [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            m = refresh(parent, delta_file, tmp / f"refreshed{i}", progress=False)
            t_refresh.append(time.perf_counter() - t0)
            stages.append(m["timings"])
            t0 = time.perf_counter()
            full = export(
                run, tmp / f"full{i}", fanouts="10,10", dataset=f"npz:{snapshot}", progress=False
            )
            t_full.append(time.perf_counter() - t0)
        n = full["graph"]["num_nodes"]
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip(outputs(tmp / "refreshed0", n), outputs(tmp / "full0", n), strict=True)
        )
        refreshed = m["provenance"]["refresh"]["delta"]
    report = {
        "machine": {
            "cpu_threads": threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "graph": {
            "parent_nodes": data.num_nodes,
            "parent_edges": int(data.edge_index.size(1)),
            "updated_nodes": n,
            "updated_edges": full["graph"]["num_edges"],
        },
        "delta": refreshed,
        "refresh_s": [round(t, 3) for t in t_refresh],
        "full_export_s": [round(t, 3) for t in t_full],
        "refresh_median_s": round(statistics.median(t_refresh), 3),
        "full_export_median_s": round(statistics.median(t_full), 3),
        "ratio": round(statistics.median(t_refresh) / statistics.median(t_full), 4),
        "max_abs_diff_all_nodes": diff,
        "refresh_stages_last": stages[-1],
        "full_export_stages_last": full["timings"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
