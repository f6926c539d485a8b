"""``lsp``: local structure preserving distillation over the graph's edges.

Yang, Qiu, Song, Tao & Wang, "Distilling Knowledge from Graph Convolutional Networks",
CVPR 2020 (arXiv 2003.10477). Also benchmarked as a baseline by Joshi et al., "On
Representation Knowledge Distillation for Graph Neural Networks", TNNLS 2022
(arXiv 2111.04964, code: chaitjo/efficient-gnns).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from abkd_deploy.errors import ConfigError

from .base import KDBatch, LayerDims, LossTerm, register_loss
from .options import as_choice, as_float, as_pairs

KERNELS = ("rbf", "sqdist", "linear", "cosine")


def segment_log_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Log-softmax of ``scores`` within each group of equal ``index``.

    Args:
        scores: ``[E]`` edge scores.
        index: ``[E]`` int64 group (destination node) of each edge.
        num_segments: Number of groups ``n``.

    Returns:
        ``[E]`` log-probabilities; each group's probabilities sum to 1.
    """
    peak = torch.full((num_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, index, scores.detach(), reduce="amax", include_self=True)
    shifted = scores - peak[index]
    total = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device)
    total = total.index_add(0, index, shifted.exp())
    return shifted - total[index].log()


def edge_scores(h: Tensor, src: Tensor, dst: Tensor, kernel: str, sigma: float) -> Tensor:
    """Similarity ``SIM(z_dst, z_src)`` of every edge's endpoints (a softmax logit).

    Args:
        h: ``[n, d]`` node representations.
        src: ``[E]`` source rows.
        dst: ``[E]`` destination rows.
        kernel: ``rbf``: ``exp(-||z_i - z_j||^2 / (2 sigma^2))`` (the kernel value itself is
            the logit, as in the paper's kernel study); ``sqdist``:
            ``-||z_i - z_j||^2 / (2 sigma^2)`` (so the distribution is the RBF kernel
            normalised over the neighbours); ``linear``: ``z_i . z_j``; ``cosine``:
            cosine similarity.
        sigma: Bandwidth of ``rbf`` / ``sqdist``.

    Returns:
        ``[E]`` scores.
    """
    a, b = h[dst], h[src]
    if kernel in ("rbf", "sqdist"):
        scaled = -(a - b).pow(2).sum(dim=-1) / (2.0 * sigma * sigma)
        return scaled.exp() if kernel == "rbf" else scaled
    if kernel == "linear":
        return (a * b).sum(dim=-1)
    return F.cosine_similarity(a, b, dim=-1)


@register_loss("lsp")
class LocalStructureTerm(LossTerm):
    """KL between teacher and student neighbour-similarity distributions, per node.

    For node ``i`` with incoming neighbours ``N(i)`` (edges ``j -> i``, self loops dropped):
    ``LS_ij = softmax_{j in N(i)} SIM(z_i, z_j)``, computed from the teacher's and the
    student's representations of a layer pair. The loss is
    ``mean over nodes with N(i) non-empty of KL(LS_T(i) || LS_S(i))``, averaged over pairs.
    It compares scalars per edge, so teacher and student widths may differ and no parameters
    are needed. Zero when both sides give the same distributions (e.g. identical hiddens).

    Args:
        dims: Layer widths.
        pairs: ``[(student_layer, teacher_layer), ...]``; default ``[(-1, -1)]``, the last
            layers, as in the paper (which distils the final embedding).
        kernel: ``rbf`` (default; the paper's best kernel), ``sqdist``, ``linear`` or
            ``cosine``; see :func:`edge_scores`.
        sigma: RBF bandwidth (default 1).

    Raises:
        ConfigError: Bad options, or (at forward) a batch without ``edge_index``.
    """

    def __init__(
        self,
        dims: LayerDims,
        *,
        pairs: Any = None,
        kernel: str = "rbf",
        sigma: float = 1.0,
        **unknown: Any,
    ) -> None:
        super().__init__(dims, **unknown)
        self.pairs = as_pairs(self.name, pairs, dims, [(-1, -1)])
        self.kernel = as_choice(self.name, "kernel", kernel, KERNELS)
        self.sigma = as_float(self.name, "sigma", sigma, low=0.0, strict=True)

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with hiddens (``[n, d]`` each) and ``edge_index [2, E]``.

        Returns:
            Scalar loss (zero, still attached to the student, when no edge is left).
        """
        if batch.edge_index is None:
            raise ConfigError("loss 'lsp' needs the batch's edge_index, which is None")
        self.check_hiddens(batch)
        n = batch.num_nodes
        src, dst = batch.edge_index.long()
        if src.numel() and (int(batch.edge_index.min()) < 0 or int(batch.edge_index.max()) >= n):
            raise ValueError(f"loss 'lsp': edge_index has ids outside [0, {n})")
        keep = src != dst
        src, dst = src[keep], dst[keep]
        anchor = batch.student_hiddens[self.pairs[0][0]].sum() * 0.0
        if src.numel() == 0:
            return anchor
        has_neighbours = torch.zeros(n, dtype=torch.bool, device=dst.device)
        has_neighbours[dst] = True
        denom = has_neighbours.sum()
        losses = []
        for s, t in self.pairs:
            log_p_s = segment_log_softmax(
                edge_scores(batch.student_hiddens[s], src, dst, self.kernel, self.sigma), dst, n
            )
            log_p_t = segment_log_softmax(
                edge_scores(batch.teacher_hiddens[t], src, dst, self.kernel, self.sigma), dst, n
            )
            losses.append((log_p_t.exp() * (log_p_t - log_p_s)).sum() / denom)
        return sum(losses[1:], anchor + losses[0]) / len(losses)
