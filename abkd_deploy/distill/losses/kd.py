"""``kd``: Hinton et al.'s logit distillation with a temperature.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NeurIPS 2014 Deep
Learning Workshop (arXiv 1503.02531).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import KDBatch, LayerDims, LossTerm, register_loss
from .options import as_float


@register_loss("kd")
class LogitKDTerm(LossTerm):
    """``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``, averaged over all rows.

    The KL is summed over classes and averaged over the ``n`` rows of the batch (labelled or
    not). The ``tau^2`` factor keeps the gradient scale comparable across temperatures, as
    argued by Hinton et al. (2015). Zero exactly when the two logit rows give the same
    softened distribution.

    Args:
        dims: Layer widths (unused; logits only).
        tau: Temperature, > 0 (default 4; docs/ARCHITECTURE.md section 9.3).
    """

    def __init__(self, dims: LayerDims, *, tau: float = 4.0, **unknown: Any) -> None:
        super().__init__(dims, **unknown)
        self.tau = as_float(self.name, "tau", tau, low=0.0, strict=True)

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_logits`` and ``teacher_logits``, both ``[n, C]``.

        Returns:
            Scalar loss.
        """
        log_p_s = F.log_softmax(batch.student_logits / self.tau, dim=-1)
        log_p_t = F.log_softmax(batch.teacher_logits / self.tau, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * self.tau**2
