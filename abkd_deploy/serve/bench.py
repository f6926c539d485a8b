"""``abkd-deploy bench``: teacher vs student latency, memory and accuracy on the same requests.

Protocol (numbers are medians, never single runs):

* Requests: ``requests`` batches of node ids per batch size, drawn (seeded, without
  replacement inside a batch when possible) from the test split; every model answers the
  same batches.
* Each model runs in its own fresh process (peak RSS is that model's alone; the ONNX
  worker imports no torch): load, ``warmup`` untimed requests, then ``trials`` timed
  passes over the batches (a pass stops early after ``trial_seconds``, keeping >= 3
  requests). Per trial: p50/p95/p99/mean latency and throughput; reported values are the
  median over trials, and the per-trial lists are kept for the regression gate.
* Models: ``teacher-torch`` (full-graph forward per request: a deep teacher's receptive
  field is the whole graph), ``student-torch`` (the trained student in eager PyTorch on
  sampled blocks built from the export's fanout tables: how a PyTorch service would run
  it), ``student-torch-export`` (the export-form module in eager PyTorch: the very
  computation of the ONNX model, so the ratio to it is the runtime's own share) and
  ``student-onnx`` (:class:`~abkd_deploy.serve.predictor.Predictor`, the serving path).
* ``http`` (:mod:`~abkd_deploy.serve.bench_http`, with ``--http``): ``abkd-deploy serve``
  and a bare-app floor over loopback HTTP at several concurrency levels, after the models.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abkd_deploy import __version__
from abkd_deploy.errors import AbkdError, ConfigError
from abkd_deploy.files import atomic_path, write_json
from abkd_deploy.names import BENCH_MODELS
from abkd_deploy.progress import Progress
from abkd_deploy.serve.bench_http import HttpOptions, format_http_markdown, run_http_bench
from abkd_deploy.serve.manifest import load_manifest

MODELS = BENCH_MODELS
REPORT_VERSION = 1
#: A percentile resting on fewer requests per trial than this gets a warning.
MIN_SAMPLES = 20


def make_requests(
    test_ids: np.ndarray, batch_sizes: Sequence[int], requests: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """``{"batch_<b>": [requests, b] int64}`` drawn from ``test_ids``."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in batch_sizes:
        replace = b > len(test_ids)
        out[f"batch_{b}"] = np.stack(
            [rng.choice(test_ids, size=b, replace=replace) for _ in range(requests)]
        ).astype(np.int64)
    return out


