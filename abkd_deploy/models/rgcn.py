"""R-GCN (Schlichtkrull et al., 2018) as in OGB's / G-CRD's ogbn-mag code, on typed operands.

For a node ``v`` of type ``t``: ``h'_v = W_root^t h_v + b^t + sum_r mean_{u in N_r(v)} W_r h_u``
with a bias-free map per relation (reverse relations included) and a root map with bias
per node type. See :mod:`abkd_deploy.models.typed` for inputs, operands and outputs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from abkd_deploy.data.typed_graph import Relation
from abkd_deploy.models.base import MODELS
from abkd_deploy.models.typed import TypedGNN, apply_before_gather, key


class RGCNLayer(nn.Module):
    """One R-GCN layer over a :class:`~abkd_deploy.data.typed_blocks.TypedBlock`.

    Args:
        in_dims: Input width per node type.
        relations: ``(head, rel, tail)`` triples.
        out_channels: Output width (every node type).
    """

    def __init__(self, in_dims: dict[str, int], relations: list[Relation], out_channels: int):
        super().__init__()
        self.root = nn.ModuleDict({t: nn.Linear(d, out_channels) for t, d in in_dims.items()})
        self.rel = nn.ModuleDict(
            {key(r): nn.Linear(in_dims[r[0]], out_channels, bias=False) for r in relations}
        )

    def forward(self, h: dict[str, Tensor], block: Any, dst_types: list[str]) -> dict[str, Tensor]:
        """``h[t]``: [n_src_t, F_t] -> ``{t: [num_dst[t], out]}`` for ``t`` in ``dst_types``."""
        out = {t: self.root[t](h[t][: block.num_dst[t]]) for t in dst_types}
        for rel, op in block.rel_ops.items():
            if rel[2] in out and rel[0] in h:
                out[rel[2]] = out[rel[2]] + apply_before_gather(
                    op, h[rel[0]], self.rel[key(rel)].weight
                )
        return out


@MODELS.register("rgcn")
class RGCN(TypedGNN):
    """Stack of :class:`RGCNLayer` with ReLU and dropout; the last layer gives logits."""

    arch = "rgcn"
    norm = "mean"

    def build_layer(self, index: int, in_dims: dict[str, int], out_channels: int) -> nn.Module:
        return RGCNLayer(in_dims, self.relations, out_channels)
