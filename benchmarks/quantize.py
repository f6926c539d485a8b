"""Smaller artifacts: the same ``embedded`` export as float32, float16 and int8.

Trains one student briefly on a ``csbm`` graph (a few full-batch epochs: enough for an
accuracy to compare, not a tuned model), exports it once per variant with
``abkd_deploy.export.export`` (same run, same seed, same fanout tables) and reports, for
each variant:

* size: every file of the export directory (``model.onnx`` + data, ``new_nodes.onnx``
  + data) and ``model.onnx`` (+ data) alone, and the ratio to float32;
* test accuracy of the ONNX artifact (the export's own scoring on the test split) and its
  change vs the float32 PyTorch student;
* p50 ms of ``Predictor.predict`` on batches of ``--batch`` random test ids, as served
  (onnxruntime CPU). The variants take turns within each repeat (same machine load);
  each repeat gives a p50 over ``--calls`` calls, the report gives the median over the
  repeats and the ratio to float32.

Variants: ``float32``, ``float16`` (``--dtype float16``), ``int8`` (``--quantize int8``:
int8 tables, float32 weights) and ``int8+weights`` (also onnxruntime dynamic int8
MatMul weights, :data:`abkd_deploy.export.quantize.QUANTIZE_WEIGHTS`).

Usage:
    python benchmarks/quantize.py --num-nodes 100000 --precompute hidden \
        --out bench_quantize.json
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.export import export, quantize
from abkd_deploy.models import build_model, save_model
from abkd_deploy.serve import Predictor

#: ``name -> (export kwargs, quantize the ONNX weights too)``.
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {
    "float32": ({}, False),
    "float16": ({"dtype": "float16"}, False),
    "int8": ({"quantize": "int8"}, False),
    "int8+weights": ({"quantize": "int8"}, True),
}


def train_student(data, arch: str, hidden: int, epochs: int, run_dir: Path, name: str) -> Path:
    """A few full-batch epochs and a run dir (what ``distill`` would leave, minus teacher)."""
    torch.manual_seed(0)
    model = build_model(
        arch,
        in_channels=data.num_features,
        hidden=hidden,
        out_channels=data.num_classes,
        num_layers=2,
    )
    graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, model.norm)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        optim.zero_grad()
        out = model(data.x, graph)[0]
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        optim.step()
    extra = {"dataset": {"name": name, "root": None, "split": None}}
    save_model(model.eval(), run_dir, "student", extra=extra)
    return run_dir


def export_variant(run_dir: Path, out: Path, name: str, precompute: str) -> dict[str, Any]:
    """Exports one variant; returns its manifest and the export time."""
    kwargs, weights = VARIANTS[name]
    saved = quantize.QUANTIZE_WEIGHTS
    quantize.QUANTIZE_WEIGHTS = weights
    try:
        t0 = time.perf_counter()
        manifest = export(run_dir, out, precompute=precompute, progress=False, **kwargs)
    finally:
        quantize.QUANTIZE_WEIGHTS = saved
    return {"manifest": manifest, "export_s": time.perf_counter() - t0}


def p50_ms(
    predictors: dict[str, Predictor],
    ids: np.ndarray,
    batch: int,
    calls: int,
    repeats: int,
    seed: int,
) -> dict[str, list[float]]:
    """Per variant, the p50 of ``calls`` timed ``predict`` calls, once per repeat (variants
    take turns, rotating which goes first; 5 untimed warm-up calls before each)."""
    rng = np.random.default_rng(seed)
    batches = [rng.choice(ids, batch) for _ in range(calls)]
    names = list(predictors)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            p = predictors[n]
            for b in batches[:5]:
                p.predict(b)
            times = []
            for b in batches:
                t0 = time.perf_counter()
                p.predict(b)
                times.append((time.perf_counter() - t0) * 1e3)
            out[n].append(statistics.median(times))
    return out


def files_bytes(manifest: dict[str, Any], prefix: str = "") -> int:
    return sum(e["bytes"] for f, e in manifest["files"].items() if f.startswith(prefix))


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-nodes", type=int, default=100_000)
    ap.add_argument("--arch", default="gcn")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--precompute", default="hidden", choices=["hidden", "none", "all"])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report (also printed as markdown).")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "float32" not in variants:
        ap.error(f"variants {unknown} unknown or float32 missing; expected {list(VARIANTS)}")
    name = f"csbm:num_nodes={args.num_nodes}"
    data = load_dataset(name)
    test_ids = data.test_mask.nonzero().flatten().numpy().astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="abkd-quantize-") as tmp:
        t0 = time.perf_counter()
        run_dir = train_student(data, args.arch, args.hidden, args.epochs, Path(tmp) / "run", name)
        train_s = time.perf_counter() - t0
        del data
        exports = {v: export_variant(run_dir, Path(tmp) / v, v, args.precompute) for v in variants}
        predictors = {v: Predictor(Path(tmp) / v) for v in variants}
        p50 = p50_ms(predictors, test_ids, args.batch, args.calls, args.repeats, args.seed)
    base = exports["float32"]["manifest"]
    rows = []
    for v in variants:
        m = exports[v]["manifest"]
        acc = m["accuracy"]
        med = statistics.median(p50[v])
        rows.append(
            {
                "variant": v,
                "bytes": files_bytes(m),
                "model_bytes": files_bytes(m, "model.onnx"),
                "size_ratio": files_bytes(base) / files_bytes(m),
                "accuracy": acc["exported"]["onnx"],
                "accuracy_change": acc["exported"]["onnx"] - acc["pytorch_student"],
                "p50_ms": med,
                "p50_ms_repeats": p50[v],
                "p50_vs_float32": med / statistics.median(p50["float32"]),
                "max_abs_diff": m["validation"]["max_abs_diff"]["onnx"],
                "export_s": exports[v]["export_s"],
            }
        )
    report = {
        "config": {**vars(args), "dataset": name, "train_s": train_s},
        "pytorch_student": base["accuracy"]["pytorch_student"],
        "machine": machine(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"{args.arch} student, {name}, precompute {args.precompute}, float32 PyTorch test "
        f"accuracy {report['pytorch_student']:.4f}; p50 of predict at batch {args.batch}, "
        f"median of {args.repeats} repeats x {args.calls} calls"
    )
    print("| variant | size | model.onnx | vs float32 | test acc | change | p50 ms | vs float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['bytes'] / 2**20:.1f} MiB | {r['model_bytes'] / 2**20:.1f} MiB "
            f"| {r['size_ratio']:.2f}x smaller | {r['accuracy']:.4f} "
            f"| {100 * r['accuracy_change']:+.2f} pt | {r['p50_ms']:.3f} "
            f"| {r['p50_vs_float32']:.2f}x |"
        )


if __name__ == "__main__":
    main()
