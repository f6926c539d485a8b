"""Relational GraphSAGE: a mean-SAGE map per relation, summed over the relations into a type.

For a node ``v`` of type ``t``: ``h'_v = sum_{r = (s, ., t)} (W_l^r mean_{u in N_r(v)} h_u
+ b^r + W_r^r h_v)`` (PyG's ``HeteroConv({r: SAGEConv}, aggr="sum")``). Types without an
incoming relation output zeros. See :mod:`abkd_deploy.models.typed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.data.typed_graph import Relation
from abkd_deploy.models.base import MODELS
from abkd_deploy.models.typed import TypedGNN, apply_before_gather, key


class RSAGELayer(nn.Module):
    """One relational SAGE layer over a :class:`~abkd_deploy.data.typed_blocks.TypedBlock`."""

    def __init__(self, in_dims: dict[str, int], relations: list[Relation], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.lin_l = nn.ModuleDict(
            {key(r): nn.Linear(in_dims[r[0]], out_channels) for r in relations}
        )
        self.lin_r = nn.ModuleDict(
            {key(r): nn.Linear(in_dims[r[2]], out_channels, bias=False) for r in relations}
        )

    def forward(self, h: dict[str, Tensor], block: Any, dst_types: list[str]) -> dict[str, Tensor]:
        """``h[t]``: [n_src_t, F_t] -> ``{t: [num_dst[t], out]}`` for ``t`` in ``dst_types``."""
        ref = next(iter(h.values()))
        out = {
            t: torch.zeros(block.num_dst[t], self.out_channels, dtype=ref.dtype, device=ref.device)
            for t in dst_types
        }
        for rel, op in block.rel_ops.items():
            head, _, tail = rel
            if tail in out and head in h:
                lin_l, lin_r = self.lin_l[key(rel)], self.lin_r[key(rel)]
                agg = apply_before_gather(op, h[head], lin_l.weight) + lin_l.bias
                out[tail] = out[tail] + agg + lin_r(h[tail][: block.num_dst[tail]])
        return out


@MODELS.register("rsage")
class RSAGE(TypedGNN):
    """Stack of :class:`RSAGELayer` with ReLU and dropout; the last layer gives logits."""

    arch = "rsage"
    norm = "mean"

    def build_layer(self, index: int, in_dims: dict[str, int], out_channels: int) -> nn.Module:
        return RSAGELayer(in_dims, self.relations, out_channels)
