"""Padded fixed-fanout ("ELL") neighbour tables and the operands built on them.

A fanout table holds, for every node, up to ``K`` in-neighbours (``nbr``: [N, K] int64,
padded with the node's own id) and ``count`` ([N]) valid slots. Nodes with more than
``K`` neighbours keep a seeded uniform sample of ``K`` of them (degree-capped sampling,
deterministic per node: see :func:`sample_fanout_table`);
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

import numpy as np
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

    def weights(self, norm: str, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-slot weights [N, K] (0 on padding) and self weights [N] (or ``None``);
        with ``rows`` ([r] int64), those rows only ([r, K] and [r])."""
        check_norm(norm)
        nbr, count, degree = self.nbr, self.count, self.degree
        if rows is not None:
            nbr, count, degree = nbr[rows], count[rows], degree[rows]
        mask = torch.arange(self.fanout).unsqueeze(0) < count.unsqueeze(1)
        w = edge_weights(norm, degree.unsqueeze(1), self.degree[nbr], count.unsqueeze(1))
        w = w.expand_as(nbr) * mask
        return w.contiguous(), self_weights(norm, degree)


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

    Each node keeps the ``min(degree, K)`` in-neighbours with the smallest keys
    ``hash(seed, node, neighbour)`` (:func:`sample_rows`), so a node's row depends only on
    the seed, its id and its own neighbour set: a change elsewhere in the graph leaves it
    as it is (what incremental refresh relies on). Nodes whose degree is at most ``K``
    keep all neighbours in CSR order (so exact tables do not depend on seed). Vectorised.

    Args:
        csr: In-neighbour lists.
        fanout: ``K`` >= 1.
        seed: Sampling seed.
    """
    nodes = torch.arange(csr.num_nodes)
    nbr = sample_rows(csr.rowptr, csr.col, nodes, fanout, seed)
    return FanoutTable(nbr=nbr, count=csr.degree.clamp(max=int(fanout)), degree=csr.degree)


def sample_rows(rowptr: Tensor, col: Tensor, nodes: Tensor, fanout: int, seed: int) -> Tensor:
    """The fanout-table rows of ``nodes`` given their in-neighbour lists.

    Args:
        rowptr: [n + 1] offsets of the ``n = len(nodes)`` neighbour lists in ``col``.
        col: [E] neighbour ids, grouped by node and sorted within each group.
        nodes: [n] global ids of the rows (they key the hash and pad their rows).
        fanout: ``K`` >= 1.
        seed: Sampling seed.

    Returns:
        [n, K] int64 rows: the sampled neighbours first, then the node's own id.
    """
    k = int(fanout)
    deg = rowptr[1:] - rowptr[:-1]
    local = torch.repeat_interleave(torch.arange(nodes.numel()), deg)
    key = edge_keys(seed, nodes[local], col)
    key[(deg <= k)[local].numpy()] = 0  # keep CSR order when every neighbour fits
    order = np.argsort((local.numpy().astype(np.uint64) << np.uint64(32)) | key, kind="stable")
    picked = col[torch.from_numpy(order)]
    rank = torch.arange(col.numel()) - rowptr[local]
    keep = rank < k
    nbr = nodes.reshape(-1, 1).repeat(1, k)
    nbr[local[keep], rank[keep]] = picked[keep]
    return nbr


_MASK64 = (1 << 64) - 1


def edge_keys(seed: int, dst: Tensor, src: Tensor) -> np.ndarray:
    """[E] uint64 keys below 2**32, a hash (splitmix64 rounds) of ``(seed, dst, src)``."""
    base = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0xD1B54A32D192ED03) & _MASK64)
    h = _mix64(dst.numpy().astype(np.uint64) ^ base)
    h = _mix64(h ^ (src.numpy().astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)))
    return h >> np.uint64(32)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (wrapping uint64 arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


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


def refresh_table(
    previous: Tensor, csr: CSR, changed: Tensor, fanout: int, seed: int
) -> FanoutTable:
    """The fanout table of an updated graph, re-drawing only the rows that can differ.

    Because a row depends only on the seed, the node and its neighbour set
    (:func:`sample_fanout_table`), rows of nodes whose in-neighbour list did not change
    are copied from ``previous``; the others are sampled: the result equals
    ``sample_fanout_table(csr, fanout, seed)``.

    Args:
        previous: [N', K] neighbour ids of the table before the update (``N' <= N``).
        csr: In-neighbour lists after the update (``N`` nodes).
        changed: [N] bool, nodes whose list changed (every node ``>= N'`` among them).
        fanout: ``K`` (``previous``'s width).
        seed: The table's seed.
    """
    n, k = csr.num_nodes, int(fanout)
    nodes = torch.nonzero(changed).flatten()
    nbr = torch.empty((n, k), dtype=torch.int64)
    nbr[: previous.size(0)] = previous.to(torch.int64)
    if nodes.numel():
        deg = csr.degree[nodes]
        rowptr = torch.zeros(nodes.numel() + 1, dtype=torch.int64)
        torch.cumsum(deg, 0, out=rowptr[1:])
        offset = torch.repeat_interleave(csr.rowptr[nodes] - rowptr[:-1], deg)
        col = csr.col[torch.arange(int(rowptr[-1])) + offset]
        nbr[nodes] = sample_rows(rowptr, col, nodes, k, seed)
    return FanoutTable(nbr=nbr, count=csr.degree.clamp(max=k), degree=csr.degree)
