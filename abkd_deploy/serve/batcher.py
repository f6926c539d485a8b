"""``MicroBatcher``: groups concurrent node-id requests into one model run, never delaying.

Scheduling (the way Triton's dynamic batcher treats a free model instance):

* **The model free:** a request runs at once, with whatever else is already waiting.
* **The model busy:** requests that arrive during a run wait for it and then share the next
  run (oldest first, up to ``max_batch`` ids), which starts the moment the model frees up.
* ``max_wait_ms`` is an upper bound, never a fixed delay: a run waits for more requests only
  while fewer than ``min_batch`` ids are queued (default 1: never), and at most
  ``max_wait_ms`` after its oldest request arrived (or until :meth:`MicroBatcher.close`).

One run at a time. Runs normally happen on one worker thread (onnxruntime releases the GIL,
so an asyncio loop keeps accepting meanwhile). A lone request on a free model skips that
hand-off, which costs a thread wake-up each way (~70-130 us round trip on a busy 2-core
machine, measured with ``benchmarks/batcher_latency.py``), and runs in its caller's thread:
:meth:`MicroBatcher.predict` runs it directly; :meth:`MicroBatcher.apredict` runs it in the
event loop one iteration later, so requests submitted in the same loop iteration are
gathered first; two or more go to the worker so that the loop keeps accepting.

Decisions:

* A single request with more than ``max_batch`` ids is **rejected** at
  :meth:`MicroBatcher.submit` with :class:`~abkd_deploy.serve.errors.BatchTooLarge`:
  ``max_batch`` bounds the memory and latency of every model run, and a request is never
  split across runs. The HTTP server's per-request limit is at most ``max_batch``.
* If a combined run raises, each of its requests is re-run alone, so only the request
  that causes the error receives it; the others get their answers.
* :meth:`MicroBatcher.close` stops accepting requests, runs every request already
  submitted (without waiting out ``max_wait_ms``), then stops the worker.
* A caller that cancels its future (or task) before its run starts is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import numpy as np

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve.errors import BatchTooLarge, InvalidNodeIds, Unavailable

R = TypeVar("R")
log = logging.getLogger(__name__)


_Outcome = tuple["_Request", Any, "BaseException | None"]  # (request, rows, error)


def _settle(outcomes: list[_Outcome]) -> None:
    """Sets the futures (in their loop's thread for asyncio ones); skips cancelled ones."""
    for req, result, error in outcomes:
        if req.future.done():  # cancelled by its caller meanwhile
            continue
        if error is None:
            req.future.set_result(result)
        else:
            req.future.set_exception(error)


def _deliver(
    outcomes: list[_Outcome],
    here: asyncio.AbstractEventLoop | None,
    then: Callable[[asyncio.AbstractEventLoop], None] | None = None,
) -> None:
    """Hands results over: directly, or with one call per other event loop (one wake-up),
    which calls ``then(loop)`` after settling them."""
    direct = [o for o in outcomes if o[0].loop is None or o[0].loop is here]
    _settle(direct)
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        loop = outcome[0].loop
        if loop is not None and loop is not here:
            by_loop.setdefault(loop, []).append(outcome)
    for loop, items in by_loop.items():
        # a closed loop raises RuntimeError: nobody is waiting for these answers
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_then, items, loop, then)


def _settle_then(
    outcomes: list[_Outcome],
    loop: asyncio.AbstractEventLoop,
    then: Callable[[asyncio.AbstractEventLoop], None] | None,
) -> None:
    _settle(outcomes)
    if then is not None:
        loop.call_soon(then, loop)  # after the callers' tasks have taken their answers


