"""Serving a model directory ``REPO/<model>/<version>/``: version watcher and hot swap.

* :class:`VersionWatcher` scans the model directory (:mod:`abkd_deploy.model_repo`) and
  decides what to serve: the newest version that validates. Validation is complete before
  a version can be served: :class:`Predictor` load (every file's size and SHA-256, the
  manifest against the copy inside the model and against its tables, the model's inputs
  and outputs), an ``embedded`` export, the same *schema* as the version served now
  (``graph.num_features``, ``graph.num_classes``, output names, dtypes and shapes: the
  answers' shape does not change under a client; ``num_nodes``, the architecture and the
  weights may), and a smoke prediction (first and last node, finite scores that sum to 1).
  A version that fails is logged, counted in ``abkd_serve_model_load_failures_total
  {version}`` and not tried again until its folder changes (another inode, mtime or
  manifest); the current version keeps serving.
* Removal: when the served version's folder disappears (or is replaced), the newest
  remaining valid version is served (rollback). With no valid version left, the current
  one keeps serving from memory and an error is logged (once).
* :class:`ModelVersions` holds the served :class:`ServedModel` in one reference. Each
  version has its own :class:`MicroBatcher`, so one model run never mixes versions: a
  request reads the reference once, is checked against that version and queued on its
  batcher; a swap installs the new version (its batcher started first), then closes the
  old batcher, which still answers everything queued on it. A request that reached the
  old batcher after it closed is re-checked and queued on the new one (never a 503).

With ``serve --workers N`` each worker runs its own watcher (they converge within one poll).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from abkd_deploy.errors import AbkdError, ServeError, first_line
from abkd_deploy.model_repo import MANIFEST_NAME, list_versions
from abkd_deploy.serve.errors import ArtifactError, Unavailable
from abkd_deploy.serve.metrics import ServeMetrics
from abkd_deploy.serve.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

#: Default seconds between two scans of the model directory.
DEFAULT_POLL_S = 2.0

Fingerprint = tuple[int, int, int, int]


def fingerprint(path: Path) -> Fingerprint | None:
    """Identity of a version folder's content: folder inode and mtime, manifest mtime and
    size (``None``: the folder is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        man = os.stat(path / MANIFEST_NAME)
        man_key = (man.st_mtime_ns, man.st_size)
    except OSError:
        man_key = (0, -1)
    return (st.st_ino, st.st_mtime_ns, *man_key)


def schema(predictor: Predictor) -> dict[str, Any]:
    """What must stay the same across versions: feature width, classes and outputs."""
    graph = predictor.manifest["graph"]
    return {
        "num_features": graph.get("num_features"),
        "num_classes": predictor.num_classes,
        "outputs": [
            (o["name"], o.get("dtype"), o.get("shape")) for o in predictor.manifest["outputs"]
        ],
    }


def smoke_test(predictor: Predictor) -> None:
    """One prediction on the first and last node: finite scores, rows that sum to 1.

    Raises:
        ArtifactError: the model does not answer, or answers garbage.
    """
    ids = np.array([0, predictor.num_nodes - 1], dtype=np.int64)
    try:
        pred = predictor.predict(ids, return_embedding=predictor.has_embedding)
    except AbkdError as exc:
        raise ArtifactError(f"smoke prediction failed: {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"smoke prediction failed: {first_line(exc)}") from None
    scores = pred.scores
    if scores.shape != (2, predictor.num_classes) or not np.all(np.isfinite(scores)):
        raise ArtifactError(f"smoke prediction gave scores of shape {scores.shape} or non-finite")
    if not np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
        raise ArtifactError("smoke prediction gave scores that do not sum to 1")
    if pred.embedding is not None and not np.all(np.isfinite(pred.embedding)):
        raise ArtifactError("smoke prediction gave non-finite embeddings")


@dataclass(eq=False)
class ServedModel:
    """One loaded, validated version.

    Attributes:
        predictor: its model.
        version: the version number (``None``: a plain export directory, not a repository).
        path: its folder.
        fingerprint: :func:`fingerprint` of the folder when it was loaded.
        batcher: its micro-batcher (set when it is installed).
    """

    predictor: Predictor
    version: int | None
    path: Path
    fingerprint: Fingerprint | None = None
    batcher: Any = None


class VersionMetrics:
    """Version series in a :class:`ServeMetrics` registry (summed/kept per worker)."""

    def __init__(self, metrics: ServeMetrics) -> None:
        p, reg = metrics.prefix, metrics.registry
        self.served = Gauge(
            f"{p}_model_version", "The model version being served.", registry=reg,
            multiprocess_mode="liveall",
        )  # fmt: skip
        self.requests = Counter(
            f"{p}_model_requests", "Prediction requests answered, by model version.",
            ["model_version"], registry=reg,
        )  # fmt: skip
        self.loads = Counter(
            f"{p}_model_loads", "Versions loaded and validated.", ["version"], registry=reg
        )
        self.failures = Counter(
            f"{p}_model_load_failures", "Versions that failed validation (never served).",
            ["version"], registry=reg,
        )  # fmt: skip


class VersionWatcher:
    """Decides which version of ``model_dir`` to serve (see the module docstring).

    Args:
        model_dir: ``REPO/<model>``.
        load: loads one export folder into a :class:`Predictor` (hash checks included).
        metrics: where loads and failures are counted (optional).
    """

    def __init__(
        self,
        model_dir: str | Path,
        load: Callable[[Path], Predictor],
        metrics: VersionMetrics | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.load = load
        self.metrics = metrics
        self.failed: dict[int, tuple[Fingerprint | None, str]] = {}
        self._warned_empty = False

    def attach(self, metrics: VersionMetrics, current: ServedModel | None = None) -> None:
        """Starts counting into ``metrics``, with what happened before (the startup scan)."""
        self.metrics = metrics
        for version in self.failed:
            metrics.failures.labels(str(version)).inc()
        if current is not None and current.version is not None:
            metrics.loads.labels(str(current.version)).inc()

    def validate(self, version: int, current: ServedModel | None) -> ServedModel:
        """Loads and checks one version fully.

        Raises:
            AbkdError: any check failed (the message says which).
        """
        path = self.model_dir / str(version)
        fp = fingerprint(path)
        predictor = self.load(path)
        if predictor.format != "embedded":
            raise ArtifactError(f"serve needs an 'embedded' export; this is {predictor.format!r}")
        if current is not None:
            old, new = schema(current.predictor), schema(predictor)
            diff = [k for k in old if old[k] != new[k]]
            if diff:
                detail = ", ".join(f"{k} {new[k]!r} (served: {old[k]!r})" for k in diff)
                raise ArtifactError(f"schema differs from the served version: {detail}")
            if predictor.has_embedding != current.predictor.has_embedding:
                raise ArtifactError("the 'embedding' output differs from the served version")
        smoke_test(predictor)
        if fingerprint(path) != fp:
            raise ArtifactError("the folder changed while it was validated; retried next scan")
        return ServedModel(predictor, version, path, fp)

    def scan(self, current: ServedModel | None) -> ServedModel | None:
        """One look at the model directory.

        Returns:
            The version to serve instead of ``current`` (validated), or ``None`` to keep it.
        """
        versions = list_versions(self.model_dir)
        for version in reversed(versions):
            path = self.model_dir / str(version)
            fp = fingerprint(path)
            if current is not None and version == current.version and fp == current.fingerprint:
                return None
            if version in self.failed and self.failed[version][0] == fp:
                continue
            try:
                served = self.validate(version, current)
            except (AbkdError, OSError) as exc:
                self._fail(version, fp, str(exc))
                continue
            self.failed.pop(version, None)
            self._warned_empty = False
            if self.metrics is not None:
                self.metrics.loads.labels(str(version)).inc()
            log.info("model version %d at %s validated", version, path)
            return served
        gone = current is not None and fingerprint(current.path) != current.fingerprint
        if gone and not self._warned_empty:
            self._warned_empty = True
            log.error(
                "no valid version left in %s (versions %s); still serving version %s from "
                "memory", self.model_dir, versions, current.version,
            )  # fmt: skip
        return None

    def _fail(self, version: int, fp: Fingerprint | None, message: str) -> None:
        self.failed[version] = (fp, message)
        if self.metrics is not None:
            self.metrics.failures.labels(str(version)).inc()
        log.error("model version %d in %s refused: %s", version, self.model_dir, message)

    def initial(self) -> ServedModel:
        """The version to start with: the newest valid one.

        Raises:
            ServeError: no version validates (each failure is named).
        """
        served = self.scan(None)
        if served is None:
            versions = list_versions(self.model_dir)
            why = "; ".join(f"{v}: {self.failed[v][1]}" for v in reversed(versions))
            raise ServeError(
                f"no valid version in model directory {self.model_dir} (versions "
                f"{versions or 'none'}){': ' + why if why else ''}"
            )
        return served


@dataclass(eq=False)
class ModelVersions:
    """The swap holder: the served version in one reference, plus the watcher thread.

    Args:
        current: the version served first.
        watcher: scans for new versions (``None``: a fixed export, never swapped).
        poll_s: seconds between scans.
        metrics: version series (optional).
    """

    current: ServedModel
    watcher: VersionWatcher | None = None
    poll_s: float = DEFAULT_POLL_S
    metrics: VersionMetrics | None = None
    _make_batcher: Callable[[Predictor], Any] | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, make_batcher: Callable[[Predictor], Any]) -> None:
        """Starts the current version's batcher and the watcher thread."""
        self._make_batcher = make_batcher
        self.current.batcher = make_batcher(self.current.predictor)
        self._set_gauge()
        if self.watcher is not None:
            self._thread = threading.Thread(target=self._watch, name="version-watcher", daemon=True)
            self._thread.start()

    def check_now(self) -> bool:
        """One scan; installs a new version if there is one. Returns whether it swapped."""
        if self.watcher is None:
            return False
        with self._lock:
            served = self.watcher.scan(self.current)
            if served is None:
                return False
            self.install(served)
            return True

    def install(self, served: ServedModel) -> None:
        """Swaps to ``served``: its batcher starts, the reference moves, the old one drains."""
        assert self._make_batcher is not None, "start() first"
        served.batcher = self._make_batcher(served.predictor)
        old, self.current = self.current, served
        self._set_gauge()
        log.info("serving model version %s (was %s)", served.version, old.version)
        old.batcher.close()

    async def apredict(
        self,
        parse: Callable[[ServedModel], Any],
        run: Callable[[ServedModel, Any], Awaitable[Prediction]],
    ) -> tuple[ServedModel, Any, Prediction]:
        """Answers one request wholly from one version.

        Args:
            parse: checks the request against a version (its ``num_nodes``...).
            run: ``run(version, request)`` answers it with that version (its batcher).

        Returns:
            ``(version, parsed request, prediction)``.
        """
        while True:
            served = self.current
            req = parse(served)
            try:
                pred = await run(served, req)
            except Unavailable:
                if served is self.current or not served.batcher.closed:
                    raise
                log.debug(
                    "version %s retired before the request was queued; retrying", served.version
                )
                continue  # swapped meanwhile: the old batcher took no more work
            if self.metrics is not None and served.version is not None:
                self.metrics.requests.labels(str(served.version)).inc()
            return served, req, pred

    def close(self) -> None:
        """Stops the watcher, then drains the current batcher."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.current.batcher is not None:
                self.current.batcher.close()

    def _set_gauge(self) -> None:
        if self.metrics is not None and self.current.version is not None:
            self.metrics.served.set(self.current.version)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_now()
            except Exception:  # a bug in a scan must not stop serving
                log.exception("scanning %s failed", self.watcher.model_dir)
