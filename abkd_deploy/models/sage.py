"""GraphSAGE with mean aggregation (Hamilton et al., NeurIPS 2017) on graph operands."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from abkd_deploy.models.base import MODELS, LayerStack


class SAGELayer(nn.Module):
    """``out = W_l mean_u(h_u) + b + W_r h_v`` (``W_l`` applied before gathering)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin_l = nn.Linear(in_channels, out_channels)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)

    def forward(self, h: Tensor, op: Any) -> Tensor:
        return op.neighbors(h @ self.lin_l.weight.t()) + self.lin_l.bias + self.lin_r(op.dst(h))


@MODELS.register("sage")
class GraphSAGE(LayerStack):
    """Stack of :class:`SAGELayer` with ReLU and dropout; the last layer gives logits."""

    arch = "sage"
    norm = "mean"

    def build_layer(self, index: int, in_channels: int, out_channels: int) -> nn.Module:
        return SAGELayer(in_channels, out_channels)