def _test_split(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
    from abkd_deploy.data import load_dataset  # torch: only in this (parent) process

    ds = manifest.get("provenance", {}).get("dataset") or {}
    if not ds.get("name"):
        raise ConfigError("manifest has no provenance.dataset: cannot draw test requests")
    data = load_dataset(ds["name"], ds.get("root"), ds.get("split"))
    ids = data.test_mask.nonzero().view(-1).numpy().astype(np.int64)
    return ids, data.y.numpy()[ids].astype(np.int64), data.metric


def bench(
    export_dir: str | Path,
    teacher: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 64, 1024),
    models: Sequence[str] = MODELS,
    requests: int = 50,
    warmup: int = 5,
    trials: int = 5,
    trial_seconds: float = 3.0,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
    http: HttpOptions | None = None,
) -> dict[str, Any]:
    """Benchmarks the export in ``export_dir`` against its teacher; returns the report.

    Args:
        export_dir: An ``embedded`` export (``abkd-deploy export``).
        teacher: Run dir holding ``teacher.safetensors`` (default: the export's run dir).
        batch_sizes: Nodes per request.
        models: Subset of :data:`MODELS`.
        requests, warmup, trials, trial_seconds: See the module docstring.
        device: ``cpu``, ``cuda`` or ``auto`` for every model.
        threads: Intra-op threads of torch and onnxruntime (default: all cores).
        http: Also measure over HTTP (:func:`~abkd_deploy.serve.bench_http.run_http_bench`);
            ``models`` may then be empty, and an export whose manifest names no dataset
            gets requests drawn from all its node ids.
    """
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    if manifest["adjacency"]["format"] != "embedded":
        raise ConfigError(
            f"bench needs an 'embedded' export; {export_dir} is {manifest['adjacency']['format']!r}"
        )
    bad = [m for m in models if m not in MODELS]
    if bad or not (models or http):
        raise ConfigError(f"unknown model(s) {bad}; expected some of {', '.join(MODELS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"batch sizes {list(batch_sizes)}; expected positive integers")
    if min(requests, trials) < 1 or warmup < 0:
        raise ConfigError("requests and trials must be >= 1, warmup >= 0")
    run_dir = manifest.get("provenance", {}).get("run_dir")
    teacher_dir = Path(teacher) if teacher else (Path(run_dir) if run_dir else None)
    if "teacher-torch" in models and (
        teacher_dir is None or not (teacher_dir / "teacher.safetensors").is_file()
    ):
        raise ConfigError(
            f"no teacher checkpoint: --teacher {teacher_dir} has no teacher.safetensors"
        )
    if models or manifest.get("provenance", {}).get("dataset"):
        test_ids, labels, metric = _test_split(manifest)
    else:  # HTTP only, no dataset to draw from: any node of the export
        test_ids = np.arange(int(manifest["graph"]["num_nodes"]), dtype=np.int64)
        labels, metric = np.zeros(0, np.int64), "accuracy"
    config = {
        "export_dir": str(export_dir),
        "teacher_dir": str(teacher_dir) if teacher_dir else None,
        "device": device,
        "threads": threads or os.cpu_count() or 1,
        "batch_sizes": list(batch_sizes),
        "requests": requests,
        "warmup": warmup,
        "trials": trials,
        "trial_seconds": trial_seconds,
        "adjacency": manifest["adjacency"],
        "dataset": manifest.get("provenance", {}).get("dataset"),
        "artifact": artifact_entry(manifest),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="abkd-bench-") as tmp:
        req_path = Path(tmp) / "requests.npz"
        np.savez(
            req_path,
            test_ids=test_ids,
            test_labels=labels,
            **make_requests(test_ids, batch_sizes, requests, seed),
        )
        outputs = []
        bar = Progress(len(models), "bench", enabled=progress, unit="model")
        for model in models:
            # the worker reads its requests from the file, so "requests" is the path there
            spec = {**config, "model": model, "requests": str(req_path), "metric": metric}
            spec.update(run_dir=run_dir)
            outputs.append(_run_worker(spec, Path(tmp)))
            bar.update({"done": model})
        bar.close(f"{len(models)} models in {time.perf_counter() - start:.1f} s")
    http_section = None
    if http is not None:
        in_process = {
            r["batch_size"]: r["p50_ms"]
            for o in outputs
            if o["model"] == "student-onnx"
            for r in o["results"]
        }
        http_reqs = make_requests(test_ids, http.batch_sizes, requests, seed)
        http_section = run_http_bench(
            export_dir,
            {b: http_reqs[f"batch_{b}"] for b in http.batch_sizes},
            http,
            trials=trials,
            warmup=warmup,
            trial_seconds=trial_seconds,
            device=device,
            threads=threads,
            in_process_p50=in_process,
        )
    report = _report(outputs, config, time.perf_counter() - start)
    if http_section is not None:
        report["http"] = http_section
        report["warnings"] += http_section["warnings"]
    return report


def _run_worker(spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    spec_path, out_path = tmp / f"{spec['model']}.spec.json", tmp / f"{spec['model']}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "abkd_deploy.serve.bench_worker", str(spec_path), str(out_path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_path.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise AbkdError(
            f"bench of {spec['model']} failed: {lines[-1] if lines else proc.returncode}"
        )
    return json.loads(out_path.read_text())


def _report(
    outputs: list[dict[str, Any]], config: dict[str, Any], seconds: float
) -> dict[str, Any]:
    results = [r for o in outputs for r in o["results"]]
    summaries = {o["model"]: o["summary"] for o in outputs}
    for r in results:
        s = summaries[r["model"]]
        r.update(
            peak_rss_mb=s["peak_rss_mb"],
            gpu_peak_mb=s["gpu_peak_mb"],
            model_bytes=s.get("model_bytes"),
            accuracy=s["accuracy"],
            samples=_samples(r),
        )
    by = {(r["model"], r["batch_size"]): r for r in results}
    ratios = {}
    for b in config["batch_sizes"]:
        onnx = by.get(("student-onnx", b))
        if onnx is None:
            continue
        for other in ("teacher-torch", "student-torch", "student-torch-export"):
            if (other, b) in by:
                ratios[f"{other}/student-onnx p50 @ {b}"] = (
                    by[(other, b)]["p50_ms"] / onnx["p50_ms"]
                )
    if "teacher-torch" in summaries and "student-onnx" in summaries:
        ratios["teacher-torch/student-onnx peak RSS"] = (
            summaries["teacher-torch"]["peak_rss_mb"] / summaries["student-onnx"]["peak_rss_mb"]
        )
    return {
        "format_version": REPORT_VERSION,
        "producer": {"name": "abkd-deploy", "version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "config": config,
        "models": summaries,
        "results": results,
        "ratios": ratios,
        "warnings": sample_warnings(results, config),
        "seconds": seconds,
    }


def machine() -> dict[str, Any]:
    """Facts about this machine for the report: CPU model, cores, platform, versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "versions": {pkg: _version(pkg) for pkg in ("torch", "onnxruntime", "numpy")},
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _samples(result: dict[str, Any]) -> dict[str, int]:
    """Requests behind each percentile: ``per_trial`` (fewest in a trial), ``trials``, ``total``.

    Every trial's p50/p95/p99 is computed over that trial's requests and the reported
    value is the median over trials, so ``per_trial`` is what a percentile rests on.
    """
    counts = result.get("trials_samples") or [result.get("requests_per_trial", 0)]
    counts = [int(c) for c in counts]
    return {"per_trial": min(counts), "trials": len(counts), "total": sum(counts)}


def sample_warnings(results: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """One warning per result whose percentiles rest on fewer than :data:`MIN_SAMPLES`."""
    out = []
    for r in results:
        n = r["samples"]["per_trial"]
        if n >= MIN_SAMPLES:
            continue
        asked = config.get("requests")
        if isinstance(asked, int) and n < asked:
            why = (
                f"--trial-seconds {config.get('trial_seconds'):g} stopped each trial after "
                f"{n} of {asked} requests"
            )
        else:
            why = f"--requests {asked} is below {MIN_SAMPLES}"
        out.append(
            f"{r['model']} batch {r['batch_size']}: p50/p95/p99 rest on {n} request(s) per "
            f"trial (fewer than {MIN_SAMPLES}: {why}); treat them as rough"
        )
    return out


def format_ratio(value: float) -> str:
    """A ratio with 3 significant digits: ``27,100x``, ``361x``, ``3.42x``, ``0.5x``."""
    if not math.isfinite(value):
        return f"{value}x"
    rounded = float(f"{value:.3g}")
    return f"{rounded:,.0f}x" if abs(rounded) >= 100 else f"{rounded:.3g}x"


def artifact_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """The export's precision next to float32: dtype, quantization, bytes of its files and
    its export-time test score vs the float32 PyTorch student (same requests, same split)."""
    acc = manifest.get("accuracy") or {}
    return {
        "dtype": manifest.get("dtype", "float32"),
        "quantize": (manifest.get("quantize") or {}).get("mode", "none"),
        "bytes": int(sum(f.get("bytes", 0) for f in (manifest.get("files") or {}).values())),
        "metric": acc.get("metric"),
        "float32_pytorch": acc.get("pytorch_student"),
        "exported": (acc.get("exported") or {}).get("onnx"),
    }


def _artifact_header(c: dict[str, Any]) -> list[str]:
    a = c.get("artifact")
    if not a:
        return []
    kind = a["dtype"] if a["quantize"] == "none" else f"{a['quantize']} tables, float32 compute"
    line = f"- artifact: {kind}, {_human_bytes(a['bytes'])} in all"
    if a.get("exported") is not None and a.get("float32_pytorch") is not None:
        change = 100 * (a["exported"] - a["float32_pytorch"])
        line += (
            f"; export-time test {a['metric']} {a['exported']:.4f} vs float32 PyTorch "
            f"{a['float32_pytorch']:.4f} ({change:+.2f} pt)"
        )
    return [line]


def _header(report: dict[str, Any]) -> list[str]:
    m, c = report.get("machine") or {}, report.get("config") or {}
    cores = m.get("cpu_count")
    usable = m.get("usable_cores")
    core_text = f"{cores} cores" + (f" ({usable} usable)" if usable and usable != cores else "")
    sizes = ", ".join(str(b) for b in c.get("batch_sizes", []))
    return [
        f"# bench: {c.get('export_dir', '?')}",
        "",
        f"- machine: {m.get('cpu_model') or m.get('processor') or 'unknown CPU'}, {core_text}, "
        f"{m.get('platform', '?')}, Python {m.get('python', '?')}",
        f"- threads: {c.get('threads', '?')} intra-op (torch and onnxruntime), "
        f"device {c.get('device', '?')}",
        f"- trials: {c.get('trials', '?')} per model and batch size (medians reported), "
        f"{c.get('requests', '?')} requests each, warm-up {c.get('warmup', '?')}, a trial "
        f"stops after {c.get('trial_seconds', '?')} s (keeping >= 3 requests); "
        f"batch sizes {sizes}",
        *_artifact_header(c),
        *_http_header(report, usable or cores),
        f"- created {report.get('created', '?')} by abkd-deploy "
        f"{(report.get('producer') or {}).get('version', '?')}",
        "",
    ]


def _http_header(report: dict[str, Any], cores: int | None) -> list[str]:
    c = (report.get("http") or {}).get("config")
    if not c:
        return []
    share = ""
    if cores is not None and cores < 2 * (c["client_processes"] + c["workers"]):
        share = f"; on {cores} cores the HTTP clients and the server compete for the CPU"
    return [
        f"- http: serve and floor, {c['workers']} worker(s), clients at concurrency "
        f"{', '.join(map(str, c['concurrency']))} in {c['client_processes']} process(es)"
        f"{share}"
    ]


def format_markdown(report: dict[str, Any]) -> str:
    """Markdown report: a header (machine, threads, trial settings), one table row per model
    and batch size (with the requests per trial behind its percentiles), the ratios and
    the warnings."""
    metric = next(iter(report["models"].values()))["metric"] if report["models"] else "accuracy"
    lines = [
        *_header(report),
        "| model | batch | p50 ms | p95 ms | p99 ms | samples | mean ms | nodes/s "
        f"| peak RSS MB | model size | test {metric} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        size = _human_bytes(r.get("model_bytes") or 0)
        n = r.get("samples") or _samples(r)
        few = " (!)" if n["per_trial"] < MIN_SAMPLES else ""
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} "
            f"| {r['p99_ms']:.3f} | {n['per_trial']} x {n['trials']}{few} | {r['mean_ms']:.3f} "
            f"| {r['throughput_nps']:,.0f} | {r['peak_rss_mb']:.0f} | {size} "
            f"| {r['accuracy']:.4f} |"
        )
    if not report["results"]:  # bench --http with --models ''
        lines = [*lines[:-2], "No in-process models were measured."]
    lines += ["", "samples: requests per trial x trials; percentiles are per trial, then median."]
    if report.get("ratios"):
        lines.append("")
        lines += [f"- {k}: {format_ratio(v)}" for k, v in report["ratios"].items()]
    if report.get("http"):
        usable = (report.get("machine") or {}).get("usable_cores")
        lines += ["", *format_http_markdown(report["http"], usable), ""]
        lines += [f"- {k}: {format_ratio(v)}" for k, v in report["http"]["ratios"].items()]
    if report.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w}" for w in report["warnings"]]]
    served = [
        f"- {m}: {s.get('served_as', '')} ({s.get('provider', 'torch')})"
        for m, s in report["models"].items()
    ]
    return "\n".join([*lines, "", *served])


def write_report(report: dict[str, Any], path: str | Path) -> list[Path]:
    """Writes ``path`` (JSON), ``path`` with ``.md`` and ``.png`` suffixes; returns them.

    Each file is written atomically and follows the umask; the paths are checked first
    (:func:`~abkd_deploy.serve.report_path.check_report_path`: never inside the export or
    run dir benchmarked, never over a file that is not this tool's report).
    """
    from abkd_deploy.plots import plot_latency
    from abkd_deploy.serve.report_path import check_report_path

    config = report.get("config") or {}
    path = Path(path)
    check_report_path(path, (config.get("export_dir"), config.get("teacher_dir")))
    write_json(path, report)
    md = path.with_suffix(".md")
    with atomic_path(md) as tmp:
        tmp.write_text(format_markdown(report) + "\n")
    series: dict[str, dict[int, float]] = {}
    for r in report["results"]:
        series.setdefault(r["model"], {})[r["batch_size"]] = r["p50_ms"]
    for r in (report.get("http") or {}).get("results", []):
        if r["concurrency"] == 1:
            series.setdefault(f"http {r['target']} (1 client)", {})[r["batch_size"]] = r["p50_ms"]
    png = plot_latency(series, path.with_suffix(".png"), "p50 latency vs batch size")
    return [path, md, png]


def _human_bytes(n: int) -> str:
    """``8.7 KiB``, ``17.6 MiB``: model sizes span six orders of magnitude."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
