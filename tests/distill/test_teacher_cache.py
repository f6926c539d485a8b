"""Sharded, memory-mapped teacher outputs and the ranks' seed-node shards (no processes)."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Data

from abkd_deploy.distill.distributed import seed_shard
from abkd_deploy.distill.teacher_cache import ShardedTeacherCache


def test_cache_returns_the_shard_rows_it_stored(tmp_path):
    gen = torch.Generator().manual_seed(0)
    logits, hidden = torch.randn(50, 3, generator=gen), torch.randn(50, 7, generator=gen)
    shard = torch.tensor([2, 5, 11, 40, 49])
    cache = ShardedTeacherCache.write(tmp_path / "t.f32", shard, logits, [hidden], chunk=2)
    assert cache.nbytes == 5 * (3 + 7) * 4 == (tmp_path / "t.f32").stat().st_size
    ids = torch.tensor([49, 2, 11])
    t_logits, (t_hidden,) = cache.rows(ids, torch.device("cpu"))
    assert torch.equal(t_logits, logits[ids]) and torch.equal(t_hidden, hidden[ids])
    with pytest.raises(RuntimeError, match="outside this rank's shard"):
        cache.rows(torch.tensor([3]), torch.device("cpu"))
    cache.close()
    assert not (tmp_path / "t.f32").exists()


def test_seed_shards_partition_the_nodes_and_depend_on_the_seed_only():
    train = torch.zeros(101, dtype=torch.bool)
    train[::3] = True
    data = Data(y=torch.zeros(101, dtype=torch.long), train_mask=train)
    for method, expected in (("kd", torch.arange(101)), ("ce", torch.arange(101)[train])):
        shards = [seed_shard(data, method, 7, r, 3) for r in range(3)]
        assert max(s.numel() for s in shards) - min(s.numel() for s in shards) <= 1
        assert torch.equal(torch.cat(shards).sort().values, expected)
    assert torch.equal(seed_shard(data, "kd", 7, 1, 3), seed_shard(data, "kd", 7, 1, 3))
    assert not torch.equal(seed_shard(data, "kd", 7, 1, 3), seed_shard(data, "kd", 8, 1, 3))
