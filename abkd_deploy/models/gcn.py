"""GCN (Kipf & Welling, ICLR 2017) on graph operands."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.models.base import MODELS, LayerStack


class GCNLayer(nn.Module):
    """``out = self_w * (h W)_v + sum_u w_vu (h W)_u + b`` (linear map before gathering)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, h: Tensor, op: Any) -> Tensor:
        hw = self.lin(h)
        return op.neighbors(hw) + op.self_weight * op.dst(hw) + self.bias


@MODELS.register("gcn")
class GCN(LayerStack):
    """Stack of :class:`GCNLayer` with ReLU and dropout; the last layer gives logits."""

    arch = "gcn"
    norm = "gcn"

    def build_layer(self, index: int, in_channels: int, out_channels: int) -> nn.Module:
        return GCNLayer(in_channels, out_channels)
