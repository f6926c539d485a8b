"""Graph operands of typed models: one aggregation operand per relation.

A typed layer gets ``h_dict`` (source rows per node type) and a :class:`TypedBlock`:

* ``num_dst[t]``: destination rows of type ``t``; they are the first ``num_dst[t]`` source
  rows of that type (prefix convention, as :class:`~abkd_deploy.data.ell.EllBlock`);
* ``rel_ops[(h, r, t)]``: an operand whose ``neighbors(h_src)`` maps the head type's
  source rows ``[n_src_h, F]`` to the normalised neighbour sum ``[num_dst[t], F]``.

Relation operands are either :class:`RelationFull` (a sparse CSR matrix, for whole-graph
training and evaluation) or :class:`~abkd_deploy.data.ell.EllBlock` over a padded
fixed-fanout table per relation (gather + matmul only, what exports to ONNX); with a
fanout covering every relation's maximum in-degree they agree (tested). Only ``mean``
(R-GCN, SAGE) and ``sum`` normalisations are supported on typed graphs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, FanoutTable, parse_fanout, sample_fanout_table
from abkd_deploy.data.graph import _csr_transpose, _SparseMatmul
from abkd_deploy.data.typed_graph import Relation, TypedGraph
from abkd_deploy.errors import ConfigError

TYPED_NORMS = ("mean", "sum")


def check_typed_norm(norm: str) -> str:
    if norm not in TYPED_NORMS:
        raise ConfigError(f"typed graphs aggregate with {TYPED_NORMS}; got norm {norm!r}")
    return norm


def relation_csr(edge_index: Tensor, num_dst: int) -> CSR:
    """In-neighbour lists of a (possibly bipartite) relation: rows = tail ids, col = head ids."""
    src, dst = edge_index[0], edge_index[1]
    perm = torch.argsort(dst, stable=True)
    deg = torch.bincount(dst, minlength=num_dst)
    rowptr = torch.zeros(num_dst + 1, dtype=torch.long)
    torch.cumsum(deg, 0, out=rowptr[1:])
    return CSR(rowptr=rowptr, col=src[perm].contiguous(), num_nodes=num_dst)


def relation_fanout_table(csr: CSR, fanout: int, seed: int = 0) -> FanoutTable:
    """Seeded fixed-fanout table of one relation; padding slots point at head row 0.

    (The homogeneous table pads with the node's own id, which is not a valid head id of
    a bipartite relation.)
    """
    table = sample_fanout_table(csr, fanout, seed=seed)
    table.nbr = torch.where(table.mask, table.nbr, torch.zeros_like(table.nbr))
    return table


def relation_weights(table: FanoutTable, norm: str) -> Tensor:
    """[N_dst, K] slot weights: ``1 / count`` (``mean``) or ``1`` (``sum``), 0 on padding."""
    mask = table.mask.to(torch.float32)
    if check_typed_norm(norm) == "mean":
        return mask / table.count.clamp(min=1).to(torch.float32).unsqueeze(1)
    return mask


class RelationFull:
    """Whole-relation operand: ``neighbors(h)`` = ``A_r @ h`` with A_r [N_tail, N_head].

    Args:
        edge_index: [2, E] (head ids, tail ids).
        num_src: N_head.
        num_dst: N_tail.
        norm: ``mean`` (``1 / in-degree``) or ``sum``.
    """

    def __init__(self, edge_index: Tensor, num_src: int, num_dst: int, norm: str) -> None:
        csr = relation_csr(edge_index, num_dst)
        deg = csr.degree
        if check_typed_norm(norm) == "mean":
            w = 1.0 / deg.clamp(min=1).to(torch.float32)[csr.dst_index()]
        else:
            w = torch.ones(csr.col.numel())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            self._adj = torch.sparse_csr_tensor(
                csr.rowptr, csr.col, w, size=(num_dst, num_src), check_invariants=False
            )
        self._adj_t: Tensor | None = None
        self.num_dst = num_dst

    def to(self, device: torch.device | str) -> RelationFull:
        self._adj = self._adj.to(device)
        self._adj_t = None if self._adj_t is None else self._adj_t.to(device)
        return self

    def neighbors(self, h: Tensor) -> Tensor:
        """``h``: [N_head, F] -> [N_tail, F]."""
        if h.dtype != self._adj.dtype:
            return self.neighbors(h.float()).to(h.dtype)
        if not (h.requires_grad and torch.is_grad_enabled()):
            return torch.sparse.mm(self._adj, h)
        if self._adj_t is None:
            self._adj_t = _csr_transpose(self._adj)
        return _SparseMatmul.apply(self._adj, self._adj_t, h)


@dataclass
class TypedBlock:
    """One layer's typed operand (module docstring).

    Attributes:
        num_dst: Destination rows per node type (a prefix of that type's source rows).
        rel_ops: Relation -> operand (``neighbors(h_head) -> [num_dst[tail], F]``).
    """

    num_dst: dict[str, int]
    rel_ops: dict[Relation, Any] = field(default_factory=dict)

    @classmethod
    def full_graph(cls, graph: TypedGraph, norm: str = "mean") -> TypedBlock:
        """The whole graph with one sparse operand per relation."""
        n = graph.num_nodes_dict
        return cls(
            num_dst=dict(n),
            rel_ops={
                rel: RelationFull(ei, n[rel[0]], n[rel[2]], norm)
                for rel, ei in sorted(graph.edge_index_dict.items())
            },
        )

    @classmethod
    def full_graph_ell(
        cls,
        graph: TypedGraph,
        fanout: int | str | dict[Relation, int | str] = "max",
        norm: str = "mean",
        seed: int = 0,
    ) -> TypedBlock:
        """The whole graph with one padded fanout table per relation (``EllBlock``).

        Args:
            fanout: ``K`` for every relation, ``"max"`` (exact), or a per-relation dict.
        """
        ops: dict[Relation, Any] = {}
        for i, (rel, ei) in enumerate(sorted(graph.edge_index_dict.items())):
            csr = relation_csr(ei, graph.num_nodes_dict[rel[2]])
            k = fanout.get(rel, "max") if isinstance(fanout, dict) else fanout
            table = relation_fanout_table(csr, parse_fanout(k, csr.max_degree), seed=seed + i)
            ops[rel] = EllBlock(table.nbr, relation_weights(table, norm), None)
        return cls(num_dst=dict(graph.num_nodes_dict), rel_ops=ops)

    def to(self, device: torch.device | str) -> TypedBlock:
        """Moves every relation operand to ``device`` (in place) and returns the block."""
        for op in self.rel_ops.values():
            op.to(device)
        return self
