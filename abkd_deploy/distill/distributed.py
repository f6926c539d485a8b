"""Data-parallel distillation over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

``abkd-deploy distill ... --nproc N`` spawns ``N`` workers on this machine through torch's
elastic launcher (:func:`launch`); under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the
process is already one worker and runs :func:`run_worker` itself. Each rank:

* loads the dataset and the teacher (a teacher trained by the run is trained by rank 0
  alone, then broadcast);
* takes a fixed shard of the seed nodes (rank ``r``: rows ``r::N`` of a seeded
  permutation of the target rows, the labelled ones for ``ce``);
* with a frozen teacher, computes the teacher's outputs once and keeps the rows of its own
  shard memory-mapped (:mod:`abkd_deploy.distill.teacher_cache`); in joint mode the
  teacher is fine-tuned, so it runs every step (full batch), and the log says so;
* trains one :class:`DistillModule` (the student *and* the objective's own parameters, and
  a joint teacher) wrapped in ``DistributedDataParallel``, so every gradient is averaged;
  every rank runs the same number of steps per epoch (its shard split into equal counts);
* scores the splits on its share of the rows and combines them (``all_reduce`` of correct
  counts for accuracy, ``all_gather`` of the logits for ROC-AUC), so early stopping takes
  the same decision everywhere.

``abkd-deploy teacher ... --nproc N`` (``launch(N, job="teacher")``) trains a teacher the
same way: the same seeded model on every rank, DDP over its parameters, each rank on its
shard of the labelled nodes (mini-batch: the vectorised sampler; full batch: the loss on the
shard's rows over the whole graph), evaluation gathered.

Rank 0 alone writes the run dir, through the writer of :mod:`abkd_deploy.distill.run`
(or :mod:`~abkd_deploy.distill.teacher`), staged and published whole. A rank that fails
ends the run (the launcher stops the others) with a one-line
:class:`~abkd_deploy.errors.DistributedError` naming the rank, and nothing is published.
For a fixed ``N`` and seed the run is reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.errors import AbkdError, ConfigError, DistributedError

T = TypeVar("T")

#: Test hook: the rank that raises at epoch ``ABKD_DIST_FAIL_EPOCH`` (default 2).
FAIL_RANK_ENV, FAIL_EPOCH_ENV = "ABKD_DIST_FAIL_RANK", "ABKD_DIST_FAIL_EPOCH"
#: Where the launcher's workers report their own errors (a directory it creates).
ERRORS_ENV = "ABKD_DIST_ERRORS"
#: Inside rank 0's staging dir: the ranks' teacher shards.
CACHE_DIR = Path(".work") / "teacher_outputs"
#: The jobs :func:`launch` runs, with their default run dirs.
JOBS = {"distill": "runs/distill", "teacher": "runs/teacher"}


def under_torchrun() -> bool:
    """Whether this process is a worker started by ``torchrun`` (or the elastic agent)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(nproc: int, job: str = "distill", **kwargs: Any) -> dict[str, Any] | None:
    """Runs :func:`abkd_deploy.distill.run.distill`'s job (or, with ``job="teacher"``,
    :func:`abkd_deploy.distill.teacher.train_teacher`'s) on ``nproc`` ranks.

    Under ``torchrun`` this process is one rank (``nproc`` must then be 1: torchrun's
    ``--nproc-per-node`` decides). Otherwise ``nproc`` workers are spawned on this machine.

    Args:
        nproc: Processes on this machine.
        job: ``"distill"`` or ``"teacher"``.
        kwargs: The keyword arguments of that job's function.

    Returns:
        The run's metrics on rank 0 (``None`` on the other ranks under torchrun).

    Raises:
        DistributedError: A rank failed (the message names it); nothing was published.
    """
    if under_torchrun():
        if nproc != 1:
            raise ConfigError(
                f"--nproc {nproc} under torchrun; torchrun's --nproc-per-node sets the "
                "processes, leave --nproc at 1"
            )
        return run_worker(kwargs, job)
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}; expected >= 1")
    if job not in JOBS:
        raise ConfigError(f"distributed job {job!r}; expected one of {', '.join(JOBS)}")
    (_check_teacher_before_launch if job == "teacher" else _check_before_launch)(kwargs)
    kwargs.setdefault("out", JOBS[job])
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # DDP's one-off C++ notes
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"abkd-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    import logging

    # their tracebacks and notes: the one-line DistributedError below says it
    quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    errors = Path(tempfile.mkdtemp(prefix="abkd-dist-errors-"))
    os.environ[ERRORS_ENV] = str(errors)  # inherited by the spawned workers
    try:
        results = elastic_launch(config, _entrypoint)(kwargs, job)
    except ChildFailedError as exc:
        _remove_leftovers(kwargs["out"])
        raise _rank_error(exc, errors) from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        os.environ.pop(ERRORS_ENV, None)
        shutil.rmtree(errors, ignore_errors=True)
    return results.get(0)


