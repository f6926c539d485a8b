"""One bench measurement in its own process: ``python -m abkd_deploy.serve.bench_worker SPEC OUT``.

Each model is measured in a fresh process so that its peak RSS is its own. The
``student-onnx`` worker imports numpy and onnxruntime only, like a real service; the
PyTorch workers import torch (through :mod:`abkd_deploy.serve.bench_torch`).

SPEC (JSON): ``{"model", "requests" (path of an .npz with ``batch_<b>`` arrays [R, b],
``test_ids``, ``test_labels``), "metric", "batch_sizes", "warmup", "trials",
"trial_seconds", "threads", "device", "export_dir", "run_dir", "teacher_dir"}``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from abkd_deploy.scoring import score

Predict = Callable[[np.ndarray], Any]  # node ids [b] -> the model's answer
Logits = Callable[[np.ndarray], np.ndarray]  # node ids [b] -> logits (or log-probs) [b, C]


def _rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    ``/proc/self/status`` VmHWM is reset by ``exec``; ``getrusage``'s ``ru_maxrss`` is not
    (Linux carries the parent's peak across fork + exec), which would charge the bench
    driver's memory to every worker.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(spec: dict[str, Any]) -> tuple[Predict, Logits, dict[str, Any]]:
    """Loads the model named in ``spec``.

    Returns:
        ``(predict, logits, info)``: the timed request path, a function giving scores for
        the accuracy check, and facts about the model (provider, bytes, ...).
    """
    if spec["model"] == "student-onnx":
        from abkd_deploy.serve.predictor import Predictor

        pred = Predictor(
            spec["export_dir"],
            device=spec["device"],
            threads=spec["threads"],
            max_batch=max(spec["batch_sizes"]),
        )
        files = pred.manifest.get("files", {})
        info = {
            "provider": pred.provider,
            "served_as": "onnxruntime, embedded artifact",
            "model_bytes": int(sum(f.get("bytes", 0) for f in files.values())),
        }

        def logits(ids: np.ndarray) -> np.ndarray:
            return pred.run({"node_ids": ids})["logits"]

        return pred.predict, logits, info
    from abkd_deploy.serve.bench_torch import build_torch

    return build_torch(spec)


def measure(
    predict: Predict, batches: np.ndarray, warmup: int, trials: int, trial_seconds: float
) -> dict[str, Any]:
    """Latency statistics of ``predict`` over the request batches ``[R, b]``."""
    for i in range(warmup):
        predict(batches[i % len(batches)])
    per_trial: dict[str, list[float]] = {"p50": [], "p95": [], "p99": [], "mean": []}
    throughput: list[float] = []
    samples: list[int] = []  # requests timed in each trial: what each percentile rests on
    for _ in range(trials):
        lat = []
        start = time.perf_counter()
        for ids in batches:
            t = time.perf_counter()
            predict(ids)
            lat.append((time.perf_counter() - t) * 1e3)
            if len(lat) >= 3 and time.perf_counter() - start > trial_seconds:
                break
        wall = time.perf_counter() - start
        arr = np.asarray(lat)
        for q, key in ((50, "p50"), (95, "p95"), (99, "p99")):
            per_trial[key].append(float(np.percentile(arr, q)))
        per_trial["mean"].append(float(arr.mean()))
        throughput.append(len(lat) * batches.shape[1] / wall)
        samples.append(len(lat))
    return {
        "trials_ms": per_trial,
        "trials_throughput_nps": throughput,
        **{f"{k}_ms": statistics.median(v) for k, v in per_trial.items()},
        "throughput_nps": statistics.median(throughput),
        "requests_per_trial": len(lat),
        "trials_samples": samples,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Builds the model, measures every batch size and the test accuracy."""
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    predict, logits, info = build(spec)
    load_seconds = time.perf_counter() - t0
    loaded_rss = _rss_mb()
    reqs = np.load(spec["requests"], allow_pickle=False)  # plain arrays only, never objects
    results = []
    for b in spec["batch_sizes"]:
        stats = measure(
            predict, reqs[f"batch_{b}"], spec["warmup"], spec["trials"], spec["trial_seconds"]
        )
        results.append({"model": spec["model"], "batch_size": b, **stats})
    test_ids, labels = reqs["test_ids"], reqs["test_labels"]
    chunk = max(spec["batch_sizes"])
    outs = [logits(test_ids[i : i + chunk]) for i in range(0, len(test_ids), chunk)]
    accuracy = score(spec["metric"], labels, np.concatenate(outs))
    gpu = info.pop("gpu_peak_mb", None)
    if callable(gpu):
        gpu = gpu()
    return {
        "model": spec["model"],
        "results": results,
        "summary": {
            **info,
            "accuracy": accuracy,
            "metric": spec["metric"],
            "load_seconds": load_seconds,
            "rss_at_start_mb": base_rss,
            "rss_after_load_mb": loaded_rss,
            "peak_rss_mb": _rss_mb(),
            "gpu_peak_mb": gpu,
            # after the whole measurement: the ONNX student's path must never import torch
            "torch_imported": "torch" in sys.modules,
        },
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = run(spec)
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
