"""``at``: attention transfer on node feature maps.

Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv 1612.03928).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import KDBatch, LayerDims, LossTerm, register_loss
from .options import as_float, as_pairs, proportional_pairs


def attention_map(h: Tensor, p: float) -> Tensor:
    """Spatial attention of a node feature map, L2-normalised over the nodes.

    Args:
        h: ``[n, d]`` node representations (nodes play the role of spatial positions,
            features the role of channels).
        p: Exponent of the channel statistic ``sum_c |h_vc|^p``.

    Returns:
        ``[n]`` unit-norm vector.
    """
    return F.normalize(h.abs().pow(p).sum(dim=-1), dim=0)


@register_loss("at")
class AttentionTransferTerm(LossTerm):
    """Squared distance between the normalised attention maps of paired layers.

    For a pair ``(j, i)``: ``|| Q_S^j - Q_T^i ||_2^2`` with ``Q = attention_map(H, p)``,
    averaged over pairs. The original uses the (unsquared) p-norm of the difference; the
    square is smooth at zero and is what common implementations optimise. The maps do not
    depend on the feature widths, so no parameters are needed. Zero when the student's
    per-node activation energy is proportional to the teacher's.

    Args:
        dims: Layer widths.
        pairs: ``[(student_layer, teacher_layer), ...]``; default: every student layer with
            the teacher layer at the same relative depth.
        p: Exponent of the attention statistic (default 2, the paper's choice).
    """

    def __init__(
        self, dims: LayerDims, *, pairs: Any = None, p: float = 2.0, **unknown: Any
    ) -> None:
        super().__init__(dims, **unknown)
        self.pairs = as_pairs(self.name, pairs, dims, proportional_pairs(dims))
        self.p = as_float(self.name, "p", p, low=0.0, strict=True)

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_hiddens`` and ``teacher_hiddens`` (``[n, d]`` each).

        Returns:
            Scalar loss.
        """
        self.check_hiddens(batch)
        losses = [
            (
                attention_map(batch.student_hiddens[s], self.p)
                - attention_map(batch.teacher_hiddens[t], self.p)
            )
            .pow(2)
            .sum()
            for s, t in self.pairs
        ]
        return sum(losses[1:], losses[0]) / len(losses)
