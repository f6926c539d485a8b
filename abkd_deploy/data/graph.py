"""Graph operands: what a GNN layer aggregates over.

A layer never sees ``edge_index``; it calls three methods of an operand:

* ``neighbors(h)`` -> ``[n_dst, F]``: the normalised sum of each destination's
  neighbour rows of ``h`` (``h`` holds the source rows, ``[n_src, F]``);
* ``dst(h)`` -> ``[n_dst, ...]``: each destination's own row of ``h``;
* ``attend(z, a_src, a_dst)``: GAT attention over each destination's neighbours and
  itself.

plus ``self_weight`` (``[n_dst, 1]`` for ``gcn``, else ``None``).

:class:`FullGraph` (this module) runs a whole graph with a sparse matrix and is used for
training and evaluation. :mod:`abkd_deploy.data.ell` holds the padded fixed-fanout
operands (:class:`~abkd_deploy.data.ell.EllBlock`, :class:`~abkd_deploy.data.ell.TreeBlock`)
that export to gather-only ONNX. With a fanout covering the maximum degree, both give
the same outputs (tested).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import softmax as segment_softmax

from abkd_deploy.data.csr import CSR, check_norm, edge_weights, self_weights


class _SparseMatmul(torch.autograd.Function):
    """``adj @ h`` whose backward uses a cached transposed CSR (``adj.T @ grad``).

    torch's own CSR backward converts formats on every call and is ~5x slower on CPU.
    """

    @staticmethod
    def forward(ctx, adj: Tensor, adj_t: Tensor, h: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj_t = adj_t
        return torch.sparse.mm(adj, h)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.adj_t, grad)


def _csr_transpose(adj: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return adj.to_sparse_coo().t().coalesce().to_sparse_csr()


class FullGraph:
    """Whole-graph operand backed by a sparse CSR matrix.

    Args:
        csr: In-neighbour lists.
        norm: Aggregation normalisation (``gcn``, ``mean``, ``sum``, ``gat``).
    """

    def __init__(self, csr: CSR, norm: str) -> None:
        self.norm = check_norm(norm)
        self.num_nodes = csr.num_nodes
        deg = csr.degree
        self._col = csr.col
        self._dst = csr.dst_index()
        w = edge_weights(norm, deg[self._dst], deg[self._col])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            self._adj = torch.sparse_csr_tensor(
                csr.rowptr,
                csr.col,
                w,
                size=(csr.num_nodes, csr.num_nodes),
                check_invariants=False,
            )
        self._adj_t: Tensor | None = None  # built on the first backward pass
        sw = self_weights(norm, deg)
        self.self_weight = None if sw is None else sw.unsqueeze(1)

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int, norm: str) -> FullGraph:
        return cls(CSR.from_edge_index(edge_index, num_nodes), norm)

    @property
    def num_dst(self) -> int:
        return self.num_nodes

    def to(self, device: torch.device | str) -> FullGraph:
        """Moves the operand's tensors to ``device`` (in place) and returns it."""
        self._adj = self._adj.to(device)
        self._adj_t = None if self._adj_t is None else self._adj_t.to(device)
        self._col, self._dst = self._col.to(device), self._dst.to(device)
        if self.self_weight is not None:
            self.self_weight = self.self_weight.to(device)
        return self

    def neighbors(self, h: Tensor) -> Tensor:
        """Normalised neighbour sum. ``h``: [N, F] -> [N, F]."""
        if h.dtype != self._adj.dtype:  # autocast: sparse kernels want matching dtypes
            return self.neighbors(h.float()).to(h.dtype)
        if not (h.requires_grad and torch.is_grad_enabled()):
            return torch.sparse.mm(self._adj, h)
        if self._adj_t is None:
            self._adj_t = _csr_transpose(self._adj)
        return _SparseMatmul.apply(self._adj, self._adj_t, h)

    def dst(self, h: Tensor) -> Tensor:
        return h

    def attend(self, z: Tensor, a_src: Tensor, a_dst: Tensor, negative_slope: float) -> Tensor:
        """GAT aggregation with self loops.

        Args:
            z: [N, H, C] projected source rows.
            a_src: [N, H] source attention scores.
            a_dst: [N, H] destination attention scores.

        Returns:
            [N, H, C].
        """
        n = self.num_nodes
        loop = torch.arange(n, device=z.device)
        src = torch.cat([self._col, loop])
        dst = torch.cat([self._dst, loop])
        e = F.leaky_relu(a_src[src] + a_dst[dst], negative_slope)
        alpha = segment_softmax(e, dst, num_nodes=n)
        out = torch.zeros_like(z)
        return out.index_add_(0, dst, alpha.unsqueeze(-1) * z[src])
