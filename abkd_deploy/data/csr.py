"""Compressed sparse rows by destination node, and the per-node normalisation weights.

Conventions used across the package: ``edge_index[0]`` is the source, ``edge_index[1]``
the destination; a node aggregates messages from its in-neighbours. The normalisation
``norm`` of an aggregation is one of:

* ``gcn``: ``w[v, u] = 1 / sqrt((d_v + 1)(d_u + 1))`` plus a self term ``1 / (d_v + 1)``
  (symmetric normalisation with self loops, Kipf & Welling).
* ``mean``: ``w[v, u] = 1 / d_v`` (GraphSAGE mean), no self term.
* ``sum``: ``w[v, u] = 1``, no self term.
* ``gat``: ``w[v, u] = 1`` marks a valid neighbour; the layer computes attention over
  the neighbours and the node itself.
* ``none``: no aggregation (``mlp``); only the row selection of an operand is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from abkd_deploy.errors import ConfigError

NORMS = ("gcn", "mean", "sum", "gat", "none")


@dataclass
class CSR:
    """In-neighbour lists in CSR form.

    Attributes:
        rowptr: [N + 1] int64 offsets.
        col: [E] int64 source node of each edge, grouped by destination.
        num_nodes: N.
    """

    rowptr: Tensor
    col: Tensor
    num_nodes: int

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int) -> CSR:
        """Builds the CSR of ``edge_index`` ([2, E], source row 0, destination row 1)."""
        src, dst = edge_index[0], edge_index[1]
        perm = torch.argsort(dst * num_nodes + src)
        col = src[perm].contiguous()
        deg = torch.bincount(dst, minlength=num_nodes)
        rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(deg, 0, out=rowptr[1:])
        return cls(rowptr=rowptr, col=col, num_nodes=num_nodes)

    @property
    def degree(self) -> Tensor:
        """[N] int64 in-degree."""
        return self.rowptr[1:] - self.rowptr[:-1]

    @property
    def max_degree(self) -> int:
        return int(self.degree.max()) if self.num_nodes else 0

    def dst_index(self) -> Tensor:
        """[E] int64 destination of each entry of :attr:`col`."""
        return torch.repeat_interleave(torch.arange(self.num_nodes), self.degree)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigError(f"unknown aggregation norm {norm!r}; expected one of {NORMS}")
    return norm


def edge_weights(
    norm: str, deg_dst: Tensor, deg_src: Tensor, count_dst: Tensor | None = None
) -> Tensor:
    """Weight of each (dst, src) message under ``norm``.

    Args:
        norm: See module docstring.
        deg_dst: Full-graph in-degree of each message's destination (any shape).
        deg_src: Full-graph in-degree of each message's source (same shape).
        count_dst: Number of neighbours actually kept for the destination (degree-capped
            sampling). ``gcn`` scales by ``d_v / count`` so that the sampled sum is an
            unbiased estimate of the exact one; ``mean`` divides by ``count``.

    Returns:
        Float weights of the same shape.
    """
    deg_dst = deg_dst.to(torch.float32)
    count = deg_dst if count_dst is None else count_dst.to(torch.float32)
    if norm == "gcn":
        scale = deg_dst / count.clamp(min=1)
        return scale * torch.rsqrt((deg_dst + 1) * (deg_src.to(torch.float32) + 1))
    if norm == "mean":
        return 1.0 / count.clamp(min=1)
    return torch.ones_like(deg_dst)


def self_weights(norm: str, deg: Tensor) -> Tensor | None:
    """[N] weight of a node's own row (``gcn`` only), else ``None``."""
    return 1.0 / (deg.to(torch.float32) + 1) if norm == "gcn" else None
