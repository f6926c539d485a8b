"""Typed graphs at ogbn-mag scale (``csbm-mag:num_papers=736389``): the issue-11 acceptance.

One stage per call (each a fresh process, so peak RSS is that stage's own), results merged
into ``--results`` (JSON, keyed by stage and model):

    generate  generation time and peak RSS (runs benchmarks/csbm_mag_generate.py)
    train     seconds per mini-batch of the package's Trainer (its sampler, its
              ``_mini_batch_epoch`` step) over ``--batches`` batches, extrapolated to one
              epoch; saves the briefly trained model as a run dir for ``export``
    export    ``abkd_deploy.export.export`` (typed ``embedded`` ONNX): time, size, peak RSS
    serve     ``abkd_deploy.serve.Predictor``: p50 at batch 64, process RSS with it loaded

Usage (teacher R-GCN 3 x 512, student R-GCN 2 x 32):
    nice -n 10 python benchmarks/mag_scale.py generate --results mag.json
    nice -n 10 python benchmarks/mag_scale.py train --model teacher --results mag.json --work W
    nice -n 10 python benchmarks/mag_scale.py export --model teacher --results mag.json --work W
    nice -n 10 python benchmarks/mag_scale.py serve --model teacher --results mag.json --work W
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = {  # G-CRD / ABKD's ogbn-mag setting (docs/BENCHMARKS.md, README)
    "teacher": {"layers": 3, "hidden": 512, "fanouts": (25, 20, 15)},
    "student": {"layers": 2, "hidden": 32, "fanouts": (25, 20)},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dataset_name(a: argparse.Namespace) -> str:
    return f"csbm-mag:num_papers={a.num_papers},num_classes={a.num_classes}"


def save(a: argparse.Namespace, key: str, value: dict[str, Any]) -> None:
    path = Path(a.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = {**value, "dataset": dataset_name(a), "load_avg": os.getloadavg()}
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps({key: results[key]}, indent=2))


def stage_generate(a: argparse.Namespace) -> None:
    script = Path(__file__).with_name("csbm_mag_generate.py")
    cmd = [sys.executable, str(script), "--num-papers", str(a.num_papers)]
    cmd += ["--num-classes", str(a.num_classes), "--repeats", str(a.repeats)]
    save(a, "generate", json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout))


class FirstBatches:
    """The sampler's own ``sample`` over the Trainer's shuffled nodes, stopping after ``n``
    batches; stamps the time before each batch is sampled (and once after the last step)."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.n, self.stamps = sampler, n, []
        self.rows: list[dict[str, int]] = []

    def batches(self, nodes, batch_size: int, shuffle: bool = True, generator=None):
        import torch

        if shuffle:
            nodes = nodes[torch.randperm(nodes.numel(), generator=generator)]
        for i, start in enumerate(range(0, nodes.numel(), batch_size)):
            if i == self.n:
                break
            self.stamps.append(time.perf_counter())
            batch = self.sampler.sample(nodes[start : start + batch_size])
            self.rows.append({t: int(v.numel()) for t, v in batch.n_id.items()})
            yield batch
        self.stamps.append(time.perf_counter())


