"""ABKD attention variants against KD on the same teacher, student and seeds (issue 15).

Two steps::

    # 1. runs (resumable: finished (variant, seed) pairs in --results are skipped)
    python benchmarks/abkd_attention.py run --dataset planetoid:Cora \\
        --root ../shared/data/planetoid --teacher runs/cora-teacher --student-hidden 8 \\
        --seeds 10 --variants kd,learned,uniform,align,entropy,prior --results cora.json
    # 2. tables, paired tests and attention plots
    python benchmarks/abkd_attention.py report cora.json --plot docs/benchmarks/x.png

Seeds are the outer loop and variants the inner one, so that a change in the machine's
load hits every variant alike (seconds per epoch are compared within one results file).
The paired test against KD uses the seeds both have: Student's paired t-test
(``scipy.stats.ttest_rel``) and an exact sign-flip permutation test of the mean difference.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

#: name -> (method, abkd options, teacher mode)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "ce": ("ce", {}, "frozen"),
    "kd": ("kd", {}, "frozen"),
    "learned": ("abkd", {"attention": "learned"}, "frozen"),
    "uniform": ("abkd", {"attention": "uniform"}, "frozen"),
    "align": ("abkd", {"attention": "align"}, "frozen"),
    "entropy": ("abkd", {"attention": "entropy"}, "frozen"),
    "entropy-0.8": ("abkd", {"attention": "entropy", "entropy_floor": 0.8}, "frozen"),
    "align-every5": ("abkd", {"attention": "align", "align_every": 5}, "frozen"),
    "align-entropy": ("abkd", {"attention": "align", "entropy_floor": 0.5}, "frozen"),
    "prior": ("abkd", {"attention": "prior"}, "frozen"),
    "prior-t3": ("abkd", {"attention": "prior", "prior_temperature": 3.0}, "frozen"),
    # direction (a) with a held-out split: 20% of the labelled nodes leave the student's CE
    # and train the attention (their CE's alignment) instead
    "align-holdout": ("abkd", {"attention": "align", "holdout": 0.2}, "frozen"),
    "prior-holdout": ("abkd", {"attention": "prior", "holdout": 0.2}, "frozen"),
    "joint": ("abkd", {"attention": "learned"}, "joint"),
    "joint-anchor": ("abkd", {"attention": "learned", "teacher_anchor": 1.0}, "joint"),
}


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def _save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run(a: argparse.Namespace) -> None:
    """Runs every (seed, variant) not yet in ``a.results``, saving after each."""
    import torch

    from abkd_deploy.distill.run import KDSpec, StudentSpec, TeacherSpec, distill
    from abkd_deploy.distill.trainer import TrainConfig

    torch.set_num_threads(a.threads)  # 1 thread: far faster on a shared, loaded CPU
    path = Path(a.results)
    results = _load(path)
    results.setdefault("config", {}).update(
        {k: v for k, v in vars(a).items() if k not in ("func", "results")}
    )
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; expected some of {sorted(VARIANTS)}")
    for seed, name in itertools.product(range(a.seed, a.seed + a.seeds), names):
        if (name, seed) in done:
            continue
        method, options, mode = VARIANTS[name]
        kd = KDSpec(method=method, alpha=a.alpha, tau=a.tau, beta=a.beta, teacher_mode=mode)
        kd.options = dict(options)
        train = TrainConfig(
            epochs=a.epochs,
            patience=a.patience,
            seed=seed,
            progress=False,
            device="cpu",
            batch_size=a.batch_size,
        )
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="abkd-att-") as tmp:
            m = distill(
                dataset=a.dataset,
                root=a.root,
                split=a.split,
                teacher=TeacherSpec(path=a.teacher),
                student=StudentSpec(arch=a.student_arch, layers=2, hidden=a.student_hidden),
                kd=kd,
                train=train,
                seeds=1,
                out=Path(tmp) / "run",
            )
        row = m["per_seed"][0]
        results["runs"].append(
            {
                "variant": name,
                "seed": seed,
                "val": row["val_acc"],
                "test": row["test_acc"],
                "best_epoch": row["best_epoch"],
                "seconds_per_epoch": row["seconds_per_epoch"],
                "attention": m.get("attention"),
                "compression_ratio": m["compression_ratio"],
                "teacher": m["teacher"],
                "metric": m["metric"],
                "wall_seconds": time.perf_counter() - start,
            }
        )
        _save(path, results)
        print(
            f"{name} seed {seed}: val {row['val_acc']:.4f} test {row['test_acc']:.4f} "
            f"({row['seconds_per_epoch'] * 1e3:.1f} ms/epoch, "
            f"{time.perf_counter() - start:.0f} s)",
            flush=True,
        )


def time_variants(a: argparse.Namespace) -> None:
    """Seconds per training epoch of every variant, measured round-robin in one process
    (``--rounds`` rounds of ``--epochs`` epochs each) so that they share the machine's
    load; prints and writes the median per variant and its ratio to KD."""
    import torch

    from abkd_deploy.data import load_dataset
    from abkd_deploy.distill.losses import LayerDims
    from abkd_deploy.distill.run import KDSpec
    from abkd_deploy.distill.trainer import TrainConfig, Trainer
    from abkd_deploy.models import build_model, load_model

    torch.set_num_threads(a.threads)
    data = load_dataset(a.dataset, a.root, a.split)
    teacher, _ = load_model(a.teacher, "teacher")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _, name in itertools.product(range(a.rounds), names):
        method, options, mode = VARIANTS[name]
        torch.manual_seed(0)
        student = build_model(
            a.student_arch,
            in_channels=data.num_features,
            hidden=a.student_hidden,
            out_channels=data.num_classes,
            num_layers=2,
        )
        kd = KDSpec(method=method, teacher_mode=mode, warmup_epochs=0)  # full cost each epoch
        kd.options = dict(options)
        objective = kd.objective(
            LayerDims(teacher.layer_dims, student.layer_dims, data.num_classes)
        )
        cfg = TrainConfig(epochs=a.epochs, patience=a.epochs, progress=False, device="cpu")
        fit = Trainer(
            student,
            data,
            cfg,
            objective=objective,
            teacher=copy.deepcopy(teacher) if mode == "joint" else teacher,
            teacher_mode=mode,
        ).fit()
        times[name].append(fit.seconds_per_epoch)
    out = {n: {"median_s": statistics.median(t), "all_s": t} for n, t in times.items()}
    for n in out:
        if "kd" in out:
            out[n]["vs_kd"] = out[n]["median_s"] / out["kd"]["median_s"]
        print(f"{n}: {1e3 * out[n]['median_s']:.1f} ms/epoch, {out[n].get('vs_kd', 0):.2f}x KD")
    Path(a.results).write_text(
        json.dumps(
            {"config": {k: v for k, v in vars(a).items() if k != "func"}, "times": out}, indent=1
        )
    )


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip permutation p-value of ``mean(diffs) != 0``."""
    obs = abs(statistics.fmean(diffs))
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        total += 1
        hits += (
            abs(statistics.fmean(s * d for s, d in zip(signs, diffs, strict=True))) >= obs - 1e-12
        )
    return hits / total


