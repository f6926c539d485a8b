"""GCNII (Chen et al., "Simple and Deep Graph Convolutional Networks", ICML 2020)."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.models.base import GNN, MODELS


class GCNIILayer(nn.Module):
    """``s = (1 - a) P h + a h0``; ``out = (1 - b) s + b s W`` (initial residual + identity map).

    ``P`` is the symmetric normalised adjacency with self loops (operand norm ``gcn``).
    """

    def __init__(self, channels: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.lin = nn.Linear(channels, channels, bias=False)

    def forward(self, h: Tensor, h0: Tensor, op: Any) -> Tensor:
        support = (1 - self.alpha) * (op.neighbors(h) + op.self_weight * op.dst(h))
        support = support + self.alpha * op.dst(h0)
        return (1 - self.beta) * support + self.beta * self.lin(support)


@MODELS.register("gcnii")
class GCNII(GNN):
    """Input linear map, ``num_layers`` :class:`GCNIILayer` s (ReLU), output linear map.

    Layer ``l`` uses ``beta_l = log(theta / l + 1)``.
    """

    arch = "gcnii"
    norm = "gcn"

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        num_layers: int,
        dropout: float = 0.6,
        alpha: float = 0.1,
        theta: float = 0.5,
    ) -> None:
        super().__init__(in_channels, hidden, out_channels, num_layers, dropout)
        self.alpha, self.theta = alpha, theta
        self.lin_in = nn.Linear(in_channels, hidden)
        self.layers = nn.ModuleList(
            GCNIILayer(hidden, alpha, math.log(theta / (i + 1) + 1)) for i in range(num_layers)
        )
        self.lin_out = nn.Linear(hidden, out_channels)

    def extra_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "theta": self.theta}

    @property
    def layer_dims(self) -> list[int]:
        return [self.hidden] * self.num_layers

    def forward(self, x: Tensor, graph: Any) -> tuple[Tensor, list[Tensor]]:
        h0 = F.relu(self.lin_in(F.dropout(x, self.dropout, self.training)))
        hiddens, h = [], h0
        for layer, op in zip(self.layers, self.operands(graph), strict=True):
            h = F.relu(layer(F.dropout(h, self.dropout, self.training), h0, op))
            h0 = op.dst(h0)
            hiddens.append(h)
        logits = self.lin_out(F.dropout(h, self.dropout, self.training))
        return logits, hiddens
