"""Base class of every teacher / student GNN and the model registry."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.errors import ConfigError
from abkd_deploy.registry import Registry

MODELS: Registry[type[GNN]] = Registry("architecture")


class GNN(nn.Module):
    """A GNN that returns logits and its per-layer node representations.

    Subclasses set :attr:`arch` (registry name) and :attr:`norm` (the aggregation
    normalisation they need from a graph operand, see :mod:`abkd_deploy.data.csr`).

    Args:
        in_channels: Input feature width F.
        hidden: Hidden width.
        out_channels: Number of classes C.
        num_layers: Number of message-passing (or linear, for ``mlp``) layers L >= 1.
        dropout: Dropout probability on each layer's input.
    """

    arch: ClassVar[str] = ""
    norm: ClassVar[str] = "none"
    #: False for teacher-only architectures, which ``export`` refuses as students.
    exportable: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        num_layers: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("hidden", hidden, 1),
            ("out_channels", out_channels, 2),
            ("num_layers", num_layers, 1),
        ):
            if int(value) < low:
                raise ConfigError(f"{self.arch}: {name}={value}; expected >= {low}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{self.arch}: dropout={dropout}; expected in [0, 1)")
        self.in_channels, self.hidden = int(in_channels), int(hidden)
        self.out_channels, self.num_layers = int(out_channels), int(num_layers)
        self.dropout = float(dropout)

    @property
    def config(self) -> dict[str, Any]:
        """Everything :func:`abkd_deploy.models.build_model` needs to rebuild the model."""
        return {
            "arch": self.arch,
            "in_channels": self.in_channels,
            "hidden": self.hidden,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            **self.extra_config(),
        }

    def extra_config(self) -> dict[str, Any]:
        return {}

    @property
    def layer_dims(self) -> list[int]:
        """Width of each entry of the ``hiddens`` list returned by :meth:`forward`."""
        return [self.hidden] * (self.num_layers - 1) + [self.out_channels]

    def operands(self, graph: Any) -> list[Any]:
        """One graph operand per layer: a single operand is reused by every layer."""
        if isinstance(graph, Sequence) and not isinstance(graph, str | bytes):
            if len(graph) != self.num_layers:
                raise ConfigError(
                    f"{self.arch} has {self.num_layers} layers but got {len(graph)} operands"
                )
            return list(graph)
        return [graph] * self.num_layers

    def forward(self, x: Tensor, graph: Any) -> tuple[Tensor, list[Tensor]]:
        """Runs the model.

        Args:
            x: [n_0, F] input rows (all nodes, or the sampled input nodes).
            graph: An operand for every layer, or a list of ``num_layers`` operands
                (sampled blocks, layer 1 first).

        Returns:
            ``(logits [n_L, C], hiddens)`` where ``hiddens[l]`` is layer ``l``'s output
            ([n_l, d_l], after the activation; the last one is the logits for
            ``gcn``/``sage``/``gat``/``mlp``).
        """
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (frozen ones included: a frozen teacher still has them)."""
    return sum(p.numel() for p in model.parameters())


class LayerStack(GNN):
    """A GNN made of ``num_layers`` layers ``layer(h, operand)`` with an activation between.

    Subclasses implement :meth:`build_layer`; ``hiddens`` are the layer outputs (after the
    activation; the last is the logits).
    """

    #: Activation between layers (``torch.nn.functional`` name).
    activation: ClassVar[str] = "relu"

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        num_layers: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(in_channels, hidden, out_channels, num_layers, dropout)
        dims = [in_channels] + [hidden] * (num_layers - 1) + [out_channels]
        self.layers = nn.ModuleList(
            self.build_layer(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(dims))
        )

    def build_layer(self, index: int, in_channels: int, out_channels: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor, graph: Any) -> tuple[Tensor, list[Tensor]]:
        act = getattr(F, self.activation)
        hiddens, h = [], x
        for i, (layer, op) in enumerate(zip(self.layers, self.operands(graph), strict=True)):
            h = layer(F.dropout(h, self.dropout, self.training), op)
            if i < self.num_layers - 1:
                h = act(h)
            hiddens.append(h)
        return h, hiddens
