"""``gcrd``: graph contrastive representation distillation (InfoNCE between embeddings).

Joshi, Liu, Xun, Lin & Foo, "On Representation Knowledge Distillation for Graph Neural
Networks", TNNLS 2022 (arXiv 2111.04964, code: chaitjo/efficient-gnns), which adapts
Tian et al., "Contrastive Representation Distillation", ICLR 2020, to node embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import KDBatch, LayerDims, LossTerm, register_loss
from .options import as_float, as_int, as_pairs


@register_loss("gcrd")
class ContrastiveTerm(LossTerm):
    """InfoNCE: each node's student embedding must pick out its own teacher embedding.

    For a layer pair ``(j, i)`` trainable linear heads map ``H_S^j`` and ``H_T^i`` to a
    shared width; both are L2-normalised per node (``u_v``, ``w_v``). With temperature
    ``nce_tau`` and negatives ``K_v`` (other nodes' teacher embeddings):
    ``-log( exp(u_v.w_v/tau) / (exp(u_v.w_v/tau) + sum_{k in K_v} exp(u_v.w_k/tau)) )``,
    averaged over anchors ``v`` and pairs. The negatives push embeddings apart, so the two
    trainable heads cannot collapse to a constant the way plain matching could.

    Sampling (seeded ``torch.Generator``, advanced every call): at most ``max_nodes`` rows
    are used as anchors; when fewer than ``num_negatives`` other rows exist every other row is
    a negative (the in-batch form of the reference code), else one shared random set of
    ``num_negatives`` rows serves as negatives for all anchors (an anchor never counts
    itself).

    Args:
        dims: Layer widths.
        pairs: ``[(student_layer, teacher_layer), ...]``; default ``[(-1, -1)]``.
        proj_dim: Width of the shared embedding space (default 128).
        nce_tau: InfoNCE temperature (default 0.075, the reference code's value).
        num_negatives: Negatives per anchor (default 4096).
        max_nodes: Anchors sampled per call when ``n`` is larger (default 8192).
        seed: Seed of the sampling generator (default 0).
    """

    def __init__(
        self,
        dims: LayerDims,
        *,
        pairs: Any = None,
        proj_dim: int = 128,
        nce_tau: float = 0.075,
        num_negatives: int = 4096,
        max_nodes: int = 8192,
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        super().__init__(dims, **unknown)
        self.pairs = as_pairs(self.name, pairs, dims, [(-1, -1)])
        self.proj_dim = as_int(self.name, "proj_dim", proj_dim)
        self.nce_tau = as_float(self.name, "nce_tau", nce_tau, low=0.0, strict=True)
        self.num_negatives = as_int(self.name, "num_negatives", num_negatives)
        self.max_nodes = as_int(self.name, "max_nodes", max_nodes, low=2)
        self.seed = as_int(self.name, "seed", seed, low=0)
        self.student_heads = nn.ModuleList(
            nn.Linear(dims.student[s], self.proj_dim) for s, _ in self.pairs
        )
        self.teacher_heads = nn.ModuleList(
            nn.Linear(dims.teacher[t], self.proj_dim) for _, t in self.pairs
        )
        self.generator = torch.Generator().manual_seed(self.seed)

    def _nce(self, u: Tensor, w: Tensor) -> Tensor:
        """InfoNCE of ``[m, k]`` anchors ``u`` against ``[m, k]`` teacher embeddings ``w``."""
        m = u.shape[0]
        if self.num_negatives >= m - 1:
            logits = u @ w.T / self.nce_tau
            return F.cross_entropy(logits, torch.arange(m, device=u.device))
        neg = torch.randperm(m, generator=self.generator)[: self.num_negatives].to(u.device)
        pos = (u * w).sum(dim=-1, keepdim=True) / self.nce_tau
        negs = u @ w[neg].T / self.nce_tau
        negs = negs.masked_fill(
            neg[None, :] == torch.arange(m, device=u.device)[:, None], float("-inf")
        )
        logits = torch.cat([pos, negs], dim=1)
        return F.cross_entropy(logits, torch.zeros(m, dtype=torch.long, device=u.device))

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_hiddens`` and ``teacher_hiddens`` (``[n, d]`` each).

        Returns:
            Scalar loss.
        """
        self.check_hiddens(batch)
        n = batch.num_nodes
        rows = None
        if n > self.max_nodes:
            rows = torch.randperm(n, generator=self.generator)[: self.max_nodes]
        losses = []
        for hs, ht, (s, t) in zip(self.student_heads, self.teacher_heads, self.pairs, strict=True):
            h_s, h_t = batch.student_hiddens[s], batch.teacher_hiddens[t]
            if rows is not None:
                idx = rows.to(h_s.device)
                h_s, h_t = h_s[idx], h_t[idx]
            u = F.normalize(hs(h_s), dim=-1)
            w = F.normalize(ht(h_t), dim=-1)
            losses.append(self._nce(u, w))
        return sum(losses[1:], losses[0]) / len(losses)
