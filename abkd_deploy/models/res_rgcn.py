"""R-GCN with an initial residual (GCNII's, on typed graphs): a deep typed teacher.

A plain :class:`~abkd_deploy.models.rgcn.RGCN` stops training beyond a few layers on the
typed graphs here (8 or 16 layers stay at chance on ``csbm-mag``, where 3 layers reach
78% validation accuracy). Here each hidden layer ``l = 2..L-1`` mixes in the first
layer's output, as GCNII's initial residual does: ``h^l = (1 - alpha) relu(R-GCN(h^{l-1}))
+ alpha h^1`` (the first layer changes the width, the last gives logits). Teacher-only:
the typed export forms (:mod:`abkd_deploy.export.typed_modules`) run plain layer stacks
and refuse it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from abkd_deploy.errors import ConfigError
from abkd_deploy.models.base import MODELS
from abkd_deploy.models.rgcn import RGCN


@MODELS.register("res-rgcn")
class ResRGCN(RGCN):
    """:class:`~abkd_deploy.models.rgcn.RGCN` with an initial residual on hidden layers
    ``2..L-1``; the same parameters, inputs and outputs.

    Args:
        *args, **kwargs: As :class:`~abkd_deploy.models.typed.TypedGNN`.
        alpha: Share of the first layer's output in each later hidden layer, in [0, 1].
    """

    arch = "res-rgcn"
    exportable = False

    def __init__(self, *args: Any, alpha: float = 0.5, **kwargs: Any) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"res-rgcn: alpha={alpha}; expected a value in [0, 1]")
        super().__init__(*args, **kwargs)
        self.alpha = float(alpha)

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(), "alpha": self.alpha}

    def combine(
        self, index: int, after: dict[str, Tensor], first: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        if index == 0 or index == self.num_layers - 1:
            return after
        a = self.alpha
        return {
            t: (1 - a) * v + a * first[t][: v.size(0)] if t in first else v
            for t, v in after.items()
        }