def paired(base: dict[int, float], other: dict[int, float]) -> dict[str, Any]:
    """Paired comparison of ``other - base`` (points) on their common seeds."""
    seeds = sorted(set(base) & set(other))
    diffs = [100 * (other[s] - base[s]) for s in seeds]
    out: dict[str, Any] = {"n": len(seeds), "mean_diff": statistics.fmean(diffs) if diffs else 0}
    if len(diffs) >= 2:
        out["p_sign_flip"] = sign_flip_p(diffs) if len(diffs) <= 16 else None
        try:
            from scipy.stats import ttest_rel

            with warnings.catch_warnings():  # identical differences: p is 0 or nan
                warnings.simplefilter("ignore", RuntimeWarning)
                t = ttest_rel([other[s] for s in seeds], [base[s] for s in seeds])
            out["p_ttest"] = float(t.pvalue) if t.pvalue == t.pvalue else 1.0
        except ImportError:  # pragma: no cover - scipy is in the venv via torch_geometric
            out["p_ttest"] = None
    return out


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: mean/std of val and test (%), paired tests vs KD, cost vs KD."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        by.setdefault(r["variant"], []).append(r)
    kd = {r["seed"]: r for r in by.get("kd", [])}
    rows = []
    for name, runs in by.items():
        vals = [100 * r["val"] for r in runs]
        tests = [100 * r["test"] for r in runs]
        row: dict[str, Any] = {
            "variant": name,
            "seeds": len(runs),
            "val": statistics.fmean(vals),
            "val_std": statistics.pstdev(vals),
            "test": statistics.fmean(tests),
            "test_std": statistics.pstdev(tests),
            "ms_per_epoch": 1e3 * statistics.fmean(r["seconds_per_epoch"] for r in runs),
        }
        if kd and name != "kd":
            for split in ("val", "test"):
                row[f"vs_kd_{split}"] = paired(
                    {s: r[split] for s, r in kd.items()}, {r["seed"]: r[split] for r in runs}
                )
            common = [r for r in runs if r["seed"] in kd]
            if common:
                row["cost_vs_kd"] = statistics.fmean(
                    r["seconds_per_epoch"] / kd[r["seed"]]["seconds_per_epoch"] for r in common
                )
        rows.append(row)
    return rows


