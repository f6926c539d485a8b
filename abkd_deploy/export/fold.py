"""Fold a student's first per-node linear map into the stored feature table.

Every student architecture starts by applying a row-wise map to the input features
(``gcn``/``gat``: ``lin``; ``sage``: ``lin_l`` and ``lin_r``; ``gcnii``: ``lin_in``;
``mlp``: the first ``Linear``). For the ``embedded`` form the features are constants, so
that map is applied once to all N nodes at export time: the artifact stores the mapped
rows (``[N, hidden]``) instead of ``[N, F]`` and a request only gathers narrow rows
("linear before gather", with no per-request matmul on the receptive field at all).
``sage`` gets two tables: ``x W_l^T`` (gathered for neighbours) and ``x W_r^T`` (gathered
for the destination rows only, through the operand's ``dst``, see
:class:`~abkd_deploy.export.modules.TableBlock`). Outputs equal the student's up to float
rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.models.base import GNN


class FoldedSAGELayer(nn.Module):
    """First SAGE layer on folded rows: ``h = x W_l^T``; ``op.dst`` yields ``x W_r^T`` rows.

    Only valid with an operand whose ``dst`` reads the ``x W_r^T`` table
    (:class:`~abkd_deploy.export.modules.TableBlock` with ``dst_table``).
    """

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, h: Tensor, op: Any) -> Tensor:
        return op.neighbors(h) + self.bias + op.dst(h)


class RowSelect(nn.Module):
    """Replaces a folded first ``mlp`` layer: keeps only the operand's row selection."""

    def forward(self, h: Tensor, op: Any = None) -> Tensor:
        return h if op is None else op.dst(h)


@dataclass
class Folded:
    """A student with its first per-node map removed, and the mapped tables.

    Attributes:
        model: Copy of the student whose first layer reads the mapped rows.
        features: [N, F'] rows every layer-1 source reads.
        dst_features: [N, F'] rows for layer-1 destinations (``sage`` only), else None.
    """

    model: GNN
    features: Tensor
    dst_features: Tensor | None = None


def _gcn_gat(model: GNN, x: Tensor) -> tuple[Tensor, None]:
    return model.layers[0].lin(x), None


def _gcn_gat_strip(model: GNN) -> None:
    model.layers[0].lin = nn.Identity()


def _sage(model: GNN, x: Tensor) -> tuple[Tensor, Tensor]:
    layer = model.layers[0]
    return x @ layer.lin_l.weight.t(), layer.lin_r(x)


def _sage_strip(model: GNN) -> None:
    model.layers[0] = FoldedSAGELayer(model.layers[0].lin_l.bias)


def _gcnii(model: GNN, x: Tensor) -> tuple[Tensor, None]:
    return model.lin_in(x), None


def _gcnii_strip(model: GNN) -> None:
    model.lin_in = nn.Identity()


def _mlp(model: GNN, x: Tensor) -> tuple[Tensor, None]:
    return model.layers[0](x), None


def _mlp_strip(model: GNN) -> None:
    model.layers[0] = RowSelect()


Rows = Callable[[GNN, Tensor], tuple[Tensor, Tensor | None]]

#: arch -> (row-wise input map(s), function removing the map from a model copy).
FOLDERS: dict[str, tuple[Rows, Callable[[GNN], None]]] = {
    "gcn": (_gcn_gat, _gcn_gat_strip),
    "gat": (_gcn_gat, _gcn_gat_strip),
    "sage": (_sage, _sage_strip),
    "gcnii": (_gcnii, _gcnii_strip),
    "mlp": (_mlp, _mlp_strip),
}


@torch.no_grad()
def fold_input_transform(student: GNN, x: Tensor, chunk: int = 1 << 16) -> Folded | None:
    """Folds the first per-node map of ``student`` into tables computed from ``x``.

    Args:
        student: Trained student in eval mode (not modified; a copy is folded).
        x: [N, F] node features.
        chunk: Rows per matmul (bounds the temporary memory on large graphs).

    Returns:
        The folded model and tables, or ``None`` for an architecture without a folder.
    """
    if student.arch not in FOLDERS:
        return None
    rows, strip = FOLDERS[student.arch]
    parts = [rows(student, x[i : i + chunk]) for i in range(0, x.size(0), chunk)]
    features = torch.cat([p[0] for p in parts]).contiguous()
    dst = None if parts[0][1] is None else torch.cat([p[1] for p in parts]).contiguous()
    model = copy.deepcopy(student).eval()
    strip(model)
    return Folded(model, features, dst)
