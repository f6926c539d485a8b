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


class Gated:
    """Fake model: records each call (ids, thread) and holds the first ``hold`` calls.

    ``started`` is set when a call begins; held calls wait for ``gate``. Integer ids
    ``>= limit`` raise ``ValueError``.
    """

    def __init__(self, fn=lambda ids: ids * 10, hold: int = 1, limit: int | None = 100) -> None:
        self.fn, self.hold, self.limit = fn, hold, limit
        self.calls: list[list[int]] = []
        self.threads: list[threading.Thread] = []
        self.started, self.gate = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.active = self.max_active = 0

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]

    def __call__(self, ids: np.ndarray):
        with self.lock:
            self.calls.append(ids.tolist())
            self.threads.append(threading.current_thread())
            held = len(self.calls) <= self.hold
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            if held:
                assert self.gate.wait(10), "the test never released the model"
            if self.limit is not None and (ids >= self.limit).any():
                raise ValueError(f"node id {int(ids.max())} is out of range")
            return self.fn(ids)
        finally:
            with self.lock:
                self.active -= 1


def _check(pred, direct) -> None:
    np.testing.assert_array_equal(pred.classes, direct.classes)
    np.testing.assert_allclose(pred.scores, direct.scores, rtol=1e-5, atol=1e-6)


def test_many_threads_get_their_own_answers(predictor: Predictor) -> None:
    rec = Recorder(predictor.predict, delay_s=0.001)
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 500, size=rng.integers(1, 24)) for _ in range(1200)]
    with MicroBatcher(rec, max_batch=64, max_wait_ms=2) as batcher, ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(batcher.predict, requests))
    for ids, got in zip(requests, answers, strict=True):
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
    for ids, got in zip(requests, answers, strict=True):
        _check(got, predictor.predict(ids))
    assert len(rec.sizes) < len(requests)


def test_failing_request_does_not_lose_others(predictor: Predictor) -> None:
    model = Gated(predictor.predict, limit=None)
    with MicroBatcher(model, max_batch=64, max_wait_ms=1000) as batcher:
        first = batcher.submit([0])
        assert model.started.wait(10)  # the model is busy: the next four share one run
        good1 = batcher.submit(np.array([1, 2, 3]))
        bad = batcher.submit(np.array([4, 999]))  # 999 is out of range
        floats = batcher.submit(np.array([0.5]))  # poisons np.concatenate's dtype
        good2 = batcher.submit([5])
        model.gate.set()
        _check(first.result(5), predictor.predict([0]))
        _check(good1.result(5), predictor.predict([1, 2, 3]))
        _check(good2.result(5), predictor.predict([5]))
        with pytest.raises(InvalidNodeIds, match="999"):
            bad.result(5)
        with pytest.raises(InvalidNodeIds, match="integer"):
            floats.result(5)
    assert model.sizes[:2] == [1, 7], "the four requests should have shared one run first"
    assert model.sizes[2:] == [3, 2, 1, 1], "then each one ran alone"


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
    model = Gated(lambda ids: ids)
    b = MicroBatcher(model, max_batch=100, max_wait_ms=30_000)
    first = b.submit([0])
    assert model.started.wait(10)
    keep, drop = b.submit([1]), b.submit([2, 3])
    assert drop.cancel()
    model.gate.set()
    b.close()
    assert first.result(0).tolist() == [0] and keep.result(0).tolist() == [1]
    assert model.sizes == [1, 1]


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


# ---------------------------------------------------------------- never delaying an idle model


@pytest.mark.parametrize("how", ["submit", "predict", "apredict"])
def test_lone_request_runs_at_once(how: str) -> None:
    """An idle batcher starts the model at once, far sooner than a 5 s ``max_wait_ms``."""
    model = Gated(hold=0)
    with MicroBatcher(model, max_batch=64, max_wait_ms=5000) as b:
        start = time.monotonic()
        if how == "submit":
            got = b.submit([3, 4]).result(10)
        elif how == "predict":
            got = b.predict([3, 4], timeout=10)
        else:
            got = asyncio.run(b.apredict([3, 4]))
        elapsed = time.monotonic() - start
    assert got.tolist() == [30, 40]
    assert model.sizes == [2]
    assert elapsed < 2.5, f"a lone request waited {elapsed:.2f} s on an idle model"


def test_lone_request_skips_the_thread_hop() -> None:
    """On a free model a lone request runs in its caller's thread (no hand-off)."""
    model = Gated(hold=0)

    async def main(b: MicroBatcher) -> None:
        await b.apredict([1])

    with MicroBatcher(model, max_batch=8, max_wait_ms=5000) as b:
        b.predict([1], timeout=10)
        asyncio.run(main(b))
        b.submit([1]).result(10)
    me = threading.current_thread()
    assert model.threads[0] is me and model.threads[1] is me
    assert model.threads[2] is not me  # submit() hands over to the worker


