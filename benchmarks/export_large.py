"""Export a student of a large ``csbm`` graph in ``embedded`` form: time and sizes.

Trains a 2-layer student for a few full-batch epochs (accuracy is not the point), then
times ``abkd_deploy.export.export(adjacency="embedded")`` and reports the export
directory's files, the protobuf (``model.onnx``) size against the 2 GB limit, whether
external data was used, the peak RSS of the process, the manifest's accuracy and the
onnxruntime latency of the artifact at a few batch sizes.

Usage:
    python benchmarks/export_large.py --num-nodes 1000000 --arch sage --out large.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.export import export
from abkd_deploy.models import build_model, save_model

PROTOBUF_LIMIT = 2**31


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=1_000_000)
    p.add_argument("--arch", default="sage")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--fanouts", default="10,10")
    p.add_argument("--formats", default="onnx")
    p.add_argument("--keep", default=None, help="keep the export directory here")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    name = f"csbm:num_nodes={args.num_nodes}"

    t0 = time.perf_counter()
    data = load_dataset(name)
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(
        args.arch,
        in_channels=data.num_features,
        hidden=args.hidden,
        out_channels=data.num_classes,
        num_layers=2,
    )
    graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, model.norm)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        optim.zero_grad()
        out = model(data.x, graph)[0]
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        optim.step()
    train_s = time.perf_counter() - t0
    del graph, data
    rss_before = peak_rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        save_model(
            model.eval(),
            run,
            "student",
            extra={"dataset": {"name": name, "root": None, "split": None}},
        )
        out_dir = Path(args.keep) if args.keep else Path(tmp) / "export"
        t0 = time.perf_counter()
        manifest = export(
            run,
            out_dir,
            formats=tuple(args.formats.split(",")),
            adjacency="embedded",
            fanouts=args.fanouts,
            force=True,
        )
        export_s = time.perf_counter() - t0
        files = {f: (out_dir / f).stat().st_size for f in manifest["files"]}
        proto = files.get("model.onnx")
        latency = {}
        if proto is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            t0 = time.perf_counter()
            sess = ort.InferenceSession(
                str(out_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
            )
            load_model_s = time.perf_counter() - t0
            rng = np.random.default_rng(0)
            for bs in (1, 64, 1024):
                ids = [rng.integers(0, args.num_nodes, bs) for _ in range(30)]
                for i in ids[:3]:
                    sess.run(None, {"node_ids": i})
                times = []
                for i in ids:
                    t1 = time.perf_counter()
                    sess.run(None, {"node_ids": i})
                    times.append((time.perf_counter() - t1) * 1e3)
                latency[str(bs)] = round(statistics.median(times), 3)
            latency["session_load_s"] = round(load_model_s, 3)

    report = {
        "machine": {
            "cpu_threads": threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "dataset_seconds": round(load_s, 1),
        "train_seconds": round(train_s, 1),
        "export_seconds": round(export_s, 1),
        "export_timings": manifest["timings"],
        "files_bytes": files,
        "artifact_mib": round(sum(files.values()) / 2**20, 1),
        "protobuf_bytes": proto,
        "protobuf_share_of_2gb_limit": proto and round(proto / PROTOBUF_LIMIT, 6),
        "external_data": "model.onnx.data" in files,
        "adjacency": manifest["adjacency"],
        "accuracy": manifest["accuracy"],
        "validation": manifest["validation"],
        "ort_latency_ms_median": latency,
        "peak_rss_mb_before_export": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
