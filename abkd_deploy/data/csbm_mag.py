"""``csbm-mag``: a synthetic typed graph with ogbn-mag's schema whose labels need relations.

Node types ``paper`` (the target, with features), ``author``, ``institution`` and
``field_of_study`` (featureless); relations ``author-writes-paper``,
``author-affiliated_with-institution``, ``paper-cites-paper`` and
``paper-has_topic-field_of_study`` (reverse relations are added by the loader, cites is
symmetrised). Every node has a latent community in ``[0, num_classes)``; a paper's class
is its community. Each of a paper's authors and fields is drawn from the paper's
community with probability ``homophily`` (else from a uniform one), its citations with
``cites_homophily``; authors join institutions of their community with ``homophily``.
Paper features are a class mean of norm ``signal`` plus standard Gaussian noise, so with
the defaults the features and the citations alone are weak evidence and a model that
uses authors and fields does clearly better. Popular nodes: within a community, the
node picked is ``floor(count * u ** skew)`` (``skew > 1`` gives heavy-tailed degrees).

Everything is vectorised numpy, seeded and deterministic. Options
(``csbm-mag:num_papers=736389,num_classes=349``): ``num_papers`` (4000), ``num_authors``
/ ``num_institutions`` / ``num_fields`` (default: ogbn-mag's ratios to papers, 1.541,
0.01187, 0.08143), ``num_classes`` (8), ``num_features`` (128), ``authors_per_paper``
(9.7), ``fields_per_paper`` (10.2), ``cites_per_paper`` (7.4),
``affiliations_per_author`` (0.92), ``homophily`` (0.4), ``cites_homophily`` (0.2),
``signal`` (0.5), ``skew`` (1.5), ``train_ratio`` (0.3), ``val_ratio`` (0.2), ``seed``
(0). The defaults at ``num_papers=736389`` give ogbn-mag's size (1.94M nodes, 21M edges).

``csbm-mag-papers`` (same options) is the homogeneous paper-only view (features and the
symmetrised citations), the baseline a typed model must beat.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from abkd_deploy.data.registry import DATASETS
from abkd_deploy.data.typed_graph import TypedGraph
from abkd_deploy.errors import ConfigError

MAG_RATIOS = {"num_authors": 1134649 / 736389, "num_institutions": 8740 / 736389}
MAG_RATIOS["num_fields"] = 59965 / 736389


@dataclass(frozen=True)
class CSBMMagConfig:
    """Generator parameters (module docstring); ``0`` counts mean "ogbn-mag's ratio"."""

    num_papers: int = 4000
    num_authors: int = 0
    num_institutions: int = 0
    num_fields: int = 0
    num_classes: int = 8
    num_features: int = 128
    authors_per_paper: float = 9.7
    fields_per_paper: float = 10.2
    cites_per_paper: float = 7.4
    affiliations_per_author: float = 0.92
    homophily: float = 0.4
    cites_homophily: float = 0.2
    signal: float = 0.5
    skew: float = 1.5
    train_ratio: float = 0.3
    val_ratio: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for key, ratio in MAG_RATIOS.items():
            if getattr(self, key) == 0:
                object.__setattr__(self, key, max(self.num_classes, round(self.num_papers * ratio)))
        checks = [
            (self.num_classes >= 2, "num_classes", ">= 2"),
            (self.num_papers >= 2 * self.num_classes, "num_papers", ">= 2 * num_classes"),
            (self.num_authors >= 1, "num_authors", ">= 1"),
            (self.num_institutions >= 1, "num_institutions", ">= 1"),
            (self.num_fields >= 1, "num_fields", ">= 1"),
            (self.num_features >= 1, "num_features", ">= 1"),
            (self.authors_per_paper >= 1, "authors_per_paper", ">= 1"),
            (self.fields_per_paper >= 1, "fields_per_paper", ">= 1"),
            (self.cites_per_paper >= 0, "cites_per_paper", ">= 0"),
            (self.affiliations_per_author >= 0, "affiliations_per_author", ">= 0"),
            (0 <= self.homophily <= 1, "homophily", "in [0, 1]"),
            (0 <= self.cites_homophily <= 1, "cites_homophily", "in [0, 1]"),
            (self.signal >= 0, "signal", ">= 0"),
            (self.skew > 0, "skew", "> 0"),
            (0 < self.train_ratio < 1, "train_ratio", "in (0, 1)"),
            (0 < self.val_ratio < 1 - self.train_ratio, "val_ratio", "in (0, 1 - train_ratio)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"csbm-mag option {name}={getattr(self, name)!r}; expected {expected}"
                )

    @classmethod
    def from_options(cls, options: dict[str, str]) -> CSBMMagConfig:
        """Builds a config from ``key=value`` strings."""
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in options.items():
            if key not in types:
                raise ConfigError(
                    f"unknown csbm-mag option {key!r}; expected one of: {', '.join(types)}"
                )
            try:
                num = float(value)
                kwargs[key] = int(num) if types[key] in (int, "int") else num
            except ValueError:
                raise ConfigError(f"csbm-mag option {key}={value!r} is not a number") from None
        return cls(**kwargs)  # type: ignore[arg-type]


class _Communities:
    """Nodes of one type grouped by community, to draw "a node of community k" in O(1)."""

    def __init__(self, comm: np.ndarray, num_classes: int, skew: float) -> None:
        self.order = np.argsort(comm, kind="stable")
        self.counts = np.bincount(comm, minlength=num_classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.skew = skew

    def draw(self, rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
        u = rng.random(k.size) ** self.skew
        pick = np.minimum((u * self.counts[k]).astype(np.int64), self.counts[k] - 1)
        return self.order[self.starts[k] + pick]


def _link(
    rng: np.random.Generator,
    src_comm: np.ndarray,
    per_src: np.ndarray,
    dst: _Communities,
    homophily: float,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``per_src[i]`` links from each source to destinations of its community w.p. ``homophily``."""
    src = np.repeat(np.arange(src_comm.size, dtype=np.int64), per_src)
    same = rng.random(src.size) < homophily
    comm = np.where(same, src_comm[src], rng.integers(0, num_classes, size=src.size))
    ok = dst.counts[comm] > 0
    src, comm = src[ok], comm[ok]
    out = dst.draw(rng, comm)
    width = int(dst.order.size)
    key = np.sort(src * width + out)  # sorted by source; np.unique (hash-based) is slower
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return key // width, key % width


