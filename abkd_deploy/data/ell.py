"""Padded fixed-fanout ("ELL") neighbour tables and the operands built on them.

A fanout table holds, for every node, up to ``K`` in-neighbours (``nbr``: [N, K] int64,
padded with the node's own id) and ``count`` ([N]) valid slots. Nodes with more than
``K`` neighbours keep a seeded uniform sample of ``K`` of them (degree-capped sampling);
with ``K >= max degree`` the table is exact. Weights follow :mod:`abkd_deploy.data.csr`.

Operands (see :mod:`abkd_deploy.data.graph` for the protocol):

* :class:`EllBlock`: destination rows are the first ``n_dst`` source rows (prefix
  convention); ``nbr`` holds local source row ids. Full-graph ELL is the case
  ``n_dst == n_src``; a sampled mini-batch is a stack of blocks.
* :class:`TreeBlock`: source rows are laid out as ``[n_dst, 1 + K]`` (the node itself,
  then its ``K`` table slots); no index is needed, only reshapes. This is how the
  ``embedded`` export gathers an L-hop receptive field with static shapes.

Both compute aggregations with gather + matmul only (no scatter), so they export to
ONNX as Gather / MatMul / Softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from abkd_deploy.data.csr import CSR, check_norm, edge_weights, self_weights
from abkd_deploy.errors import ConfigError


@dataclass
class FanoutTable:
    """Up to ``K`` in-neighbours per node.

    Attributes:
        nbr: [N, K] int64 global neighbour ids, padding = the node's own id.
        count: [N] int64 number of valid slots (``min(degree, K)``).
        degree: [N] int64 full-graph in-degree.
    """

    nbr: Tensor
    count: Tensor
    degree: Tensor

    @property
    def fanout(self) -> int:
        return int(self.nbr.size(1))

    @property
    def mask(self) -> Tensor:
        """[N, K] bool, True on valid slots."""
        return torch.arange(self.fanout).unsqueeze(0) < self.count.unsqueeze(1)

    def weights(self, norm: str) -> tuple[Tensor, Tensor | None]:
        """Per-slot weights [N, K] (0 on padding) and self weights [N] (or ``None``)."""
        check_norm(norm)
        w = edge_weights(
            norm, self.degree.unsqueeze(1), self.degree[self.nbr], self.count.unsqueeze(1)
        )
        w = w.expand_as(self.nbr) * self.mask
        return w.contiguous(), self_weights(norm, self.degree)


def parse_fanout(value: int | str, max_degree: int) -> int:
    """``"max"`` -> ``max_degree`` (at least 1); positive ints pass through."""
    if str(value).lower() == "max":
        return max(1, max_degree)
    try:
        k = int(value)
    except ValueError:
        raise ConfigError(f"bad fanout {value!r}; expected a positive integer or 'max'") from None
    if k < 1:
        raise ConfigError(f"bad fanout {value!r}; expected a positive integer or 'max'")
    return k


def sample_fanout_table(csr: CSR, fanout: int, seed: int = 0) -> FanoutTable:
    """Builds a :class:`FanoutTable` by seeded uniform sampling without replacement.

    Vectorised: every edge gets a random key; edges are sorted by (destination, key) and
    the first ``min(degree, K)`` of each destination are kept. Nodes whose degree is at
    most ``K`` keep all neighbours in CSR order (so exact tables do not depend on seed).

    Args:
        csr: In-neighbour lists.
        fanout: ``K`` >= 1.
        seed: Sampling seed.
    """
    n, k = csr.num_nodes, int(fanout)
    deg = csr.degree
    gen = torch.Generator().manual_seed(int(seed))
    dst = csr.dst_index()
    key = torch.rand(csr.col.numel(), generator=gen, dtype=torch.float64)
    key = torch.where(deg[dst] > k, key, torch.zeros_like(key))  # keep order when all fit
    order = torch.argsort(dst.to(torch.float64) * 2.0 + key, stable=True)
    col = csr.col[order]
    rank = torch.arange(col.numel()) - csr.rowptr[dst]
    keep = rank < k
    nbr = torch.arange(n).unsqueeze(1).repeat(1, k)
    nbr[dst[keep], rank[keep]] = col[keep]
    return FanoutTable(nbr=nbr, count=deg.clamp(max=k), degree=deg)


class _PaddedOperand:
    """Shared gather-based math of :class:`EllBlock` and :class:`TreeBlock`."""

    weight: Tensor  # [n_dst, K]
    self_weight: Tensor | None  # [n_dst, 1]

    def gather(self, h: Tensor) -> Tensor:  # [n_dst, K, ...]
        raise NotImplementedError

    def dst(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def neighbors(self, h: Tensor) -> Tensor:
        g = self.gather(h)  # [n, K, F]
        return torch.matmul(self.weight.unsqueeze(1).to(g.dtype), g).squeeze(1)

    def attend(self, z: Tensor, a_src: Tensor, a_dst: Tensor, negative_slope: float) -> Tensor:
        e_self = F.leaky_relu(self.dst(a_src) + a_dst, negative_slope)  # [n, H]
        e_nb = F.leaky_relu(self.gather(a_src) + a_dst.unsqueeze(1), negative_slope)  # [n,K,H]
        valid = (self.weight > 0).unsqueeze(-1)
        e_nb = torch.where(valid, e_nb, torch.full_like(e_nb, -1e9))
        alpha = torch.softmax(torch.cat([e_self.unsqueeze(1), e_nb], 1), dim=1)  # [n,1+K,H]
        z_all = torch.cat([self.dst(z).unsqueeze(1), self.gather(z)], 1)  # [n,1+K,H,C]
        return (alpha.unsqueeze(-1) * z_all).sum(1)


class EllBlock(_PaddedOperand):
    """Padded-table operand with the prefix convention (see module docstring).

    Args:
        nbr: [n_dst, K] int64 local source row of each slot.
        weight: [n_dst, K] float slot weights, 0 on padding (for ``gat``: 1 = valid).
        self_weight: [n_dst] float (``gcn``) or ``None``.
    """

    def __init__(self, nbr: Tensor, weight: Tensor, self_weight: Tensor | None) -> None:
        self.nbr, self.weight = nbr, weight
        self.self_weight = None if self_weight is None else self_weight.reshape(-1, 1)

    @classmethod
    def full_graph(cls, table: FanoutTable, norm: str) -> EllBlock:
        """The whole graph as one block (``n_dst == n_src == N``)."""
        w, sw = table.weights(norm)
        return cls(table.nbr, w, sw)

    @property
    def num_dst(self) -> int:
        return int(self.nbr.size(0))

    def to(self, device: torch.device | str) -> EllBlock:
        self.nbr, self.weight = self.nbr.to(device), self.weight.to(device)
        if self.self_weight is not None:
            self.self_weight = self.self_weight.to(device)
        return self

    def gather(self, h: Tensor) -> Tensor:
        n, k = self.nbr.shape
        return h.index_select(0, self.nbr.reshape(-1)).reshape((n, k, *h.shape[1:]))

    def dst(self, h: Tensor) -> Tensor:
        return h[: self.nbr.size(0)]


class TreeBlock(_PaddedOperand):
    """Operand whose source rows are ``[n_dst, 1 + K]`` blocks: self, then the K slots.

    Args:
        weight: [n_dst, K] slot weights (0 on padding).
        self_weight: [n_dst] (``gcn``) or ``None``.
    """

    def __init__(self, weight: Tensor, self_weight: Tensor | None) -> None:
        self.weight = weight
        self.self_weight = None if self_weight is None else self_weight.reshape(-1, 1)

    def _view(self, h: Tensor) -> Tensor:
        return h.reshape((-1, self.weight.size(1) + 1, *h.shape[1:]))

    def gather(self, h: Tensor) -> Tensor:
        return self._view(h)[:, 1:]

    def dst(self, h: Tensor) -> Tensor:
        return self._view(h)[:, 0]
