"""GAT (Veličković et al., ICLR 2018) on graph operands, with self loops."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.errors import ConfigError
from abkd_deploy.models.base import MODELS, LayerStack


class GATLayer(nn.Module):
    """Multi-head attention aggregation; heads are concatenated (or averaged)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int,
        concat: bool,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.heads, self.concat, self.negative_slope = heads, concat, negative_slope
        self.out_per_head = out_channels // heads if concat else out_channels
        self.lin = nn.Linear(in_channels, heads * self.out_per_head, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, self.out_per_head))
        self.att_dst = nn.Parameter(torch.empty(heads, self.out_per_head))
        self.bias = nn.Parameter(torch.zeros(heads * self.out_per_head if concat else out_channels))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, h: Tensor, op: Any) -> Tensor:
        z = self.lin(h).reshape(-1, self.heads, self.out_per_head)
        a_src = (z * self.att_src).sum(-1)
        a_dst = (op.dst(z) * self.att_dst).sum(-1)
        out = op.attend(z, a_src, a_dst, self.negative_slope)
        out = out.reshape(out.size(0), -1) if self.concat else out.mean(1)
        return out + self.bias


@MODELS.register("gat")
class GAT(LayerStack):
    """GAT with ``heads`` concatenated heads on hidden layers and one head on the last."""

    arch = "gat"
    norm = "gat"
    activation = "elu"

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        num_layers: int,
        dropout: float = 0.5,
        heads: int = 4,
    ) -> None:
        if heads < 1 or (num_layers > 1 and hidden % heads):
            raise ConfigError(f"gat: heads={heads} must be >= 1 and divide hidden={hidden}")
        self.heads = heads
        super().__init__(in_channels, hidden, out_channels, num_layers, dropout)

    def build_layer(self, index: int, in_channels: int, out_channels: int) -> nn.Module:
        hidden_layer = index < self.num_layers - 1
        return GATLayer(
            in_channels, out_channels, self.heads if hidden_layer else 1, concat=hidden_layer
        )

    def extra_config(self) -> dict[str, Any]:
        return {"heads": self.heads}