def generate_csbm_mag(cfg: CSBMMagConfig) -> TypedGraph:
    """Generates the graph (without reverse relations; the loader adds them).

    Returns:
        A checked :class:`TypedGraph` with target ``paper``.
    """
    rng = np.random.default_rng(cfg.seed)
    c = cfg.num_classes
    counts = {
        "paper": cfg.num_papers,
        "author": cfg.num_authors,
        "institution": cfg.num_institutions,
        "field_of_study": cfg.num_fields,
    }
    comm = {t: rng.integers(0, c, size=n, dtype=np.int64) for t, n in counts.items()}
    groups = {t: _Communities(comm[t], c, cfg.skew) for t in counts}
    p = cfg.num_papers

    def per_node(n: int, mean: float, at_least: int) -> np.ndarray:
        return at_least + rng.poisson(max(mean - at_least, 0.0), size=n)

    paper, author = _link(
        rng,
        comm["paper"],
        per_node(p, cfg.authors_per_paper, 1),
        groups["author"],
        cfg.homophily,
        c,
    )
    writes = np.stack([author, paper])
    paper, field = _link(
        rng,
        comm["paper"],
        per_node(p, cfg.fields_per_paper, 1),
        groups["field_of_study"],
        cfg.homophily,
        c,
    )
    has_topic = np.stack([paper, field])
    src, dst = _link(
        rng,
        comm["paper"],
        per_node(p, cfg.cites_per_paper, 0),
        groups["paper"],
        cfg.cites_homophily,
        c,
    )
    keep = src != dst
    cites = np.stack([src[keep], dst[keep]])
    author, inst = _link(
        rng,
        comm["author"],
        per_node(cfg.num_authors, cfg.affiliations_per_author, 0),
        groups["institution"],
        cfg.homophily,
        c,
    )
    affiliated = np.stack([author, inst])
    del paper, author, field, src, dst, keep, inst

    y = comm["paper"]
    means = rng.standard_normal((c, cfg.num_features)).astype(np.float32)
    means *= cfg.signal / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    x = rng.standard_normal((p, cfg.num_features), dtype=np.float32)
    x += means[y]

    perm = rng.permutation(p)
    n_train = max(c, int(cfg.train_ratio * p))
    n_val = max(1, int(cfg.val_ratio * p))
    masks = [np.zeros(p, dtype=bool) for _ in range(3)]
    masks[0][perm[:n_train]] = True
    masks[1][perm[n_train : n_train + n_val]] = True
    masks[2][perm[n_train + n_val :]] = True

    graph = TypedGraph(
        num_nodes_dict=counts,
        x_dict={"paper": torch.from_numpy(x), "author": None, "institution": None},
        edge_index_dict={
            ("author", "writes", "paper"): torch.from_numpy(writes),
            ("author", "affiliated_with", "institution"): torch.from_numpy(affiliated),
            ("paper", "cites", "paper"): torch.from_numpy(cites),
            ("paper", "has_topic", "field_of_study"): torch.from_numpy(has_topic),
        },
        target="paper",
        y=torch.from_numpy(y),
        train_mask=torch.from_numpy(masks[0]),
        val_mask=torch.from_numpy(masks[1]),
        test_mask=torch.from_numpy(masks[2]),
        num_classes=c,
        homogeneous_view="csbm-mag-papers",
    )
    graph.x_dict["field_of_study"] = None
    graph.check()
    return graph


def _config(arg: str | None, split: str | None, options: dict[str, str], name: str):
    if arg:
        raise ConfigError(f"{name} takes key=value options, got {arg!r}")
    if split not in (None, "0"):
        raise ConfigError(f"{name} has a single split; got split {split!r}")
    return CSBMMagConfig.from_options(options)


@DATASETS.register("csbm-mag")
def load_csbm_mag(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> TypedGraph:
    """Registry loader: ``csbm-mag[:key=value,...]``, with reverse relations added."""
    return generate_csbm_mag(_config(arg, split, options, "csbm-mag")).with_reverse_relations()


@DATASETS.register("csbm-mag-papers")
def load_csbm_mag_papers(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
):
    """Registry loader: the homogeneous paper-only view of ``csbm-mag`` (same options)."""
    cfg = _config(arg, split, options, "csbm-mag-papers")
    return generate_csbm_mag(cfg).target_view()
