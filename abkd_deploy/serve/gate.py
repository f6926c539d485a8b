"""Regression gate: compares a fresh bench report with a baseline report.

Report contract (``abkd-deploy bench --out REPORT.json``, ``format_version`` 1)::

    {"format_version": 1,
     "results": [{"model": "student-onnx", "batch_size": 64,
                  "trials_ms": {"p50": [per trial], "p95": [per trial], ...},
                  "trials_throughput_nps": [per trial],
                  "p50_ms": ..., "p95_ms": ..., "throughput_nps": ..., ...}, ...],
     ...}

Compared per ``(model, batch_size)`` present in both reports: p50 and p95 latency (lower
is better) and throughput in nodes/s (higher is better).

HTTP (``bench --http``: a top-level ``"http"`` section whose ``results`` carry ``target``,
``concurrency``, ``batch_size``, ``trials_ms`` ``{"p50", "p99"}``, ``trials_rps`` and the
medians ``p50_ms``, ``p99_ms``, ``rps``): compared per ``(target, concurrency, batch_size)``
in both reports, named ``http <target> c<concurrency>`` in place of the model: p50 and p99
latency (lower is better) and requests/s (higher is better). A report without the
section is compared on the in-process results alone.

Noise handling:

* **Trials.** A bench run repeats its timed measurement ``T`` times (each trial has its
  own warm-up-free p50/p95 over many requests). The gate takes the **median over the
  trials** of each metric, so one trial disturbed by another process, a page fault or a
  frequency change does not move the value. If a result has no per-trial list, its
  summary value (``p50_ms``, ...; itself a median over trials) is used.
* **Tolerance.** A metric regresses when it is worse than the baseline by more than
  ``max_regression`` (relative, default 0.15: run-to-run jitter of the median on a shared
  2-core CI machine is ~5-10%). Improvements never fail the gate.
* **Absolute floor.** Latency changes smaller than ``min_delta_ms`` (default 0) are
  ignored, for sub-millisecond latencies where timer and scheduler noise dominate.
* **Samples.** A percentile over a handful of requests is mostly noise (a p99 over 3
  requests is their maximum). Each comparison carries the fewest requests per trial of the
  two results (``samples`` in the report, see :func:`result_samples`), and the message of a
  regression resting on fewer than :data:`MIN_SAMPLES` says so.
* Compare reports from the same machine kind and the same bench options; entries present
  in only one report are not compared, and reports with nothing in common are an error.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abkd_deploy.errors import ConfigError

REPORT_FORMAT_VERSION = 1
DEFAULT_MAX_REGRESSION = 0.15
#: Fewer requests per trial than this behind a percentile: the regression message warns.
MIN_SAMPLES = 20


@dataclass(frozen=True)
class Metric:
    """A compared metric.

    Attributes:
        name: name in messages (also the summary key in a result).
        trials: path to the per-trial list inside a result.
        higher_is_better: throughput-like (``True``) or latency-like (``False``).
        unit: unit in messages.
    """

    name: str
    trials: tuple[str, ...]
    higher_is_better: bool
    unit: str


METRICS: tuple[Metric, ...] = (
    Metric("p50_ms", ("trials_ms", "p50"), False, "ms"),
    Metric("p95_ms", ("trials_ms", "p95"), False, "ms"),
    Metric("throughput_nps", ("trials_throughput_nps",), True, "nodes/s"),
)
#: The metrics of the ``http`` section's cells.
HTTP_METRICS: tuple[Metric, ...] = (
    Metric("p50_ms", ("trials_ms", "p50"), False, "ms"),
    Metric("p99_ms", ("trials_ms", "p99"), False, "ms"),
    Metric("rps", ("trials_rps",), True, "req/s"),
)


@dataclass(frozen=True)
class Comparison:
    """One metric of one ``(model, batch_size)`` in both reports.

    Attributes:
        metric: metric name (``p50_ms``, ``p95_ms``, ``throughput_nps``).
        model: model name in the report.
        batch_size: batch size.
        old: baseline value (median over trials).
        new: current value (median over trials).
        change: relative change ``(new - old) / old`` (signed).
        worse_by: relative degradation (``change`` for latency, ``-change`` for
            throughput); positive means worse.
        regressed: ``worse_by`` beyond the tolerance (and the absolute floor).
        unit: the metric's unit.
        samples: fewest requests per trial behind the two values (``None``: unknown).
    """

    metric: str
    model: str
    batch_size: int
    old: float
    new: float
    change: float
    worse_by: float
    regressed: bool
    unit: str
    samples: int | None = None


def load_report(path: str | Path) -> dict[str, Any]:
    """Reads a bench report JSON and checks its format version.

    Raises:
        ConfigError: missing file, not JSON, or not a format_version 1 report.
    """
    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"bench report {str(p)!r} does not exist") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"bench report {str(p)!r} is not readable JSON: {exc}") from None
    _check_report(report, str(p))
    return report


def _check_report(report: Any, where: str) -> None:
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise ConfigError(f"{where} is not a bench report (no 'results' list)")
    version = report.get("format_version")
    if version != REPORT_FORMAT_VERSION:
        raise ConfigError(
            f"{where} has format_version {version!r}; the gate reads {REPORT_FORMAT_VERSION}"
        )


def _index(report: dict[str, Any], where: str) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for res in report["results"]:
        try:
            key = (str(res["model"]), int(res["batch_size"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: every result needs 'model' and 'batch_size'") from None
        if key in out:
            raise ConfigError(f"{where}: duplicate result for model {key[0]} batch {key[1]}")
        out[key] = res
    return out


def _http_index(report: dict[str, Any], where: str) -> dict[tuple[str, int], dict[str, Any]]:
    """``{("http <target> c<concurrency>", batch_size): cell}`` of the ``http`` section."""
    section = report.get("http")
    if section is None:
        return {}
    cells = section.get("results") if isinstance(section, dict) else None
    if not isinstance(cells, list):
        raise ConfigError(f"{where}: 'http' has no 'results' list")
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for cell in cells:
        try:
            key = (f"http {cell['target']} c{int(cell['concurrency'])}", int(cell["batch_size"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{where}: every http result needs 'target', 'concurrency' and 'batch_size'"
            ) from None
        if key in out:
            raise ConfigError(f"{where}: duplicate http result for {key[0]} batch {key[1]}")
        out[key] = cell
    return out


def metric_value(result: dict[str, Any], metric: Metric) -> float | None:
    """Median over trials of ``metric`` in one result (summary value if no trials).

    Returns:
        The value, or ``None`` when the result does not have the metric.
    """
    node: Any = result
    for key in metric.trials:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, list) and node:
        try:
            return float(statistics.median(float(v) for v in node))
        except (TypeError, ValueError):
            raise ConfigError(f"trials of {metric.name} must be numbers, got {node!r}") from None
    summary = result.get(metric.name)
    return float(summary) if isinstance(summary, (int, float)) else None


def result_samples(result: dict[str, Any]) -> int | None:
    """Fewest requests timed in one trial of ``result`` (``None`` if the report predates it).

    Reads ``samples.per_trial``, else ``trials_samples``, else ``requests_per_trial``.
    """
    samples = result.get("samples")
    if isinstance(samples, dict) and isinstance(samples.get("per_trial"), int):
        return samples["per_trial"]
    trials = result.get("trials_samples")
    if isinstance(trials, list) and trials and all(isinstance(n, int) for n in trials):
        return min(trials)
    n = result.get("requests_per_trial")
    return n if isinstance(n, int) else None


def compare_all(
    baseline: dict[str, Any],
    current: dict[str, Any],
    max_regression: float = DEFAULT_MAX_REGRESSION,
    min_delta_ms: float = 0.0,
    metrics: Sequence[Metric] = METRICS,
    http_metrics: Sequence[Metric] = HTTP_METRICS,
) -> list[Comparison]:
    """Compares every metric of every ``(model, batch_size)`` the two reports share, and
    of every HTTP cell they share (model ``http <target> c<concurrency>``).

    Args:
        baseline: the baseline report (e.g. from :func:`load_report`).
        current: the fresh report.
        max_regression: tolerated relative degradation (0.15 = 15%).
        min_delta_ms: latency changes below this many ms never count as regressions.
        metrics: the metrics of in-process results.
        http_metrics: the metrics of HTTP cells.

    Raises:
        ConfigError: malformed reports, a negative tolerance, or nothing in common.
    """
    if not (max_regression >= 0 and math.isfinite(max_regression)):
        raise ConfigError(f"max_regression must be a number >= 0, got {max_regression}")
    _check_report(baseline, "baseline report")
    _check_report(current, "current report")
    old_idx, new_idx = _index(baseline, "baseline report"), _index(current, "current report")
    old_http = _http_index(baseline, "baseline report")
    new_http = _http_index(current, "current report")
    pairs = [(k, old_idx[k], new_idx[k], metrics) for k in old_idx if k in new_idx]
    pairs += [(k, old_http[k], new_http[k], http_metrics) for k in old_http if k in new_http]
    if not pairs:
        raise ConfigError(
            f"the reports share no (model, batch size): baseline has "
            f"{sorted([*old_idx, *old_http])}, current has {sorted([*new_idx, *new_http])}"
        )
    out: list[Comparison] = []
    for (model, bs), old_res, new_res, compared in pairs:
        counts = [result_samples(res) for res in (old_res, new_res)]
        known = [n for n in counts if n is not None]
        samples = min(known) if known else None
        for m in compared:
            old = metric_value(old_res, m)
            new = metric_value(new_res, m)
            if old is None or new is None or old <= 0:
                continue
            change = (new - old) / old
            worse_by = -change if m.higher_is_better else change
            big_enough = m.unit != "ms" or abs(new - old) > min_delta_ms
            regressed = worse_by > max_regression and big_enough
            out.append(
                Comparison(
                    m.name, model, bs, old, new, change, worse_by, regressed, m.unit, samples
                )
            )
    return out


def compare_reports(
    baseline: dict[str, Any],
    current: dict[str, Any],
    max_regression: float = DEFAULT_MAX_REGRESSION,
    min_delta_ms: float = 0.0,
    metrics: Sequence[Metric] = METRICS,
    http_metrics: Sequence[Metric] = HTTP_METRICS,
) -> list[Comparison]:
    """The regressions of ``current`` against ``baseline`` (empty list: the gate passes).

    Same arguments as :func:`compare_all`.
    """
    compared = compare_all(baseline, current, max_regression, min_delta_ms, metrics, http_metrics)
    return [c for c in compared if c.regressed]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def format_regressions(
    regressions: Sequence[Comparison], max_regression: float = DEFAULT_MAX_REGRESSION
) -> str:
    """A message for the CLI: one line per regression, or a one-line pass."""
    tol = f"{max_regression:.0%}"
    if not regressions:
        return f"regression gate passed: no metric worse than the baseline by more than {tol}"
    lines = [f"regression gate failed: {len(regressions)} metric(s) worse by more than {tol}:"]
    for r in regressions:
        few = r.samples is not None and r.samples < MIN_SAMPLES
        note = f"; only {r.samples} requests per trial: noisy" if few else ""
        lines.append(
            f"  {r.metric} {r.model} batch {r.batch_size}: {_fmt(r.old)} -> {_fmt(r.new)} "
            f"{r.unit} ({r.change:+.1%}, worse by {r.worse_by:.1%}{note})"
        )
    return "\n".join(lines)
