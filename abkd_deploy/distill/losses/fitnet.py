"""``fitnet``: hint-based distillation through a learned regressor.

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv 1412.6550).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import KDBatch, LayerDims, LossTerm, proportional_layer, register_loss
from .options import as_pairs


@register_loss("fitnet")
class FitNetTerm(LossTerm):
    """Mean squared error between ``r(H_S^j)`` and the teacher hint ``H_T^i``.

    For each configured pair ``(j, i)`` a trainable linear regressor ``r_j: d_S^j -> d_T^i``
    (with bias) lifts the student's guided layer to the width of the teacher's hint layer;
    the loss is ``mean over nodes and features of (r_j(H_S^j) - H_T^i)^2``, averaged over
    pairs. FitNets used a convolutional regressor on image feature maps; on node features
    the natural counterpart is a linear map. The mean (rather than FitNets' ``1/2`` sum)
    keeps the value independent of ``n`` and ``d_T``.

    Args:
        dims: Layer widths.
        pairs: ``[(student_layer, teacher_layer), ...]``; default: student layer 0 with the
            teacher layer at the same relative depth (the "middle" hint of FitNets for a
            two-layer student).
    """

    def __init__(self, dims: LayerDims, *, pairs: Any = None, **unknown: Any) -> None:
        super().__init__(dims, **unknown)
        default = [(0, proportional_layer(0, len(dims.student), len(dims.teacher)))]
        self.pairs = as_pairs(self.name, pairs, dims, default)
        self.regressors = nn.ModuleList(
            nn.Linear(dims.student[s], dims.teacher[t]) for s, t in self.pairs
        )

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_hiddens`` and ``teacher_hiddens`` (``[n, d]`` each).

        Returns:
            Scalar loss.
        """
        self.check_hiddens(batch)
        losses = [
            F.mse_loss(reg(batch.student_hiddens[s]), batch.teacher_hiddens[t])
            for reg, (s, t) in zip(self.regressors, self.pairs, strict=True)
        ]
        return sum(losses[1:], losses[0]) / len(losses)
