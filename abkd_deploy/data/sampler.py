"""Vectorised fixed-fanout neighbour sampling for mini-batch training.

PyG's ``NeighborLoader`` needs ``pyg-lib`` or ``torch-sparse``, which cannot be
installed everywhere; this sampler needs neither. Each layer ``l`` has a seeded
:class:`~abkd_deploy.data.ell.FanoutTable` (re-drawn per epoch with :meth:`resample`);
a batch of target nodes becomes ``L`` :class:`~abkd_deploy.data.ell.EllBlock` s whose
destination rows are a prefix of their source rows, as in DGL's message-flow graphs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, FanoutTable, sample_fanout_table


@dataclass
class SampledBatch:
    """One mini-batch.

    Attributes:
        n_id: [n_0] global ids of the input rows; the first ``batch_size`` are the targets.
        blocks: One operand per layer (layer 1 first).
        batch_size: Number of target nodes.
    """

    n_id: Tensor
    blocks: list[EllBlock]
    batch_size: int

    def target_edges(self) -> Tensor:
        """[2, E'] edges between target nodes (local ids), from the last layer's table."""
        last = self.blocks[-1]
        dst = torch.arange(last.num_dst).unsqueeze(1).expand_as(last.nbr)
        keep = (last.nbr < self.batch_size) & (last.weight > 0) & (last.nbr != dst)
        return torch.stack([last.nbr[keep], dst[keep]])


class NeighborSampler:
    """Samples L-hop fixed-fanout blocks around target nodes.

    Args:
        csr: In-neighbour lists of the full graph.
        fanouts: Neighbours kept per node for layer 1..L.
        norm: Aggregation normalisation of the model (see :mod:`abkd_deploy.data.csr`).
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        tables: Tables drawn elsewhere to use instead of drawing epoch 0's (``refresh``
            re-draws only some rows); ``fanouts`` must be their widths.
    """

    def __init__(
        self,
        csr: CSR,
        fanouts: Sequence[int],
        norm: str,
        seed: int = 0,
        tables: Sequence[FanoutTable] | None = None,
    ) -> None:
        self.csr, self.fanouts, self.norm, self.seed = csr, list(fanouts), norm, seed
        self._loc = torch.full((csr.num_nodes,), -1, dtype=torch.long)
        if tables is None:
            self.resample(0)
        else:
            if [t.fanout for t in tables] != self.fanouts:
                raise ValueError(f"tables of widths {[t.fanout for t in tables]} for {fanouts}")
            self.tables = list(tables)
            self._weights = None  # computed by the first sample()

    def layer_seed(self, layer: int, epoch: int = 0) -> int:
        """Seed of layer ``layer``'s table (0-based) in epoch ``epoch``."""
        return int(self.seed) + 7919 * int(epoch) + int(layer)

    def resample(self, epoch: int) -> None:
        """Re-draws the per-layer fanout tables (deterministic in ``seed + epoch``)."""
        self.tables: list[FanoutTable] = [
            sample_fanout_table(self.csr, k, seed=self.layer_seed(layer, epoch))
            for layer, k in enumerate(self.fanouts)
        ]
        self._weights: list[tuple[Tensor, Tensor | None]] | None = [
            t.weights(self.norm) for t in self.tables
        ]

    def sample(self, targets: Tensor) -> SampledBatch:
        """Blocks for ``targets`` ([B] unique global ids)."""
        nodes = targets.to(torch.long)
        blocks: list[EllBlock] = []
        loc = self._loc
        if self._weights is None:
            self._weights = [t.weights(self.norm) for t in self.tables]
        for layer in reversed(range(len(self.fanouts))):
            nb = self.tables[layer].nbr[nodes]  # [n, K] global
            loc[nodes] = torch.arange(nodes.numel())
            new = torch.unique(nb[loc[nb] < 0])
            loc[new] = torch.arange(nodes.numel(), nodes.numel() + new.numel())
            w, sw = self._weights[layer]
            blocks.append(EllBlock(loc[nb], w[nodes], None if sw is None else sw[nodes]))
            nodes = torch.cat([nodes, new])
            loc[nodes] = -1
        return SampledBatch(n_id=nodes, blocks=blocks[::-1], batch_size=targets.numel())

    def batches(
        self, nodes: Tensor, batch_size: int, shuffle: bool = True, generator=None
    ) -> Iterator[SampledBatch]:
        """Iterates over ``nodes`` in batches of ``batch_size`` targets."""
        order = torch.randperm(nodes.numel(), generator=generator) if shuffle else None
        nodes = nodes[order] if order is not None else nodes
        for start in range(0, nodes.numel(), batch_size):
            yield self.sample(nodes[start : start + batch_size])