def stage_train(a: argparse.Namespace) -> None:
    import torch

    from abkd_deploy.data import load_dataset
    from abkd_deploy.distill.teacher import build_teacher
    from abkd_deploy.distill.trainer import TrainConfig, Trainer, fit_fanouts
    from abkd_deploy.models import save_model
    from abkd_deploy.models.typed import parameter_counts

    m = MODELS[a.model]
    name = dataset_name(a)
    t0 = time.perf_counter()
    data = load_dataset(name)
    load_s = time.perf_counter() - t0
    model = build_teacher(data, name, "rgcn", m["layers"], m["hidden"], 0.5, seed=0)
    cfg = TrainConfig(
        epochs=1,
        lr=0.005,
        batch_size=a.batch_size,
        fanouts=m["fanouts"],
        device="cpu",
        progress=False,
    )
    trainer = Trainer(model, data, cfg, desc=a.model)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    sampler = trainer.view.sampler(fit_fanouts(cfg.fanouts, model.num_layers), model.norm, 0)
    sampler_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampler.resample(1)  # what every epoch pays before its batches
    resample_s = time.perf_counter() - t0
    first = FirstBatches(sampler, a.batches)
    t0 = time.perf_counter()
    terms = trainer._mini_batch_epoch(optim, None, first, 1)  # the Trainer's own step
    timed_s = time.perf_counter() - t0
    per_batch = [b - s for s, b in zip(first.stamps, first.stamps[1:], strict=False)]
    steady = per_batch[1:] if len(per_batch) > 2 else per_batch  # first batch warms up
    med = statistics.median(steady)
    n_train = int(data.train_mask.sum())
    n_all = data.num_target_nodes
    batches_train = math.ceil(n_train / a.batch_size)
    batches_all = math.ceil(n_all / a.batch_size)
    run = Path(a.work) / f"{a.model}-run"
    save_model(
        model.eval(), run, "student", extra={"dataset": {"name": name, "root": None, "split": None}}
    )
    save(
        a,
        f"train/{a.model}",
        {
            **m,
            "fanouts": list(m["fanouts"]),
            **parameter_counts(model),
            "batch_size": a.batch_size,
            "batches_timed": len(per_batch),
            "seconds_per_batch": per_batch,
            "median_seconds_per_batch": med,
            "input_rows_per_batch": first.rows,
            "timed_seconds": timed_s,
            "loss": terms,
            "dataset_load_seconds": load_s,
            "sampler_build_seconds": sampler_s,
            "resample_seconds": resample_s,
            "train_papers": n_train,
            "batches_per_epoch_train": batches_train,
            "extrapolated_seconds_per_epoch_train": resample_s + med * batches_train,
            "all_papers": n_all,
            "batches_per_epoch_all_papers": batches_all,
            "extrapolated_seconds_per_epoch_all_papers": resample_s + med * batches_all,
            "peak_rss_mb": peak_rss_mb(),
            "run_dir": str(run),
        },
    )


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def stage_export(a: argparse.Namespace) -> None:
    from abkd_deploy.export import export, reference

    if a.eval_nodes:  # fewer scored test papers (the package default is MAX_EVAL_NODES)
        reference.MAX_EVAL_NODES = a.eval_nodes
    run = Path(a.work) / f"{a.model}-run"
    out = Path(a.work) / f"{a.model}-export"
    t0 = time.perf_counter()
    manifest = export(run, out, formats=("onnx",), adjacency="embedded", force=True, progress=False)
    seconds = time.perf_counter() - t0
    files = dir_bytes(out)
    save(
        a,
        f"export/{a.model}",
        {
            "seconds": seconds,
            "files": files,
            "total_mb": sum(files.values()) / 2**20,
            "peak_rss_mb": peak_rss_mb(),
            "eval_nodes": reference.MAX_EVAL_NODES,
            "adjacency": {
                k: v for k, v in manifest.get("adjacency", {}).items() if not isinstance(v, dict)
            },
            "accuracy": manifest.get("accuracy"),
            "timings": manifest.get("timings"),
        },
    )


def stage_serve(a: argparse.Namespace) -> None:
    import numpy as np

    from abkd_deploy.serve import Predictor

    before = rss_mb()
    t0 = time.perf_counter()
    pred = Predictor(Path(a.work) / f"{a.model}-export", device="cpu")
    load_s = time.perf_counter() - t0
    loaded = rss_mb()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, pred.num_nodes, a.serve_batch) for _ in range(a.calls + 5)]
    for ids in batches[:5]:  # warm-up
        pred.predict(ids)
    times = []
    for ids in batches[5:]:
        t = time.perf_counter()
        pred.predict(ids)
        times.append(time.perf_counter() - t)
    times_ms = sorted(1000 * t for t in times)
    save(
        a,
        f"serve/{a.model}",
        {
            "batch": a.serve_batch,
            "calls": a.calls,
            "p50_ms": statistics.median(times_ms),
            "p90_ms": times_ms[int(0.9 * len(times_ms))],
            "load_seconds": load_s,
            "rss_before_load_mb": before,
            "rss_loaded_mb": loaded,
            "rss_after_calls_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
            "provider": pred.provider,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["generate", "train", "export", "serve"])
    p.add_argument("--model", choices=sorted(MODELS), default="student")
    p.add_argument("--num-papers", type=int, default=736_389)
    p.add_argument("--num-classes", type=int, default=349)
    p.add_argument("--repeats", type=int, default=3, help="generate: fresh-process repeats")
    p.add_argument("--batches", type=int, default=6, help="train: mini-batches timed")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--eval-nodes", type=int, default=0, help="export: test papers scored")
    p.add_argument("--serve-batch", type=int, default=64)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--results", default="mag_scale.json")
    p.add_argument("--work", default="runs/mag-scale")
    a = p.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    {"generate": stage_generate, "train": stage_train, "export": stage_export}.get(
        a.stage, stage_serve
    )(a)


if __name__ == "__main__":
    main()