def _check_before_launch(kwargs: dict[str, Any]) -> None:
    """The checks :func:`distill` makes before training, done once before spawning."""
    from abkd_deploy.distill.objective import METHODS
    from abkd_deploy.distill.specs import KDSpec, TeacherSpec
    from abkd_deploy.models import MODELS
    from abkd_deploy.staging import check_out_dir

    kd = kwargs.get("kd") or KDSpec()
    METHODS.get(kd.method)
    if kwargs.get("student") is not None:
        MODELS.get(kwargs["student"].arch)
    if kwargs.get("seeds", 1) < 1:
        raise ConfigError(f"--seeds {kwargs['seeds']}; expected >= 1")
    teacher = kwargs.get("teacher") or TeacherSpec()
    check_out_dir(kwargs.get("out", "runs/distill"), kwargs.get("force", False), [teacher.path])


def _check_teacher_before_launch(kwargs: dict[str, Any]) -> None:
    """The checks :func:`train_teacher` makes before training, done once before spawning."""
    from abkd_deploy.models import MODELS
    from abkd_deploy.staging import check_out_dir

    MODELS.get(kwargs.get("arch", "gcnii"))
    check_out_dir(kwargs.get("out", JOBS["teacher"]), kwargs.get("force", False))


def _remove_leftovers(out: str | Path) -> None:
    """Removes the staging dir of a rank 0 that was killed before it could clean up."""
    from abkd_deploy.staging import remove_stale

    target = Path(out).expanduser().resolve()
    if target.parent.is_dir():
        remove_stale(target, report_legacy=False)


def _rank_error(exc: Any, errors: Path) -> DistributedError | ConfigError:
    """One line naming the rank that failed first (and its own first error line).

    The ranks' own reports (``errors``, written before a rank exits) decide: a rank
    whose peer died usually exits first, with a "connection closed" error, and is what
    the launcher's first failure names.
    """
    reports = []
    for path in errors.glob("rank*.txt"):
        with contextlib.suppress(OSError, ValueError):
            when, rank_s, line = path.read_text().split("\t", 2)
            reports.append((_is_peer_error(line), float(when), int(rank_s), line.strip()))
    rank, failure = exc.get_first_failure()
    pid = failure.pid
    if reports:
        _, _, rank, reason = min(reports)
        pid = exc.failures[rank].pid if rank in exc.failures else pid
    else:
        reason = f"exit code {failure.exitcode}" + (
            f" ({signal.Signals(-failure.exitcode).name})" if failure.exitcode < 0 else ""
        )
    if reason.startswith("ConfigError: "):
        return ConfigError(f"rank {rank}: {reason.removeprefix('ConfigError: ')}")
    return DistributedError(
        f"distributed run failed: rank {rank} (pid {pid}): {reason}; no run dir was published"
    )


