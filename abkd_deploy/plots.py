"""PNG plots written next to results (matplotlib, Agg backend; no torch import)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from abkd_deploy.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Training curves: loss terms (left) and train/val/test score (right) per epoch."""
    plt = _pyplot()
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    loss_keys = sorted({k for h in history for k in h if k.startswith("loss")})
    for key in loss_keys:
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    for key in ("train", "val", "test"):
        if any(key in h for h in history):
            ax_score.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("score")
    ax_score.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_attention(matrix: Sequence[Sequence[float]], path: str | Path, title: str) -> Path:
    """Heatmap of the ABKD attention: rows = student layers, columns = teacher layers."""
    plt = _pyplot()
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * cols + 2), max(2.5, 0.6 * rows + 1.5)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("teacher layer i")
    ax.set_ylabel("student layer j")
    ax.set_xticks(range(cols), [str(i + 1) for i in range(cols)], fontsize=7)
    ax.set_yticks(range(rows), [str(j + 1) for j in range(rows)])
    fig.colorbar(im, ax=ax, label="A[j, i]")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_latency(series: Mapping[str, Mapping[int, float]], path: str | Path, title: str) -> Path:
    """Latency (ms, log scale) against batch size, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (nodes)")
    ax.set_ylabel("p50 latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
