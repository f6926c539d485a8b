"""MicroBatcher: grouping, splitting back, failure isolation, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import BatchTooLarge, InvalidNodeIds, MicroBatcher, Predictor, Unavailable


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=256)


class Recorder:
    """Wraps a predict function and records the size of every call."""

    def __init__(self, fn, delay_s: float = 0.0) -> None:
        self.fn, self.delay_s = fn, delay_s
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, ids: np.ndarray):
        with self.lock:
            self.sizes.append(int(ids.size))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.fn(ids)


def _check(pred, direct) -> None:
    np.testing.assert_array_equal(pred.classes, direct.classes)
    np.testing.assert_allclose(pred.scores, direct.scores, rtol=1e-5, atol=1e-6)


def test_many_threads_get_their_own_answers(predictor: Predictor) -> None:
    rec = Recorder(predictor.predict, delay_s=0.001)
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 500, size=rng.integers(1, 24)) for _ in range(1200)]
    with MicroBatcher(rec, max_batch=64, max_wait_ms=2) as batcher, ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(batcher.predict, requests))
    for ids, got in zip(requests, answers):
        assert len(got) == ids.size
        _check(got, predictor.predict(ids))
    assert sum(rec.sizes) == sum(r.size for r in requests)
    assert max(rec.sizes) <= 64
    assert len(rec.sizes) < len(requests) / 2, "requests were not grouped"


def test_asyncio_callers(predictor: Predictor) -> None:
    rng = np.random.default_rng(1)
    requests = [rng.integers(0, 500, size=rng.integers(1, 10)) for _ in range(300)]

    async def main(batcher: MicroBatcher) -> list:
        return await asyncio.gather(*(batcher.apredict(r) for r in requests))

    rec = Recorder(predictor.predict)
    with MicroBatcher(rec, max_batch=128, max_wait_ms=5) as batcher:
        answers = asyncio.run(main(batcher))
    for ids, got in zip(requests, answers):
        _check(got, predictor.predict(ids))
    assert len(rec.sizes) < len(requests)


def test_failing_request_does_not_lose_others(predictor: Predictor) -> None:
    rec = Recorder(predictor.predict)
    with MicroBatcher(rec, max_batch=64, max_wait_ms=1000) as batcher:
        good1 = batcher.submit(np.array([1, 2, 3]))
        bad = batcher.submit(np.array([4, 999]))  # 999 is out of range
        floats = batcher.submit(np.array([0.5]))  # poisons np.concatenate's dtype
        good2 = batcher.submit([5])
        _check(good1.result(5), predictor.predict([1, 2, 3]))
        _check(good2.result(5), predictor.predict([5]))
        with pytest.raises(InvalidNodeIds, match="999"):
            bad.result(5)
        with pytest.raises(InvalidNodeIds, match="integer"):
            floats.result(5)
    assert rec.sizes[0] == 7, "the four requests should have shared one run first"


def test_wrong_row_count_is_an_error() -> None:
    b = MicroBatcher(lambda ids: np.zeros(ids.size + 1), max_batch=8, max_wait_ms=0)
    with b, pytest.raises(RuntimeError, match="returned 3 rows for 2 ids"):
        b.predict([1, 2], timeout=5)


def test_submit_validation() -> None:
    with MicroBatcher(lambda ids: ids, max_batch=4, max_wait_ms=0) as b:
        with pytest.raises(BatchTooLarge, match="request has 5 node ids; at most 4"):
            b.submit([1, 2, 3, 4, 5])
        with pytest.raises(InvalidNodeIds, match="empty"):
            b.submit([])
        with pytest.raises(InvalidNodeIds, match="1-D"):
            b.submit([[1]])
        assert b.predict([1, 2, 3, 4], timeout=5).tolist() == [1, 2, 3, 4]
    with pytest.raises(ConfigError):
        MicroBatcher(lambda ids: ids, max_batch=0, max_wait_ms=0)


def test_full_batch_does_not_wait() -> None:
    with MicroBatcher(lambda ids: ids * 2, max_batch=4, max_wait_ms=30_000) as b:
        start = time.monotonic()
        futs = [b.submit([i]) for i in range(4)]
        assert [f.result(10).tolist() for f in futs] == [[0], [2], [4], [6]]
        assert time.monotonic() - start < 5


def test_close_drains_and_refuses() -> None:
    rec = Recorder(lambda ids: ids + 1)
    b = MicroBatcher(rec, max_batch=1000, max_wait_ms=30_000)
    futs = [b.submit([i, i]) for i in range(20)]
    start = time.monotonic()
    b.close()
    assert time.monotonic() - start < 5, "close() must not wait out max_wait_ms"
    assert [f.result(0).tolist() for f in futs] == [[i + 1, i + 1] for i in range(20)]
    with pytest.raises(Unavailable, match="shut down"):
        b.submit([1])


def test_cancelled_request_is_skipped() -> None:
    rec = Recorder(lambda ids: ids)
    b = MicroBatcher(rec, max_batch=100, max_wait_ms=30_000)
    keep, drop = b.submit([1]), b.submit([2, 3])
    assert drop.cancel()
    b.close()
    assert keep.result(0).tolist() == [1] and rec.sizes == [1]


def test_queue_limit() -> None:
    busy, gate = threading.Event(), threading.Event()

    def blocked(ids: np.ndarray) -> np.ndarray:
        busy.set()
        gate.wait(10)
        return ids

    b = MicroBatcher(blocked, max_batch=1, max_wait_ms=0, max_queue=2)
    first = b.submit([0])
    assert busy.wait(10)  # the worker is now blocked on `first`
    b.submit([1])
    b.submit([2])
    with pytest.raises(Unavailable, match="queued"):
        b.submit([3])
    gate.set()
    b.close()
    assert first.result(0).tolist() == [0]
