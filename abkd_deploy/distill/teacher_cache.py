"""A frozen teacher's outputs, computed once per rank and stored memory-mapped by shard.

For distributed distillation (:mod:`abkd_deploy.distill.distributed`) each rank trains on
a fixed shard of the seed nodes, and the KD terms read the teacher's rows of the batch's
seed nodes only. So rank ``r`` keeps the teacher's logits and the per-layer
representations that the KD method needs for *its* shard, in shard order, in one float32
file ``teacher.rank<r>.f32`` (``[n_shard, C + sum d_l]``) read through ``np.memmap``: no
rank holds the whole table in its heap, and the pages are the OS's to evict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Methods whose terms read only the teacher's logits (no per-layer representations).
LOGITS_ONLY = frozenset({"ce", "kd"})


class ShardedTeacherCache:
    """The teacher rows of one rank's seed nodes, memory-mapped.

    Args:
        path: The rank's file (created by :meth:`write`).
        shard: ``[n]`` global ids of the rank's seed nodes, in file row order.
        num_rows: Number of target rows of the graph (for the id -> row lookup).
        widths: ``[C, d_1, ...]``: the logits' width then each stored hidden's width.
    """

    def __init__(self, path: Path, shard: Tensor, num_rows: int, widths: list[int]) -> None:
        self.path, self.widths = Path(path), list(widths)
        self.table = np.memmap(self.path, np.float32, "r", shape=(shard.numel(), sum(widths)))
        self.nbytes = int(self.table.nbytes)  #: bytes of the rank's table on disk
        self.row = torch.full((num_rows,), -1, dtype=torch.long)
        self.row[shard] = torch.arange(shard.numel())

    @classmethod
    def write(
        cls,
        path: Path,
        shard: Tensor,
        logits: Tensor,
        hiddens: list[Tensor],
        chunk: int = 65_536,
    ) -> ShardedTeacherCache:
        """Stores the ``shard`` rows of ``logits`` ``[N, C]`` and ``hiddens`` (each
        ``[N, d_l]``) into ``path`` and returns the cache reading it."""
        parts = [logits, *hiddens]
        widths = [int(p.size(1)) for p in parts]
        table = np.memmap(path, np.float32, "w+", shape=(shard.numel(), sum(widths)))
        for start in range(0, shard.numel(), chunk):
            rows = shard[start : start + chunk]
            block = torch.cat([p[rows].float().cpu() for p in parts], dim=1)
            table[start : start + rows.numel()] = block.numpy()
        table.flush()
        del table
        return cls(path, shard, logits.size(0), widths)

    def rows(self, ids: Tensor, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        """Teacher ``(logits [B, C], hiddens [[B, d_l], ...])`` of global ids ``ids`` (all
        in this rank's shard)."""
        local = self.row[ids.cpu()]
        if bool((local < 0).any()):
            raise RuntimeError("teacher cache asked for a node outside this rank's shard")
        block = torch.from_numpy(np.ascontiguousarray(self.table[local.numpy()])).to(device)
        parts = list(torch.split(block, self.widths, dim=1))
        return parts[0], parts[1:]

    def close(self) -> None:
        """Drops the mapping and removes the file."""
        mm = getattr(self.table, "_mmap", None)
        self.table = None
        if mm is not None:
            mm.close()
        self.path.unlink(missing_ok=True)