def test_requests_arriving_during_a_run_share_the_next() -> None:
    model = Gated()
    with MicroBatcher(model, max_batch=64, max_wait_ms=5000) as b:
        first = b.submit([0])
        assert model.started.wait(10)
        futs = [b.submit([i]) for i in range(1, 6)]
        assert b.queued == 5
        model.gate.set()
        assert [f.result(10).tolist() for f in [first, *futs]] == [[i * 10] for i in range(6)]
    assert model.calls == [[0], [1, 2, 3, 4, 5]]


def test_asyncio_requests_during_a_run_share_the_next() -> None:
    model = Gated()

    async def main(b: MicroBatcher) -> list:
        tasks = [asyncio.ensure_future(b.apredict([i, i])) for i in range(1, 5)]
        while b.queued < 4:
            await asyncio.sleep(0.001)
        model.gate.set()
        return [t.tolist() for t in await asyncio.gather(*tasks)]

    with MicroBatcher(model, max_batch=64, max_wait_ms=5000) as b:
        first = b.submit([0])
        assert model.started.wait(10)
        answers = asyncio.run(main(b))
        assert first.result(10).tolist() == [0]
    assert answers == [[i * 10, i * 10] for i in range(1, 5)]
    assert model.sizes == [1, 8]


def test_max_batch_is_never_exceeded_and_order_kept() -> None:
    model = Gated()
    sizes = [5, 4, 3, 6, 2]
    with MicroBatcher(model, max_batch=8, max_wait_ms=5000) as b:
        first = b.submit([99])
        assert model.started.wait(10)
        futs = [b.submit(np.full(n, n)) for n in sizes]
        model.gate.set()
        assert [f.result(10).tolist() for f in futs] == [[n * 10] * n for n in sizes]
        assert first.result(10).tolist() == [990]
    # oldest first; a request that does not fit waits for the next run
    assert model.calls == [[99], [5] * 5, [4] * 4 + [3] * 3, [6] * 6 + [2] * 2]


def test_max_batch_under_load_from_threads_and_asyncio() -> None:
    model = Gated(hold=0)
    rng = np.random.default_rng(2)
    requests = [rng.integers(0, 100, size=rng.integers(1, 9)) for _ in range(600)]

    async def main(b: MicroBatcher, part: list) -> list:
        return await asyncio.gather(*(b.apredict(r) for r in part))

    with MicroBatcher(model, max_batch=16, max_wait_ms=2) as b, ThreadPoolExecutor(16) as pool:
        from_async = pool.submit(asyncio.run, main(b, requests[:300]))
        from_threads = list(pool.map(b.predict, requests[300:]))
        answers = from_async.result(60) + from_threads
    for ids, got in zip(requests, answers, strict=True):
        assert got.tolist() == (ids * 10).tolist()
    assert max(model.sizes) <= 16 and sum(model.sizes) == sum(r.size for r in requests)
    assert model.max_active == 1, "two model runs overlapped"
    assert len(model.sizes) < len(requests), "nothing was batched"


def test_errors_are_isolated_in_a_gathered_run() -> None:
    model = Gated()
    with MicroBatcher(model, max_batch=64, max_wait_ms=5000) as b:
        first = b.submit([1])
        assert model.started.wait(10)
        good1, bad, good2 = b.submit([2]), b.submit([3, 500]), b.submit([4])
        model.gate.set()
        assert first.result(10).tolist() == [10]
        assert good1.result(10).tolist() == [20] and good2.result(10).tolist() == [40]
        with pytest.raises(ValueError, match="500 is out of range"):
            bad.result(10)
    assert model.sizes == [1, 4, 1, 2, 1]


def test_failing_lone_request_frees_the_model() -> None:
    """A lone request that fails in its caller's thread leaves the batcher working."""
    model = Gated(hold=0)

    async def main(b: MicroBatcher) -> list:
        with pytest.raises(ValueError, match="out of range"):
            await b.apredict([100])
        return (await b.apredict([7])).tolist()

    with MicroBatcher(model, max_batch=8, max_wait_ms=5000) as b:
        with pytest.raises(ValueError, match="out of range"):
            b.predict([200], timeout=10)
        assert asyncio.run(main(b)) == [70]
        assert b.predict([8], timeout=10).tolist() == [80]
        assert b.submit([9]).result(10).tolist() == [90]


def test_cancelled_asyncio_request_is_skipped() -> None:
    model = Gated()

    async def main(b: MicroBatcher) -> list:
        drop = asyncio.ensure_future(b.apredict([2]))
        keep = asyncio.ensure_future(b.apredict([3]))
        while b.queued < 2:
            await asyncio.sleep(0.001)
        drop.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        return (await keep).tolist()

    with MicroBatcher(model, max_batch=8, max_wait_ms=5000) as b:
        first = b.submit([1])
        assert model.started.wait(10)
        assert asyncio.run(main(b)) == [30]
        assert first.result(10).tolist() == [10]
    assert model.calls == [[1], [3]]


