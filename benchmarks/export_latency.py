"""Exported ``ell`` student in onnxruntime (CPU) vs the same student in PyTorch eager.

For each architecture: train a 2-layer student briefly on a ``csbm`` graph, export it
with ``abkd_deploy.export.export(adjacency="ell", fanouts=...)``, then time
* mini-batches of 1 / 64 / 1024 target nodes: fixed-fanout blocks sampled outside the
  model (the export's own seeded tables, :class:`NeighborSampler`); both runtimes get the
  same blocks, sampling time is reported separately and not included;
* the full graph: ORT on the exact ELL tables (K = max degree) vs PyTorch eager on its
  native sparse CSR operand (``FullGraph``) and on the same ELL tables;
* the same student in PyTorch eager with PyG-style message passing on the same sampled
  blocks (``eager_scatter``: gather each edge's source row, scale, ``index_add_`` into
  the destinations; what ``MessagePassing`` does without ``torch-sparse``), next to the
  gather-only ELL form in eager PyTorch (``eager``), which is this project's own
  training operand and already much faster than scatter;
* for reference, the ``embedded`` export of the same student (node ids in; the L-hop tree
  is gathered inside the model, from features folded through the first linear map) on
  the same target nodes: its time *includes* the neighbourhood gathering that the ell
  and eager numbers leave out.
Eager and ORT alternate within each trial (same machine load); medians over trials;
the ratio is eager / ORT from the same run. Both use the same thread count.

Usage:
    python benchmarks/export_latency.py --num-nodes 100000 --arch sage,gcn \
        --batch-sizes 1,64,1024 --trials 100 --out bench_export_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from abkd_deploy.data import load_dataset
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.export import export
from abkd_deploy.models import build_model, load_model, save_model


def train_student(data, arch: str, hidden: int, epochs: int, run_dir: Path, name: str) -> Path:
    """A few full-batch epochs (latency does not depend on accuracy) and a run dir."""
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
    save_model(
        model.eval(),
        run_dir,
        "student",
        extra={"dataset": {"name": name, "root": None, "split": None}},
    )
    return run_dir


class ScatterBlock(EllBlock):
    """An :class:`EllBlock` run as PyG-style message passing: edge list + ``index_add_``.

    Only the valid slots (weight > 0) become edges; messages are the source rows scaled
    by the slot weight, summed into the destination rows.
    """

    def __init__(self, block: EllBlock) -> None:
        super().__init__(block.nbr, block.weight, block.self_weight)
        valid = block.weight > 0
        self.n = block.nbr.size(0)
        self.dst_idx = valid.nonzero()[:, 0]
        self.src = block.nbr[valid]
        self.edge_w = block.weight[valid].unsqueeze(1)

    def neighbors(self, h: torch.Tensor) -> torch.Tensor:
        msg = h.index_select(0, self.src) * self.edge_w.to(h.dtype)
        out = torch.zeros((self.n, *h.shape[1:]), dtype=h.dtype)
        return out.index_add_(0, self.dst_idx, msg)


def session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def flat_inputs(x: torch.Tensor, blocks: list[EllBlock], gcn: bool) -> list[torch.Tensor]:
    flat = [x.contiguous()]
    for b in blocks:
        flat += [b.nbr.contiguous(), b.weight.contiguous()]
        if gcn:
            flat.append(b.self_weight.reshape(-1).contiguous())
    return flat


def alternate(
    fns: dict[str, Callable[[int], Any]], trials: int, rounds: int = 5
) -> dict[str, float]:
    """Median ms of each ``fn(trial)`` over ``trials`` timed calls.

    The runtimes take turns in ``rounds`` phases (A B C, B C A, ...), each starting with
    untimed warm-up calls: runtimes that spin their worker threads after a call (ORT,
    OpenMP) would otherwise steal the cores from the one timed right after them.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round = max(1, -(-trials // rounds))
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for i in range(3):
                fns[n](i)
            for i in range(r * per_round, (r + 1) * per_round):
                t0 = time.perf_counter()
                fns[n](i)
                times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_arch(args, data, csr: CSR, arch: str, workdir: Path, threads: int) -> dict[str, Any]:
    name = f"csbm:num_nodes={args.num_nodes}"
    run = train_student(data, arch, args.hidden, args.epochs, workdir / f"run_{arch}", name)
    t0 = time.perf_counter()
    manifest = export(
        run, workdir / f"ell_{arch}", adjacency="ell", fanouts=args.fanouts, progress=False
    )
    export_s = time.perf_counter() - t0
    path = workdir / f"ell_{arch}" / "model.onnx"
    sessions = {"ort": session(path, threads, True), "ort_nospin": session(path, threads, False)}
    emb_dir = workdir / f"embedded_{arch}"
    export(run, emb_dir, adjacency="embedded", fanouts=args.fanouts, progress=False)
    embedded = session(emb_dir / "model.onnx", threads, True)
    names = [i.name for i in sessions["ort"].get_inputs()]
    student, _ = load_model(run, "student")
    gcn = student.norm == "gcn"
    fanouts = manifest["adjacency"]["fanouts"]
    sampler = NeighborSampler(csr, fanouts, student.norm, seed=0)
    gen = torch.Generator().manual_seed(1)
    result: dict[str, Any] = {
        "arch": arch,
        "hidden": args.hidden,
        "fanouts": fanouts,
        "params": manifest["model"]["params"],
        "export_seconds": round(export_s, 2),
        "batches": {},
    }

    for bs in args.batch_sizes:
        targets = [torch.randperm(data.num_nodes, generator=gen)[:bs] for _ in range(args.trials)]
        t0 = time.perf_counter()
        batches = [sampler.sample(t) for t in targets]
        sample_ms = (time.perf_counter() - t0) * 1e3 / len(batches)
        inputs = [flat_inputs(data.x[b.n_id], b.blocks, gcn) for b in batches]
        feeds = [{n: t.numpy() for n, t in zip(names, inp, strict=True)} for inp in inputs]

        def eager(i: int, batches=batches, inputs=inputs) -> None:
            j = i % len(batches)
            with torch.inference_mode():  # same pre-gathered rows as ORT's feed
                student(inputs[j][0], batches[j].blocks)

        scatter = [[ScatterBlock(b) for b in batch.blocks] for batch in batches]

        def eager_scatter(i: int, scatter=scatter, inputs=inputs) -> None:
            j = i % len(scatter)
            with torch.inference_mode():
                student(inputs[j][0], scatter[j])

        fns: dict[str, Callable[[int], Any]] = {"eager": eager, "eager_scatter": eager_scatter}
        for key, sess in sessions.items():
            fns[key] = lambda i, s=sess, f=feeds: s.run(None, f[i % len(f)])
        ids = [{"node_ids": t.numpy()} for t in targets]
        fns["ort_embedded"] = lambda i, f=ids: embedded.run(None, f[i % len(f)])
        med = alternate(fns, args.trials)
        result["batches"][str(bs)] = {
            **{f"{k}_ms": round(v, 4) for k, v in med.items()},
            "speedup": round(med["eager"] / med["ort"], 2),
            "speedup_vs_scatter": round(med["eager_scatter"] / med["ort"], 2),
            "speedup_nospin": round(med["eager"] / med["ort_nospin"], 2),
            "speedup_embedded": round(med["eager"] / med["ort_embedded"], 2),
            "input_rows": round(statistics.mean(b.n_id.numel() for b in batches)),
            "sampling_ms": round(sample_ms, 3),
        }
        print(arch, bs, result["batches"][str(bs)], flush=True)

    # full graph: exact tables (K = max degree)
    exact = NeighborSampler(csr, [max(1, csr.max_degree)] * 2, student.norm, seed=0).tables
    blocks = [EllBlock.full_graph(t, student.norm) for t in exact]
    feed = {n: t.numpy() for n, t in zip(names, flat_inputs(data.x, blocks, gcn), strict=True)}
    sparse = FullGraph(csr, student.norm)

    def eager_sparse(_i: int) -> None:
        with torch.inference_mode():
            student(data.x, sparse)

    def eager_ell(_i: int) -> None:
        with torch.inference_mode():
            student(data.x, blocks)

    fns = {"eager_sparse": eager_sparse, "eager_ell": eager_ell}
    for key, sess in sessions.items():
        fns[key] = lambda _i, s=sess: s.run(None, feed)
    med = alternate(fns, args.full_trials, rounds=2)
    result["full_graph"] = {
        **{f"{k}_ms": round(v, 2) for k, v in med.items()},
        "k": csr.max_degree,
        "speedup_vs_sparse": round(med["eager_sparse"] / med["ort"], 2),
        "speedup_vs_ell": round(med["eager_ell"] / med["ort"], 2),
    }
    print(arch, "full", result["full_graph"], flush=True)
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | batch | input rows | eager scatter ms | eager ELL ms | ORT ell ms | "
        "scatter/ORT | eager ELL/ORT | ORT ell no-spin ms | ORT embedded ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for bs, b in r["batches"].items():
            lines.append(
                f"| {r['arch']} | {bs} | {b['input_rows']:,} | {b['eager_scatter_ms']:.3f} | "
                f"{b['eager_ms']:.3f} | {b['ort_ms']:.3f} | **{b['speedup_vs_scatter']:.2f}x** | "
                f"**{b['speedup']:.2f}x** | {b['ort_nospin_ms']:.3f} | "
                f"{b['ort_embedded_ms']:.3f} |"
            )
        f = r["full_graph"]
        lines.append(
            f"| {r['arch']} | full graph (K={f['k']}) | all | {f['eager_sparse_ms']:.1f} "
            f"(sparse CSR) | {f['eager_ell_ms']:.1f} | {f['ort_ms']:.1f} | "
            f"{f['speedup_vs_sparse']:.2f}x (vs CSR) | {f['speedup_vs_ell']:.2f}x | "
            f"{f['ort_nospin_ms']:.1f} | |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=100_000)
    p.add_argument("--arch", default="sage,gcn")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--fanouts", default="10,10")
    p.add_argument("--batch-sizes", default="1,64,1024")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--full-trials", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="default: all available cores")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    data = load_dataset(f"csbm:num_nodes={args.num_nodes}")
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            results.append(bench_arch(args, data, csr, arch, Path(tmp), threads))
    report = {
        "machine": {
            "cpu_threads": threads,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "load_avg_at_end": os.getloadavg(),
        },
        "graph": {
            "num_nodes": data.num_nodes,
            "num_edges": int(data.edge_index.size(1)),
            "num_features": data.num_features,
            "max_degree": csr.max_degree,
        },
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
