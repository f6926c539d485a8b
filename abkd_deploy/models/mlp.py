"""MLP baseline: ignores edges, but honours an operand's row selection (``dst``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from abkd_deploy.models.base import MODELS, LayerStack


class MLPLayer(nn.Linear):
    """A linear layer applied to the destination rows of the operand (all rows if none)."""

    def forward(self, h: Tensor, op: Any = None) -> Tensor:  # type: ignore[override]
        return super().forward(h if op is None else op.dst(h))


@MODELS.register("mlp")
class MLP(LayerStack):
    """``num_layers`` linear layers with ReLU and dropout; the last gives logits."""

    arch = "mlp"
    norm = "none"

    def build_layer(self, index: int, in_channels: int, out_channels: int) -> nn.Module:
        return MLPLayer(in_channels, out_channels)