def test_min_batch_waits_at_most_max_wait() -> None:
    """``max_wait_ms`` bounds the wait for ``min_batch`` ids; reaching it or close() ends it."""
    model = Gated(hold=0)
    b = MicroBatcher(model, max_batch=8, max_wait_ms=30_000, min_batch=4)
    futs = [b.submit([i]) for i in range(3)]
    time.sleep(0.2)
    assert model.calls == [] and b.queued == 3  # waiting for a fourth id
    futs.append(b.submit([3]))
    assert [f.result(10).tolist() for f in futs] == [[0], [10], [20], [30]]
    assert model.calls == [[0, 1, 2, 3]]
    late = b.submit([5])
    start = time.monotonic()
    b.close()
    assert time.monotonic() - start < 5 and late.result(0).tolist() == [50]
    quick = MicroBatcher(model, max_batch=8, max_wait_ms=50, min_batch=4)
    with quick:
        assert quick.predict([6], timeout=10).tolist() == [60]  # after 50 ms, alone
    with pytest.raises(ConfigError, match="min_batch"):
        MicroBatcher(model, max_batch=8, max_wait_ms=0, min_batch=9)


def test_worker_death_answers_everyone() -> None:
    """A run that raises BaseException stops the batcher; nobody is left waiting."""

    def fatal(ids: np.ndarray) -> np.ndarray:
        raise SystemExit("model crashed")

    model = Gated(fatal)
    b = MicroBatcher(model, max_batch=1, max_wait_ms=0)
    first = b.submit([1])
    assert model.started.wait(10)
    queued = [b.submit([i]) for i in range(2, 5)]
    model.gate.set()
    for fut in [first, *queued]:
        with pytest.raises(Unavailable, match="model crashed|worker died"):
            fut.result(10)
    assert b.closed
    with pytest.raises(Unavailable, match="shut down"):
        b.submit([5])
    b.close(timeout=10)


def test_inline_request_on_an_idle_model_runs_before_the_caller_yields() -> None:
    model = Gated(hold=0)
    ran_between: list[bool] = []

    async def main(b: MicroBatcher) -> list:
        loop = asyncio.get_running_loop()
        flag = []
        loop.call_soon(flag.append, True)  # runs at the first loop iteration
        got = await b.apredict([4])
        ran_between.append(bool(flag))
        return got.tolist()

    with MicroBatcher(model, max_batch=64, max_wait_ms=5000, inline_ids=8) as b:
        assert asyncio.run(main(b)) == [40]
    assert ran_between == [False], "the run should not have waited for a loop iteration"
    assert model.threads == [threading.main_thread()]


def test_inline_requests_arriving_faster_than_runs_are_gathered() -> None:
    def slow(ids: np.ndarray) -> np.ndarray:
        time.sleep(0.05)  # the last run took 50 ms: requests now come faster than that
        return ids * 10

    model = Gated(slow, hold=0)

    async def main(b: MicroBatcher) -> list:
        first = await b.apredict([1])  # idle model: runs at once
        rest = await asyncio.gather(*(b.apredict([i]) for i in range(2, 6)))
        big = await b.apredict(list(range(9)))  # above inline_ids: never inline
        return [first.tolist(), *[r.tolist() for r in rest], big.tolist()]

    with MicroBatcher(model, max_batch=64, max_wait_ms=5000, inline_ids=8) as b:
        answers = asyncio.run(main(b))
    assert answers == [[10], [20], [30], [40], [50], [i * 10 for i in range(9)]]
    assert model.sizes == [1, 4, 9], "the four quick followers should share one run"


def test_a_request_with_others_on_their_way_never_runs_on_the_loop() -> None:
    model = Gated(hold=0)

    async def main(b: MicroBatcher) -> list:
        return (await b.apredict([3], alone=False)).tolist()

    with MicroBatcher(model, max_batch=64, max_wait_ms=5000, inline_ids=8) as b:
        assert asyncio.run(main(b)) == [30]
        assert asyncio.run(main(b)) == [30]  # the lone-request flush refuses it too
    assert model.sizes == [1, 1]
    assert threading.main_thread() not in model.threads, "it should run on the worker"


def test_the_next_worker_run_waits_until_the_loop_took_the_answers() -> None:
    """After a run for event-loop callers the worker holds back what queued meanwhile until
    that loop has settled the answers (and read what came with them), up to max_wait."""
    seen_done: list[bool] = []
    first: list[asyncio.Future] = []

    def fn(ids: np.ndarray) -> np.ndarray:
        if first and int(ids[0]) == 2:
            seen_done.append(first[0].done())
        return ids * 10

    model = Gated(fn, hold=1)

    async def main(b: MicroBatcher) -> list:
        one = asyncio.ensure_future(b.apredict([1], alone=False))
        await asyncio.to_thread(model.started.wait, 10)
        first.append(one)
        two = asyncio.ensure_future(b.apredict([2], alone=False))  # queued behind the run
        await asyncio.sleep(0)
        model.gate.set()
        return [(await one).tolist(), (await two).tolist()]

    with MicroBatcher(model, max_batch=64, max_wait_ms=5000, inline_ids=8) as b:
        assert asyncio.run(main(b)) == [[10], [20]]
    assert seen_done == [True], "the second run started before the loop had the first answer"