def mean_attention(results: dict[str, Any], variant: str) -> list[list[float]] | None:
    """Seed-mean attention matrix of ``variant`` (rows: student layers)."""
    mats = [r["attention"] for r in results["runs"] if r["variant"] == variant and r["attention"]]
    if not mats:
        return None
    rows, cols = len(mats[0]), len(mats[0][0])
    return [[statistics.fmean(m[j][i] for m in mats) for i in range(cols)] for j in range(rows)]


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    """One small PNG: the seed-mean attention of every ABKD variant, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in dict.fromkeys(r["variant"] for r in results["runs"])]
    mats = [(n, mean_attention(results, n)) for n in names]
    mats = [(n, m) for n, m in mats if m is not None]
    if not mats:
        return
    cols = len(mats[0][1][0])
    fig, axes = plt.subplots(
        len(mats), 1, figsize=(max(4.0, 0.3 * cols + 2), 0.9 * len(mats) + 0.8)
    )
    axes = [axes] if len(mats) == 1 else list(axes)
    for ax, (name, m) in zip(axes, mats, strict=True):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(m)), [f"S{j + 1}" for j in range(len(m))], fontsize=6)
        ax.set_xticks(range(cols), [str(i + 1) for i in range(cols)], fontsize=6)
        ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("teacher layer", fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")  # long variant names stay whole
    plt.close(fig)


def _entropy_fraction(row: list[float]) -> float:
    """Entropy of ``row`` divided by ``log len(row)`` (1: uniform, 0: one-hot)."""
    h = -sum(p * math.log(p) for p in row if p > 0)
    return h / math.log(len(row)) if len(row) > 1 else 0.0


def _seed_entropy(results: dict[str, Any], variant: str) -> list[float]:
    """Per student layer, the mean over seeds of :func:`_entropy_fraction` of its row."""
    mats = [r["attention"] for r in results["runs"] if r["variant"] == variant and r["attention"]]
    return [statistics.fmean(_entropy_fraction(m[j]) for m in mats) for j in range(len(mats[0]))]


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(a: argparse.Namespace) -> None:
    """Prints the markdown table (and writes ``--summary`` JSON, ``--plot`` PNG)."""
    results = {"runs": [], "config": _load(Path(a.results[0])).get("config", {})}
    seen = set()
    for path in a.results:  # several files (e.g. seeds run in parallel) are merged
        for r in _load(Path(path))["runs"]:
            if (r["variant"], r["seed"]) not in seen:
                seen.add((r["variant"], r["seed"]))
                results["runs"].append(r)
    rows = summarise(results)
    print(
        "| variant | seeds | val (%) | test (%) | val - KD (p t / p flip) | "
        "test - KD (p t / p flip) | ms/epoch | cost vs KD |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for split in ("val", "test"):
            c = r.get(f"vs_kd_{split}")
            cells.append(
                ""
                if c is None
                else f"{c['mean_diff']:+.2f} ({_p(c.get('p_ttest'))} / {_p(c.get('p_sign_flip'))})"
            )
        cost = f"{r['cost_vs_kd']:.2f}x" if "cost_vs_kd" in r else ""
        print(
            f"| {r['variant']} | {r['seeds']} | {r['val']:.2f} ± {r['val_std']:.2f} | "
            f"{r['test']:.2f} ± {r['test_std']:.2f} | {cells[0]} | {cells[1]} | "
            f"{r['ms_per_epoch']:.1f} | {cost} |"
        )
    for name in dict.fromkeys(r["variant"] for r in results["runs"]):
        m = mean_attention(results, name)
        if m is not None:
            top = [max(row) for row in m]
            arg = [row.index(max(row)) + 1 for row in m]
            ent = [_entropy_fraction(row) for row in m]
            print(
                f"{name}: seed-mean A row max {[round(t, 3) for t in top]} at teacher layer "
                f"{arg}; entropy / log L_T of the per-seed rows (mean) "
                f"{[round(e, 3) for e in _seed_entropy(results, name)]}, of the mean "
                f"{[round(e, 3) for e in ent]}"
            )
    if a.summary:
        Path(a.summary).write_text(json.dumps(rows, indent=1))
    if a.plot:
        plot(results, Path(a.plot), a.title or results.get("config", {}).get("dataset", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(required=True)
    r = sub.add_parser("run", help="train the variants")
    r.add_argument("--dataset", required=True)
    r.add_argument("--root", default=None)
    r.add_argument("--split", default=None)
    r.add_argument("--teacher", required=True, help="run dir of a trained teacher")
    r.add_argument("--student-arch", default="gcn")
    r.add_argument("--student-hidden", type=int, default=8)
    r.add_argument("--variants", default="kd,learned,uniform,align,entropy,prior")
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, default=300)
    r.add_argument("--patience", type=int, default=100)
    r.add_argument("--batch-size", type=int, default=0)
    r.add_argument("--alpha", type=float, default=0.7)
    r.add_argument("--tau", type=float, default=4.0)
    r.add_argument("--beta", type=float, default=1.0)
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    r.add_argument("--results", required=True, help="JSON file (created or resumed)")
    r.set_defaults(func=run)
    t = sub.add_parser("time", help="seconds per epoch, variants round-robin")
    for flag in ("--dataset", "--teacher", "--results"):
        t.add_argument(flag, required=True)
    t.add_argument("--root", default=None)
    t.add_argument("--split", default=None)
    t.add_argument("--student-arch", default="gcn")
    t.add_argument("--student-hidden", type=int, default=8)
    t.add_argument("--variants", default="kd,learned,align,entropy,prior")
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=time_variants)
    s = sub.add_parser("report", help="tables, paired tests and plots")
    s.add_argument("results", nargs="+", help="results JSON file(s), merged")
    s.add_argument("--summary", default=None, help="write the table rows as JSON here")
    s.add_argument("--plot", default=None, help="PNG of the seed-mean attention matrices")
    s.add_argument("--title", default=None)
    s.set_defaults(func=report)
    a = p.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    a.func(a)


if __name__ == "__main__":
    main()