def _entrypoint(kwargs: dict[str, Any], job: str) -> dict[str, Any] | None:
    """What each spawned worker runs (module level, so it can be pickled)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(run_worker)(kwargs, job)


class _Terminated(KeyboardInterrupt):
    """SIGTERM from the launcher (another rank failed): unwinds, removing staging dirs."""


def _on_term(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)
    raise _Terminated


def run_worker(kwargs: dict[str, Any], job: str = "distill") -> dict[str, Any] | None:
    """One rank's whole run of ``job``: process group, training, run dir (rank 0), teardown."""
    from abkd_deploy.devices import resolve_device

    train = kwargs.get("train")
    device = resolve_device(train.device if train is not None else "auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if threading_main():
        signal.signal(signal.SIGTERM, _on_term)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    try:
        result = (_teacher if job == "teacher" else _distill)(device=device, **kwargs)
    except BaseException as exc:
        # No destroy_process_group() here: with a peer blocked in a collective it can wait
        # for that peer (seen once in CI: the run hung until the test's timeout). Exiting
        # closes this rank's sockets, so the peers fail at once and the launcher reports it.
        _report_failure(exc)
        if os.environ.get(ERRORS_ENV):  # our launcher reads the report: leave at once,
            sys.stdout.flush()  # with no interpreter teardown that could wait for a peer
            sys.stderr.flush()
            os._exit(1)
        if isinstance(exc, AbkdError):  # keep the typed message for the launcher
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
        raise
    dist.destroy_process_group()
    return result


def _is_peer_error(line: str) -> bool:
    """Whether a rank's error only says that another rank went away."""
    return any(k in line for k in ("Connection closed by peer", "Connection reset", "_Terminated"))


def _report_failure(exc: BaseException) -> None:
    """Writes ``<time>\\t<rank>\\t<first line>`` for :func:`_rank_error` (launcher runs)."""
    errors = os.environ.get(ERRORS_ENV)
    if not errors or not dist.is_initialized():
        return
    from abkd_deploy.errors import first_line

    rank = dist.get_rank()
    line = f"{type(exc).__name__}: {first_line(exc)}".replace("\n", " ")
    with contextlib.suppress(OSError):
        Path(errors, f"rank{rank}.txt").write_text(f"{time.time()}\t{rank}\t{line}")


def threading_main() -> bool:
    """Whether this is the main thread (signal handlers can only be set there)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _distill(
    device: torch.device,
    dataset: str = "csbm",
    root: str | Path | None = None,
    split: str | None = None,
    teacher: Any = None,
    student: Any = None,
    kd: Any = None,
    train: Any = None,
    seeds: int = 1,
    out: str | Path = "runs/distill",
    force: bool = False,
    teacher_record: str | None = None,
) -> dict[str, Any] | None:
    """The worker side of :func:`launch` (same arguments as ``distill``)."""
    from abkd_deploy.data import load_dataset
    from abkd_deploy.distill.evaluate import dataset_outputs, split_scores
    from abkd_deploy.distill.run import (
        WORK_DIR,
        build_record,
        prepare_teacher,
        run_metrics,
        write_run,
    )
    from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec
    from abkd_deploy.distill.teacher import dataset_ref
    from abkd_deploy.distill.trainer import TrainConfig
    from abkd_deploy.staging import staged_directory, write_run_record

    teacher, student, kd = teacher or TeacherSpec(), student or StudentSpec(), kd or KDSpec()
    train = train or TrainConfig()
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    data = rank0_first(lambda: load_dataset(dataset, root, split))
    ref = dataset_ref(dataset, root, split)
    if rank == 0:
        with staged_directory(out, force, [teacher.path]) as stage:
            teacher_model, teacher_src = prepare_teacher(
                teacher, data, ref, train, stage / WORK_DIR
            )
            _broadcast([str(stage), teacher_model])
            runs, extra = _all_seeds(data, teacher_model, student, kd, train, seeds, stage, device)
            t_scores = split_scores(data, dataset_outputs(teacher_model, data)[0])
            metrics = run_metrics(ref, data.metric, kd.method, teacher_model, t_scores, runs, start)
            metrics["distributed"] = {"world_size": world, "backend": dist.get_backend(), **extra}
            record = build_record(
                ref, teacher, teacher_record, student, kd, train, seeds, teacher_src, runs, metrics
            )
            write_run(stage, record)
            dist.barrier()  # every rank has closed its teacher shard
            shutil.rmtree(stage / WORK_DIR, ignore_errors=True)
            write_run_record(stage, "distill")
        return metrics
    stage_name, teacher_model = _broadcast([None, None])
    stage = Path(stage_name)
    created = not stage.exists()  # another machine under torchrun: a local scratch dir
    train = replace(train, progress=False)
    try:
        _all_seeds(data, teacher_model, student, kd, train, seeds, stage, device)
        dist.barrier()
    finally:
        if created:
            shutil.rmtree(stage, ignore_errors=True)
    return None


def _teacher(
    device: torch.device,
    dataset: str = "csbm",
    root: str | Path | None = None,
    split: str | None = None,
    arch: str = "gcnii",
    layers: int = 16,
    hidden: int = 64,
    dropout: float | None = None,
    train: Any = None,
    out: str | Path = "runs/teacher",
    force: bool = False,
) -> dict[str, Any] | None:
    """The worker side of ``launch(job="teacher")`` (same arguments as ``train_teacher``).

    Every rank builds the same teacher (same seed) and trains it with
    :func:`fit_distributed` on its shard of the labelled nodes (plain cross-entropy);
    rank 0 writes the run dir.
    """
    from abkd_deploy.data import load_dataset
    from abkd_deploy.distill.graphs import GraphView
    from abkd_deploy.distill.teacher import build_teacher, dataset_ref, write_teacher_run
    from abkd_deploy.distill.trainer import TrainConfig
    from abkd_deploy.staging import staged_directory, write_run_record

    train = train or TrainConfig()
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    data = rank0_first(lambda: load_dataset(dataset, root, split))
    if rank != 0:
        train = replace(train, progress=False)
    model = build_teacher(data, dataset, arch, layers, hidden, dropout, train.seed)
    shard = seed_shard(data, "ce", train.seed, rank, world)
    fit = fit_distributed(model, GraphView(data, device), train, None, None, shard, None)
    digest = state_sha256(model)
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise DistributedError(f"ranks ended with different parameters: {digests}")
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank != 0:
        dist.barrier()  # rank 0 has published
        return None
    extra = {
        "distributed": {
            "world_size": world,
            "backend": dist.get_backend(),
            "peak_rss_mib_per_rank": rss,
            "seed_nodes_per_rank": int(shard.numel()),
            "rank_state_sha256": digest,
        }
    }
    ref = dataset_ref(dataset, root, split)
    try:
        with staged_directory(out, force) as stage:
            metrics = write_teacher_run(stage, model, fit, data, ref, train, start, extra)
            write_run_record(stage, "teacher")
    finally:
        dist.barrier()
    return metrics


def rank0_first(load: Callable[[], T]) -> T:
    """Runs ``load`` on rank 0 first, then on the other ranks (e.g. so rank 0 fills a cache).

    Every rank calls this; the other ranks wait at a barrier until rank 0's ``load``
    returns, then run their own. Returns this rank's result.
    """
    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()  # rank 0 loads (and caches) first
    result = load()
    if rank == 0:
        dist.barrier()
    return result


def _broadcast(objects: list[Any]) -> list[Any]:
    """Rank 0's ``objects`` on every rank (pickled between this run's own processes)."""
    dist.broadcast_object_list(objects, src=0)
    return objects


def _all_seeds(data, teacher, student, kd, train, seeds, stage, device):
    """Trains every seed on this rank; returns ``(SeedResult list, distributed extras)``."""
    from abkd_deploy.distill.graphs import GraphView

    rank, world = dist.get_rank(), dist.get_world_size()
    view = GraphView(data, device)
    shard = seed_shard(data, kd.method, train.seed, rank, world)
    cache = None
    joint = kd.teacher_mode == "joint"
    if kd.method != "ce" and not joint:
        cache = _teacher_shard(view, teacher.to(device), kd.method, shard, stage, rank)
    elif joint and rank == 0:
        print(
            "distributed: --teacher-mode joint fine-tunes the teacher, so its outputs are "
            "not cached: the teacher runs every step (full batch)",
            file=sys.stderr,
        )
    runs, hashes = [], []
    try:
        for s in range(seeds):
            run, digest = _one_seed(
                data, view, teacher, student, kd, replace(train, seed=train.seed + s), shard, cache
            )
            runs.append(run)
            hashes.append(digest)
    finally:
        if cache is not None:
            cache.close()
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    extra = {
        "peak_rss_mib_per_rank": rss,
        "seed_nodes_per_rank": int(shard.numel()),
        "teacher_cache_bytes_per_rank": 0 if cache is None else cache.nbytes,
        "rank_state_sha256": hashes[-1],
    }
    return [r for r in runs if r is not None], extra


def seed_shard(data: Any, method: str, seed: int, rank: int, world: int) -> Tensor:
    """``[n_r]`` global ids of rank ``rank``'s seed nodes (fixed for the whole run).

    Every target row (the labelled ones only for ``ce``), in a permutation seeded by
    ``seed``, then rows ``rank::world``.
    """
    n = int(data.y.size(0))
    nodes = torch.arange(n)
    if method == "ce":
        nodes = nodes[data.train_mask.cpu()]
    perm = torch.randperm(nodes.numel(), generator=torch.Generator().manual_seed(seed))
    return nodes[perm][rank::world].sort().values


def _teacher_shard(view, teacher, method, shard, stage, rank):
    """Teacher outputs, computed once (eval mode), kept for ``shard`` only, memory-mapped."""
    from abkd_deploy.distill.evaluate import full_graph_outputs
    from abkd_deploy.distill.teacher_cache import LOGITS_ONLY, ShardedTeacherCache

    directory = Path(stage) / CACHE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    logits, hiddens = full_graph_outputs(teacher, *view.full(teacher))
    keep = [] if method in LOGITS_ONLY else hiddens
    cache = ShardedTeacherCache.write(directory / f"teacher.rank{rank}.f32", shard, logits, keep)
    del logits, hiddens, keep
    return cache


class DistillModule(nn.Module):
    """The trained parameters of a distillation step in one module, for DDP.

    Holds the student, the objective (its regressors, ABKD's projections and attention)
    and, in joint mode, the teacher; :meth:`forward` returns the step's loss, so DDP
    averages the gradients of all of them.
    """

    def __init__(self, student: nn.Module, objective: nn.Module | None, teacher=None) -> None:
        super().__init__()
        self.student, self.objective, self.teacher = student, objective, teacher

    def forward(
        self,
        inputs: Any,
        graph: Any,
        take: Tensor,
        y: Tensor,
        mask: Tensor,
        edges: Tensor | None,
        teacher_rows: tuple[Tensor, list[Tensor]] | None = None,
        teacher_graph: Any = None,
        held: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss on rows ``take`` of the outputs (``y``, ``mask``: those rows' labels;
        ``held``: their held-out rows, see :func:`~abkd_deploy.distill.trainer.holdout_masks`).

        ``teacher_rows``: the cached teacher outputs of those rows; otherwise (joint) the
        teacher runs on ``teacher_graph`` (inputs, operand) here.
        """
        logits, hiddens = self.student(inputs, graph)
        logits, hiddens = logits[take], [h[take] for h in hiddens]
        if self.objective is None:
            loss = F.cross_entropy(logits[mask].float(), y[mask])
            return loss, {"ce": float(loss.detach())}
        from abkd_deploy.distill.losses import KDBatch

        if teacher_rows is None:
            t_logits, t_hiddens = self.teacher(*teacher_graph)
            t_logits, t_hiddens = t_logits[take], [h[take] for h in t_hiddens]
        else:
            t_logits, t_hiddens = teacher_rows
        loss, terms = self.objective(
            KDBatch(
                student_logits=logits.float(),
                student_hiddens=[h.float() for h in hiddens],
                teacher_logits=t_logits.float().detach(),
                teacher_hiddens=[h.float() for h in t_hiddens],
                y=y,
                train_mask=mask,
                edge_index=edges,
                holdout_mask=held,
            )
        )
        if teacher_rows is None:
            t_ce = F.cross_entropy(t_logits[mask].float(), y[mask])
            loss = loss + t_ce
            terms["teacher_ce"] = float(t_ce.detach())
        return loss, terms


def _one_seed(data, view, teacher, spec, kd, train, shard, cache):
    """One seed on this rank: returns ``(SeedResult on rank 0 else None, state SHA-256)``."""
    from abkd_deploy.distill.graphs import build_for_data
    from abkd_deploy.distill.losses import LayerDims
    from abkd_deploy.distill.run import SeedResult
    from abkd_deploy.seeding import seed_everything

    seed_everything(train.seed)
    model = build_for_data(
        spec.arch,
        data,
        getattr(data, "name", None) or "the dataset",
        hidden=spec.hidden,
        num_layers=spec.layers,
        dropout=spec.dropout,
        role="student",
    )
    joint = kd.teacher_mode == "joint"
    t = copy.deepcopy(teacher) if joint else teacher
    objective = None
    if kd.method != "ce":
        objective = kd.objective(LayerDims(teacher.layer_dims, model.layer_dims, data.num_classes))
    fit = fit_distributed(model, view, train, objective, t if joint else None, shard, cache)
    digest = state_sha256(model)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise DistributedError(f"ranks ended with different parameters: {digests}")
    if dist.get_rank() != 0:
        return None, digest
    attention = None
    if objective is not None and objective.attention() is not None:
        attention = objective.attention().cpu().tolist()
    return SeedResult(train.seed, model.cpu(), fit, attention, t.cpu()), digest


def state_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, then raw float bytes)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit_distributed(
    model: nn.Module,
    view: Any,
    cfg: Any,
    objective: nn.Module | None,
    teacher: nn.Module | None,
    shard: Tensor,
    cache: Any,
) -> Any:
    """The distributed counterpart of :meth:`Trainer.fit` (same optimiser, early stopping
    and returned :class:`FitResult`; the best weights are left in ``model``).

    Args:
        model: The student. view: the rank's ``GraphView``. cfg: ``TrainConfig``
            (``batch_size`` per rank; 0: full batch, the loss on the shard's rows).
        objective: The KD objective (``None``: CE). teacher: a joint-mode teacher.
        shard: ``[n_r]`` this rank's seed nodes. cache: its ``ShardedTeacherCache``.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from abkd_deploy.distill.trainer import FitResult, fit_fanouts, holdout_masks
    from abkd_deploy.progress import Progress

    device, rank = view.device, dist.get_rank()
    if teacher is not None and cfg.batch_size:
        raise ConfigError("--teacher-mode joint needs full-batch training (--batch-size 0)")
    model.to(device)
    params = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if objective is not None:
        objective.to(device)
        owd = cfg.objective_weight_decay
        params.append(
            {
                "params": list(objective.parameters()),
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay if owd is None else owd,
            }
        )
    if teacher is not None:
        teacher.to(device).requires_grad_(True)
        params.append({"params": list(teacher.parameters()), "lr": cfg.teacher_lr})
    module = DistillModule(model, objective, teacher)
    ddp = DDP(  # unused: e.g. a term whose weight is still 0 in the warm-up
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )
    optim = torch.optim.Adam(params, weight_decay=cfg.weight_decay)
    sampler = None
    if cfg.batch_size:
        fanouts = fit_fanouts(cfg.fanouts, model.num_layers)
        sampler = view.sampler(fanouts, model.norm, seed=cfg.seed)
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, int(shard.numel()))
    steps = max(1, math.ceil(max(sizes) / cfg.batch_size)) if cfg.batch_size else 1
    train_mask, held_mask = holdout_masks(view.data.train_mask, objective, cfg.seed)
    y, train_mask = view.data.y.to(device), train_mask.to(device)
    held_mask = None if held_mask is None else held_mask.to(device)
    amp = cfg.amp and device.type == "cuda"
    fail_epoch = _failure_epoch(rank)

    best: tuple[float, int, Any, Any] = (-float("inf"), 0, None, None)
    history: list[dict[str, float]] = []
    seconds = 0.0
    bar = Progress(
        cfg.epochs, f"rank 0/{len(sizes)}", enabled=cfg.progress and rank == 0, unit="epoch"
    )
    for epoch in range(1, cfg.epochs + 1):
        if epoch == fail_epoch:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={rank}) at epoch {epoch}")
        if objective is not None and hasattr(objective, "set_epoch"):
            objective.set_epoch(epoch - 1)
        began = time.perf_counter()
        module.train()
        if teacher is not None:
            teacher.train()
        totals: dict[str, float] = {}
        if sampler is not None:
            sampler.resample(epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
            order = shard[torch.randperm(shard.numel(), generator=gen)]
            chunks = torch.tensor_split(order, steps)
        else:
            chunks = (shard,)
        for chunk in chunks:
            if sampler is not None:
                batch = sampler.sample(chunk)
                inputs, graph, targets, edges = view.batch(batch, model)
                take = torch.arange(batch.batch_size, device=device)
                tgraph = None
            else:
                inputs, graph = view.full(model)
                targets = chunk.to(device)
                take = targets
                edges = None if objective is None else _edges_among(view, targets)
                tgraph = view.full(teacher) if teacher is not None else None
            rows = None if cache is None else cache.rows(targets, device)
            optim.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                held = None if held_mask is None else held_mask[targets]
                loss, terms = ddp(
                    inputs, graph, take, y[targets], train_mask[targets], edges, rows, tgraph, held
                )
            loss.backward()
            optim.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v / len(chunks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        scores = gathered_scores(view, model)
        history.append({"epoch": epoch, **{f"loss/{k}": v for k, v in totals.items()}, **scores})
        bar.update({**totals, "val": scores["val"]})
        if scores["val"] > best[0]:
            t_state = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
            best = (scores["val"], epoch, copy.deepcopy(model.state_dict()), t_state)
        elif epoch - best[1] >= cfg.patience:
            break
    final = history[best[1] - 1]
    bar.close(f"{len(history)} epochs, best epoch {best[1]}: val {final['val']:.4f}")
    model.load_state_dict(best[2])
    if best[3] is not None:
        teacher.load_state_dict(best[3])
    return FitResult(
        best_epoch=best[1],
        scores={k: final[k] for k in ("train", "val", "test")},
        history=history,
        seconds_per_epoch=seconds / len(history),
    )


def _failure_epoch(rank: int) -> int | None:
    """The epoch at which the test hook makes this rank fail, if it names this rank."""
    if os.environ.get(FAIL_RANK_ENV) != str(rank):
        return None
    return int(os.environ.get(FAIL_EPOCH_ENV, "2"))


def _edges_among(view, rows: Tensor) -> Tensor:
    """``[2, E']`` target edges with both ends in ``rows``, relabelled to positions."""
    edges = view.target_edges()
    pos = torch.full((view.num_targets,), -1, dtype=torch.long, device=rows.device)
    pos[rows] = torch.arange(rows.numel(), device=rows.device)
    src, dst = pos[edges[0]], pos[edges[1]]
    keep = (src >= 0) & (dst >= 0)
    return torch.stack([src[keep], dst[keep]])


@torch.no_grad()
def gathered_scores(view: Any, model: nn.Module) -> dict[str, float]:
    """Split scores with each rank scoring rows ``rank::world`` (identical on every rank).

    Accuracy: ``all_reduce`` of correct and total counts; ROC-AUC: the ranks' logits
    gathered and scored whole.
    """
    from abkd_deploy.distill.evaluate import full_graph_outputs, split_scores

    rank, world, data = dist.get_rank(), dist.get_world_size(), view.data
    logits = full_graph_outputs(model, *view.full(model))[0].float()
    mine = torch.arange(rank, logits.size(0), world, device=logits.device)
    if data.metric == "accuracy":
        y = data.y.to(logits.device)[mine]
        right = logits[mine].argmax(1) == y
        counts = []
        for split in ("train", "val", "test"):
            m = getattr(data, f"{split}_mask").to(logits.device)[mine]
            counts += [(right & m).sum(), m.sum()]
        total = torch.stack(counts).double().cpu()
        dist.all_reduce(total)
        return {
            s: float(total[2 * i] / total[2 * i + 1]) if total[2 * i + 1] else float("nan")
            for i, s in enumerate(("train", "val", "test"))
        }
    parts = [None] * world
    dist.all_gather_object(parts, logits[mine].cpu())
    whole = torch.empty_like(logits.cpu())
    for r, part in enumerate(parts):
        whole[r::world] = part
    return split_scores(data, whole)
