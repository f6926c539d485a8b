"""Vectorised fixed-fanout neighbour sampling over typed graphs (one table per relation).

The typed counterpart of :mod:`abkd_deploy.data.sampler`: every layer ``l`` and relation
``r`` has a seeded :class:`~abkd_deploy.data.ell.FanoutTable` (re-drawn per epoch with
:meth:`TypedNeighborSampler.resample`). A batch of target nodes becomes ``L``
:class:`~abkd_deploy.data.typed_blocks.TypedBlock` s of ``EllBlock`` relation operands;
each type's destination rows are a prefix of its source rows, and the batch's targets are
the first ``batch_size`` rows of the target type at every layer. No Python loop runs over
nodes: only over layers, relations and node types.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abkd_deploy.data.ell import EllBlock, FanoutTable, parse_fanout
from abkd_deploy.data.typed_blocks import (
    TypedBlock,
    check_typed_norm,
    relation_csr,
    relation_fanout_table,
    relation_weights,
)
from abkd_deploy.data.typed_graph import Relation, TypedGraph
from abkd_deploy.errors import ConfigError


@dataclass
class TypedBatch:
    """One typed mini-batch.

    Attributes:
        n_id: Global ids of the input rows per node type; ``n_id[target][:batch_size]``
            are the batch's targets.
        blocks: One :class:`TypedBlock` per layer (layer 1 first).
        batch_size: Number of target nodes.
        target: The target node type.
    """

    n_id: dict[str, Tensor]
    blocks: list[TypedBlock]
    batch_size: int
    target: str

    def to(self, device: torch.device | str) -> TypedBatch:
        self.n_id = {t: v.to(device) for t, v in self.n_id.items()}
        for block in self.blocks:
            block.to(device)
        return self


class TypedNeighborSampler:
    """Samples L-hop fixed-fanout typed blocks around target nodes.

    Args:
        graph: The typed graph (reverse relations included).
        fanouts: Neighbours kept per node and relation for layer 1..L (an int or
            ``"max"`` each).
        norm: ``mean`` or ``sum``.
        seed: Base seed; epoch ``e`` uses ``seed + 7919 e``.
    """

    def __init__(
        self, graph: TypedGraph, fanouts: Sequence[int | str], norm: str = "mean", seed: int = 0
    ) -> None:
        if not fanouts:
            raise ConfigError("fanouts must name at least one layer")
        self.graph, self.norm, self.seed = graph, check_typed_norm(norm), int(seed)
        self.relations: list[Relation] = graph.relations
        self._csr = {
            r: relation_csr(graph.edge_index_dict[r], graph.num_nodes_dict[r[2]])
            for r in self.relations
        }
        self.fanouts = [
            {r: parse_fanout(k, self._csr[r].max_degree) for r in self.relations} for k in fanouts
        ]
        self._loc = {
            t: torch.full((n,), -1, dtype=torch.long) for t, n in graph.num_nodes_dict.items()
        }
        self.resample(0)

    @property
    def num_layers(self) -> int:
        return len(self.fanouts)

    def resample(self, epoch: int) -> None:
        """Re-draws every (layer, relation) table (deterministic in ``seed`` and ``epoch``)."""
        self.tables: list[dict[Relation, FanoutTable]] = []
        self._weights: list[dict[Relation, Tensor]] = []
        for layer, ks in enumerate(self.fanouts):
            tables = {
                r: relation_fanout_table(
                    self._csr[r], ks[r], seed=self.seed + 7919 * epoch + 101 * layer + i
                )
                for i, r in enumerate(self.relations)
            }
            self.tables.append(tables)
            self._weights.append({r: relation_weights(t, self.norm) for r, t in tables.items()})

    def sample(self, targets: Tensor) -> TypedBatch:
        """Blocks for ``targets`` ([B] unique global ids of the target type)."""
        target = self.graph.target
        nodes: dict[str, Tensor] = {target: targets.to(torch.long)}
        blocks: list[TypedBlock] = []
        for layer in reversed(range(self.num_layers)):
            rels = [r for r in self.relations if r[2] in nodes]
            gathered = {r: self.tables[layer][r].nbr[nodes[r[2]]] for r in rels}  # global ids
            block = TypedBlock(num_dst={t: int(v.numel()) for t, v in nodes.items()})
            src = dict(nodes)
            for head in sorted({r[0] for r in rels}):
                loc = self._loc[head]
                cur = nodes.get(head, torch.zeros(0, dtype=torch.long))
                loc[cur] = torch.arange(cur.numel())
                mine = [r for r in rels if r[0] == head]
                cand = torch.cat([gathered[r].reshape(-1) for r in mine])
                new = torch.unique(cand[loc[cand] < 0])
                loc[new] = torch.arange(cur.numel(), cur.numel() + new.numel())
                for r in mine:
                    w = self._weights[layer][r][nodes[r[2]]]
                    block.rel_ops[r] = EllBlock(loc[gathered[r]], w, None)
                src[head] = torch.cat([cur, new])
                loc[src[head]] = -1
            blocks.append(block)
            nodes = src
        return TypedBatch(
            n_id=nodes, blocks=blocks[::-1], batch_size=int(targets.numel()), target=target
        )

    def batches(
        self, nodes: Tensor, batch_size: int, shuffle: bool = True, generator=None
    ) -> Iterator[TypedBatch]:
        """Iterates over target ``nodes`` in batches of ``batch_size``."""
        if shuffle:
            nodes = nodes[torch.randperm(nodes.numel(), generator=generator)]
        for start in range(0, nodes.numel(), batch_size):
            yield self.sample(nodes[start : start + batch_size])
