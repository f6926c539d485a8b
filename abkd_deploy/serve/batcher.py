"""``MicroBatcher``: groups concurrent node-id requests into one model run.

One worker thread takes the oldest waiting request and keeps adding waiting requests
(in arrival order) until the batch holds ``max_batch`` ids or ``max_wait_ms`` have passed
since that oldest request arrived; it then runs ``predict_fn`` once on the concatenated
ids and hands row ranges of the result back to each caller. A request never waits longer
than ``max_wait_ms`` for company (plus the time the worker is busy with earlier batches).

Decisions:

* A single request with more than ``max_batch`` ids is **rejected** at
  :meth:`MicroBatcher.submit` with :class:`~abkd_deploy.serve.errors.BatchTooLarge`:
  ``max_batch`` bounds the memory and latency of every model run, and a request is never
  split across runs. The HTTP server's per-request limit is at most ``max_batch``.
* If a combined run raises, each of its requests is re-run alone, so only the request
  that causes the error receives it; the others get their answers.
* :meth:`MicroBatcher.close` stops accepting requests, runs every request already
  submitted (without waiting out ``max_wait_ms``), then stops the worker.
* A caller that cancels its future before its batch starts is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve.errors import BatchTooLarge, InvalidNodeIds, Unavailable

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass
class _Request:
    ids: np.ndarray
    future: Future[Any]
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[R]):
    """Micro-batches calls to ``predict_fn`` from many threads or asyncio tasks.

    Args:
        predict_fn: runs one batch of ids (1-D int64 array); its result must have
            ``len(result) == len(ids)`` and support row slicing ``result[a:b]``
            (e.g. :class:`~abkd_deploy.serve.predictor.Prediction` or a numpy array).
        max_batch: the most ids in one ``predict_fn`` call (and in one request).
        max_wait_ms: how long the oldest waiting request may wait for more to join.
        max_queue: the most requests waiting; beyond it :meth:`submit` raises
            :class:`~abkd_deploy.serve.errors.Unavailable`.
        name: worker thread name.
    """

    def __init__(
        self,
        predict_fn: Callable[[np.ndarray], R],
        max_batch: int,
        max_wait_ms: float,
        max_queue: int = 10_000,
        name: str = "micro-batcher",
    ) -> None:
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if float(max_wait_ms) < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self._fn = predict_fn
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self._pending: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._forming = 0  # requests in the batch being gathered
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ callers

    def submit(self, node_ids: Any) -> Future[R]:
        """Queues one request; returns a future with its rows of the result.

        Raises:
            InvalidNodeIds: ``node_ids`` is not 1-D or is empty.
            BatchTooLarge: more than ``max_batch`` ids.
            Unavailable: the batcher is closed or its queue is full.
        """
        ids = np.asarray(node_ids)
        if ids.ndim != 1:
            raise InvalidNodeIds(f"node_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.size == 0:
            raise InvalidNodeIds("node_ids is empty; expected at least one node id")
        if ids.size > self.max_batch:
            raise BatchTooLarge(int(ids.size), self.max_batch, what="request")
        req = _Request(ids, Future())
        with self._cond:
            if self._closing:
                raise Unavailable("the batcher is shut down; no new requests are accepted")
            if len(self._pending) >= self.max_queue:
                raise Unavailable(f"{len(self._pending)} requests are queued; try again later")
            self._pending.append(req)
            self._cond.notify()
        return req.future

    def predict(self, node_ids: Any, timeout: float | None = None) -> R:
        """Blocking :meth:`submit`: waits for and returns this request's result."""
        return self.submit(node_ids).result(timeout)

    async def apredict(self, node_ids: Any) -> R:
        """:meth:`submit` for asyncio callers; cancelling the task cancels the request."""
        return await asyncio.wrap_future(self.submit(node_ids))

    @property
    def queued(self) -> int:
        """Requests submitted whose model run has not started yet."""
        with self._cond:
            return len(self._pending) + self._forming

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

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        batch: list[_Request] | None = []
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("micro-batcher worker died")
            with self._cond:
                self._closing = True
                left = list(self._pending)
                self._pending.clear()
            error = Unavailable(f"micro-batcher worker died: {exc!r}")
            for req in batch or []:
                if not req.future.done():
                    req.future.set_exception(error)
            for req in left:
                if req.future.set_running_or_notify_cancel():
                    req.future.set_exception(error)

    def _next_batch(self) -> list[_Request] | None:
        """Waits for requests; returns the next batch, or ``None`` once closed and drained."""
        batch: list[_Request] = []
        total = 0
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = self._pending[0].arrived + self.max_wait_s
            while True:
                while self._pending and total + self._pending[0].ids.size <= self.max_batch:
                    req = self._pending.popleft()
                    if req.future.set_running_or_notify_cancel():
                        batch.append(req)
                        total += req.ids.size
                self._forming = len(batch)
                full = total >= self.max_batch or bool(self._pending)
                remaining = deadline - time.monotonic()
                if full or self._closing or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._forming = 0
        return batch

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        try:
            ids = batch[0].ids if len(batch) == 1 else np.concatenate([r.ids for r in batch])
            result = self._call(ids)
            bounds = [0, *itertools.accumulate(int(r.ids.size) for r in batch)]
            parts = [result[a:b] for a, b in itertools.pairwise(bounds)]  # type: ignore[index]
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.debug("batch of %d requests failed (%s); running them one by one", len(batch), exc)
            for req in batch:
                self._run_alone(req)
            return
        for req, part in zip(batch, parts):
            req.future.set_result(part)

    def _call(self, ids: np.ndarray) -> R:
        result = self._fn(ids)
        rows = len(result)  # type: ignore[arg-type]
        if rows != ids.size:
            raise RuntimeError(f"predict_fn returned {rows} rows for {ids.size} ids")
        return result

    def _run_alone(self, req: _Request) -> None:
        try:
            result = self._call(req.ids)
        except Exception as exc:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)
