"""Contextual stochastic block model (CSBM): the built-in synthetic dataset.

Nodes get one of ``num_classes`` labels; each undirected edge joins two nodes of the
same class with probability ``homophily`` and of different classes otherwise; features
are a class mean (random direction, norm ``signal``) plus standard Gaussian noise.
Everything is vectorised numpy, seeded and deterministic. 1M nodes / 10M directed edges
take a few seconds and a few hundred MB.

Options (``csbm:num_nodes=100000,avg_degree=10``): ``num_nodes`` (10000), ``num_classes``
(5), ``avg_degree`` (10, directed edges per node), ``homophily`` (0.7), ``num_features``
(64), ``signal`` (1.0), ``train_ratio`` (0.05), ``val_ratio`` (0.15), ``seed`` (0).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from abkd_deploy.data.registry import DATASETS
from abkd_deploy.errors import ConfigError


@dataclass(frozen=True)
class CSBMConfig:
    """Parameters of the generator (see module docstring)."""

    num_nodes: int = 10_000
    num_classes: int = 5
    avg_degree: float = 10.0
    homophily: float = 0.7
    num_features: int = 64
    signal: float = 1.0
    train_ratio: float = 0.05
    val_ratio: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_nodes >= 10, "num_nodes", ">= 10"),
            (2 <= self.num_classes <= self.num_nodes, "num_classes", ">= 2 and <= num_nodes"),
            (self.avg_degree > 0, "avg_degree", "> 0"),
            (0.0 <= self.homophily <= 1.0, "homophily", "in [0, 1]"),
            (self.num_features >= 1, "num_features", ">= 1"),
            (self.signal >= 0, "signal", ">= 0"),
            (0 < self.train_ratio < 1, "train_ratio", "in (0, 1)"),
            (0 < self.val_ratio < 1 - self.train_ratio, "val_ratio", "in (0, 1 - train_ratio)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"csbm option {name}={getattr(self, name)!r}; expected {expected}"
                )

    @classmethod
    def from_options(cls, options: dict[str, str]) -> CSBMConfig:
        """Builds a config from ``key=value`` strings, converting to the field types."""
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in options.items():
            if key not in types:
                raise ConfigError(
                    f"unknown csbm option {key!r}; expected one of: {', '.join(types)}"
                )
            conv = int if types[key] in (int, "int") else float
            try:
                kwargs[key] = conv(float(value)) if conv is int else conv(value)
            except ValueError:
                raise ConfigError(f"csbm option {key}={value!r} is not a number") from None
        return cls(**kwargs)  # type: ignore[arg-type]


def generate_csbm(cfg: CSBMConfig) -> Data:
    """Generates a CSBM graph.

    Returns:
        ``Data`` following the contract of :func:`abkd_deploy.data.load_dataset`.
    """
    rng = np.random.default_rng(cfg.seed)
    n, c = cfg.num_nodes, cfg.num_classes
    y = rng.integers(0, c, size=n, dtype=np.int64)

    # Nodes grouped by class, to draw "a random node of class k" in O(1).
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=c)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if (counts == 0).any():
        raise ConfigError(f"csbm: num_nodes={n} too small for num_classes={c}")

    m = round(n * cfg.avg_degree / 2)  # undirected edges before de-duplication
    src = rng.integers(0, n, size=m, dtype=np.int64)
    same = rng.random(m) < cfg.homophily
    shift = rng.integers(1, c, size=m, dtype=np.int64)
    dst_class = np.where(same, y[src], (y[src] + shift) % c)
    pick = (rng.random(m) * counts[dst_class]).astype(np.int64)
    dst = order[starts[dst_class] + pick]
    del same, shift, dst_class, pick

    keep = src != dst
    src, dst = src[keep], dst[keep]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = np.unique(lo * n + hi)  # sorted, de-duplicated undirected pairs
    lo, hi = key // n, key % n
    del key, src, dst
    edge_index = np.stack([np.concatenate([lo, hi]), np.concatenate([hi, lo])])
    del lo, hi

    means = rng.standard_normal((c, cfg.num_features)).astype(np.float32)
    means *= cfg.signal / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    x = rng.standard_normal((n, cfg.num_features), dtype=np.float32)
    x += means[y]

    perm = rng.permutation(n)
    n_train = max(c, int(cfg.train_ratio * n))
    n_val = max(1, int(cfg.val_ratio * n))
    masks = [np.zeros(n, dtype=bool) for _ in range(3)]
    masks[0][perm[:n_train]] = True
    masks[1][perm[n_train : n_train + n_val]] = True
    masks[2][perm[n_train + n_val :]] = True

    data = Data(
        x=torch.from_numpy(x),
        edge_index=torch.from_numpy(edge_index),
        y=torch.from_numpy(y),
        train_mask=torch.from_numpy(masks[0]),
        val_mask=torch.from_numpy(masks[1]),
        test_mask=torch.from_numpy(masks[2]),
    )
    data.num_classes = c
    data.metric = "accuracy"
    return data


@DATASETS.register("csbm")
def load_csbm(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> Data:
    """Registry loader: ``csbm`` or ``csbm:key=value,...`` (root and split are unused)."""
    if arg:
        raise ConfigError(f"csbm takes key=value options, got {arg!r}")
    if split not in (None, "0"):
        raise ConfigError(f"csbm has a single split; got split {split!r}")
    return generate_csbm(CSBMConfig.from_options(options))
