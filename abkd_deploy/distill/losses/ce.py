"""``ce``: cross-entropy of the student logits against the labels of the training rows."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import KDBatch, LayerDims, LossTerm, register_loss


@register_loss("ce")
class CrossEntropyTerm(LossTerm):
    """Mean cross-entropy over the rows where ``train_mask`` is true.

    ``CE = -1/|M| * sum_{v in M} log softmax(z_S(v))[y_v]`` with ``M`` the masked rows.
    A batch without labelled rows gives a zero that is still connected to the graph, so
    ``backward`` works. No options.
    """

    def __init__(self, dims: LayerDims, **unknown: Any) -> None:
        super().__init__(dims, **unknown)

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_logits [n, C]``, ``y [n]``, ``train_mask [n]``.

        Returns:
            Scalar loss.
        """
        mask = batch.train_mask.bool()
        if not bool(mask.any()):
            return batch.student_logits.sum() * 0.0
        return F.cross_entropy(batch.student_logits[mask], batch.y[mask].long())