class _Request:
    """One caller's ids and the future for its rows; ``loop`` is set for asyncio callers."""

    __slots__ = ("alone", "arrived", "future", "ids", "loop")

    def __init__(
        self, ids: np.ndarray, loop: asyncio.AbstractEventLoop | None = None, alone: bool = True
    ) -> None:
        self.ids = ids
        self.loop = loop
        self.alone = alone  # may run in its caller's thread or loop when it finds the model free
        self.future: Any = Future() if loop is None else loop.create_future()
        self.arrived = time.monotonic()

    def claim(self) -> bool:
        """Marks the request running; ``False`` if its caller cancelled it."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()


class MicroBatcher(Generic[R]):
    """Micro-batches calls to ``predict_fn`` from many threads or asyncio tasks.

    Args:
        predict_fn: runs one batch of ids (1-D int64 array); its result must have
            ``len(result) == len(ids)`` and support row slicing ``result[a:b]``
            (e.g. :class:`~abkd_deploy.serve.predictor.Prediction` or a numpy array).
        max_batch: the most ids in one ``predict_fn`` call (and in one request).
        max_wait_ms: the longest a queued request waits for others to reach ``min_batch``
            ids (an upper bound: with ``min_batch=1`` nobody ever waits for company).
        max_queue: the most requests waiting; beyond it :meth:`submit` raises
            :class:`~abkd_deploy.serve.errors.Unavailable`.
        name: worker thread name.
        min_batch: ids worth waiting for (up to ``max_wait_ms``) before a run starts.
        inline_ids: an asyncio request of at most this many ids that finds the model
            free, nobody waiting, and the model idle for longer than its last run took
            (requests arrive slower than it runs them: nobody worth waiting for) runs at
            once in :meth:`apredict`, before the caller's task yields: no future, no loop
            iteration. Arriving faster, it waits one loop iteration for the others as
            usual. 0: never (the server uses it for its small requests).
    """

    def __init__(
        self,
        predict_fn: Callable[[np.ndarray], R],
        max_batch: int,
        max_wait_ms: float,
        max_queue: int = 10_000,
        name: str = "micro-batcher",
        min_batch: int = 1,
        inline_ids: int = 0,
    ) -> None:
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if float(max_wait_ms) < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not 1 <= int(min_batch) <= int(max_batch):
            raise ConfigError(f"min_batch must be in [1, max_batch={max_batch}], got {min_batch}")
        self._fn = predict_fn
        self.max_batch = int(max_batch)
        self.min_batch = int(min_batch)
        self.inline_ids = int(inline_ids)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_ids = 0
        self._cond = threading.Condition(threading.Lock())  # never re-entered
        self._busy = False  # a run is in progress (worker or caller thread)
        self._idle_since = 0.0  # perf_counter() at the end of the last run
        self._last_run_s = 0.0  # how long the last run took
        self._flush_loops: set[asyncio.AbstractEventLoop] = set()  # a flush is scheduled
        # after a worker run for event-loop callers, the next run waits (up to max_wait)
        # until that loop has handed out the answers and read what arrived meanwhile
        self._held_until = 0.0  # time.monotonic() deadline; 0: no hold
        self._closing = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ callers

    def submit(self, node_ids: Any) -> Future[R]:
        """Queues one request for the worker; returns a future with its rows of the result.

        Raises:
            InvalidNodeIds: ``node_ids`` is not 1-D or is empty.
            BatchTooLarge: more than ``max_batch`` ids.
            Unavailable: the batcher is closed or its queue is full.
        """
        req = _Request(self._check(node_ids))
        with self._cond:
            self._admit(req)
            if not self._busy:
                self._cond.notify()
        return req.future

    def predict(self, node_ids: Any, timeout: float | None = None) -> R:
        """Blocking :meth:`submit`; a lone request on a free model runs in this thread."""
        req = _Request(self._check(node_ids))
        with self._cond:
            self._admit(req)
            batch = self._take_lone()
            if batch is None and not self._busy:
                self._cond.notify()
        if batch is not None:
            self._run_claimed(batch, None)
        return req.future.result(timeout)

    async def apredict(self, node_ids: Any, alone: bool = True) -> R:
        """:meth:`predict` for asyncio callers; cancelling the task cancels the request.

        Args:
            node_ids: the request's ids.
            alone: whether the caller knows of no other request on its way (a server: no
                other request being read or answered). Only then may a small request run
                inline (``inline_ids``): one that runs on the event loop while others wait
                there delays them all, and gives up their company in one batch.
        """
        loop = asyncio.get_running_loop()
        ids = self._check(node_ids)
        if alone and ids.size <= self.inline_ids and self._claim_free(ids):
            start = time.perf_counter()
            try:
                return self._call(ids)
            finally:
                self._release(start)
        req = _Request(ids, loop, alone)
        with self._cond:
            self._admit(req)
            if not self._busy and loop not in self._flush_loops:
                self._flush_loops.add(loop)
                loop.call_soon(self._flush, loop)
        return await req.future

    @property
    def queued(self) -> int:
        """Requests submitted whose model run has not started yet."""
        with self._cond:
            return len(self._pending)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def close(self, timeout: float | None = None) -> None:
        """Stops accepting requests, answers every queued one, then stops the worker.

        Args:
            timeout: seconds to wait for the worker (``None``: until drained).
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> MicroBatcher[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queue (under _cond)

    def _check(self, node_ids: Any) -> np.ndarray:
        ids = np.asarray(node_ids)
        if ids.ndim != 1:
            raise InvalidNodeIds(f"node_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.size == 0:
            raise InvalidNodeIds("node_ids is empty; expected at least one node id")
        if ids.size > self.max_batch:
            raise BatchTooLarge(int(ids.size), self.max_batch, what="request")
        return ids

    def _admit(self, req: _Request) -> None:
        if self._closing:
            raise Unavailable("the batcher is shut down; no new requests are accepted")
        if len(self._pending) >= self.max_queue:
            raise Unavailable(f"{len(self._pending)} requests are queued; try again later")
        self._pending.append(req)
        self._pending_ids += int(req.ids.size)

    def _wait_s(self) -> float:
        """Seconds the queued requests may still wait for company (<= 0: run now)."""
        if self._closing or self._pending_ids >= self.min_batch:
            return 0.0
        return self._pending[0].arrived + self.max_wait_s - time.monotonic()

    def _take(self) -> list[_Request]:
        """Claims the next batch (oldest first, up to ``max_batch`` ids) and the model."""
        batch: list[_Request] = []
        total = 0
        while self._pending and total + self._pending[0].ids.size <= self.max_batch:
            req = self._pending.popleft()
            self._pending_ids -= int(req.ids.size)
            if req.claim():
                batch.append(req)
                total += int(req.ids.size)
        self._busy = True
        return batch

    def _claim_free(self, ids: np.ndarray) -> bool:
        """Claims the model for ``ids`` alone if it is free, nobody is waiting and it has
        been idle for longer than its last run took."""
        with self._cond:
            if self._busy or self._pending or self._closing or ids.size < self.min_batch:
                return False
            if time.perf_counter() - self._idle_since <= self._last_run_s:
                return False  # requests come faster than runs: gather them
            self._busy = True
            return True

    def _release(self, started: float) -> None:
        """Frees the model after a run begun at ``started`` (``perf_counter``); wakes the
        worker for whatever queued meanwhile."""
        with self._cond:
            self._busy = False
            self._idle_since = now = time.perf_counter()
            self._last_run_s = now - started
            if self._pending:
                self._cond.notify()

    def _take_lone(self) -> list[_Request] | None:
        """The batch to run in the caller's thread: a lone request on a free model."""
        if self._busy or len(self._pending) != 1 or self._wait_s() > 0:
            return None
        if not self._pending[0].alone:  # others are on their way: the worker batches them
            return None
        return self._take()

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Event-loop callback: a lone request runs here; more wake the worker (which runs
        them while the loop goes on parsing and answering)."""
        with self._cond:
            self._flush_loops.discard(loop)
            self._held_until = 0.0
            batch = self._take_lone()
            if batch is None and self._pending and not self._busy:
                self._cond.notify()
        if batch is not None:
            self._run_claimed(batch, loop)

    # ------------------------------------------------------------------ runs

    def _loop(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                with self._cond:
                    while True:
                        if self._pending and not self._busy:
                            wait_s = max(self._wait_s(), self._held_until - time.monotonic())
                            if wait_s <= 0:
                                break
                            self._cond.wait(wait_s)
                        elif self._closing and not self._pending:
                            return
                        else:
                            self._cond.wait()
                    batch = self._take()
                self._run_claimed(batch, None)
                batch = []
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("micro-batcher worker died")
            with self._cond:
                self._closing = True
                left = list(self._pending)
                self._pending.clear()
                self._pending_ids = 0
            error = Unavailable(f"micro-batcher worker died: {exc!r}")
            _deliver([(req, None, error) for req in batch], None)
            _deliver([(req, None, error) for req in left if req.claim()], None)

    def _run_claimed(self, batch: list[_Request], here: asyncio.AbstractEventLoop | None) -> None:
        """Runs a batch taken with :meth:`_take`, answers it, and frees the model."""
        start = time.perf_counter()
        try:
            outcomes = self._run(batch)
        except BaseException as exc:
            error = Unavailable(f"micro-batcher run failed: {exc!r}")
            outcomes = [(req, None, error) for req in batch]
            raise
        finally:
            hold = here is None and self.max_wait_s > 0
            if hold and any(o[0].loop is not None for o in outcomes):
                # the answers' loop flushes once it has taken them (and read new requests):
                # the next batch is what came meanwhile, not the first one or two to arrive
                with self._cond:
                    self._held_until = time.monotonic() + self.max_wait_s
            _deliver(outcomes, here, self._flush if here is None else None)
            self._release(start)

    def _run(self, batch: list[_Request]) -> list[_Outcome]:
        if not batch:
            return []
        try:
            if len(batch) == 1:
                parts = [self._call(batch[0].ids)]
            else:
                result = self._call(np.concatenate([r.ids for r in batch]))
                bounds = [0, *itertools.accumulate(int(r.ids.size) for r in batch)]
                parts = [result[a:b] for a, b in itertools.pairwise(bounds)]  # type: ignore[index]
        except Exception as exc:
            if len(batch) == 1:
                return [(batch[0], None, exc)]
            log.debug("batch of %d requests failed (%s); running them one by one", len(batch), exc)
            return [self._run_alone(req) for req in batch]
        return [(req, part, None) for req, part in zip(batch, parts, strict=True)]

    def _call(self, ids: np.ndarray) -> R:
        result = self._fn(ids)
        rows = len(result)  # type: ignore[arg-type]
        if rows != ids.size:
            raise RuntimeError(f"predict_fn returned {rows} rows for {ids.size} ids")
        return result

    def _run_alone(self, req: _Request) -> _Outcome:
        try:
            return (req, self._call(req.ids), None)
        except Exception as exc:
            return (req, None, exc)
