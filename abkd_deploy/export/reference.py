"""The PyTorch side of an export: the run's dataset, the fanout tables and scored test
nodes (:func:`export_context`), and the student's own scores on the same graph the
artifact sees (:func:`reference_scores`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from abkd_deploy.data import load_dataset
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.data.typed_graph import is_typed
from abkd_deploy.distill.graphs import check_arch_for_data
from abkd_deploy.errors import CheckpointError
from abkd_deploy.export.adjacency import AdjacencyFormat, ExportContext, batched
from abkd_deploy.export.typed_context import check_typed_run, typed_export_context, typed_scores
from abkd_deploy.models.base import GNN
from abkd_deploy.scoring import score

#: At most this many test nodes are scored (a seeded random subset above it).
MAX_EVAL_NODES = 100_000


def load_run_dataset(run_dir: Path, meta: dict[str, Any], student: GNN) -> Data:
    """Reloads the dataset named in ``student.json`` and checks it fits the student."""
    ref = meta.get("dataset")
    if not isinstance(ref, dict) or not ref.get("name"):
        raise CheckpointError(
            f"{run_dir / 'student.json'} names no dataset; expected a 'dataset' entry "
            "{'name', 'root', 'split'}"
        )
    data = load_dataset(ref["name"], ref.get("root"), ref.get("split"))
    if is_typed(data) or getattr(student, "typed", False):
        check_arch_for_data(student.arch, data, ref["name"], "student")
        check_typed_run(student, data, ref["name"])
        return data
    if data.num_features != student.in_channels or int(data.num_classes) != student.out_channels:
        raise CheckpointError(
            f"the student expects {student.in_channels} features / {student.out_channels} "
            f"classes but dataset {ref['name']!r} has {data.num_features} / {data.num_classes}"
        )
    return data


def eval_ids(data: Data, seed: int) -> Tensor:
    """Sorted test node ids to score (at most :data:`MAX_EVAL_NODES`, seeded subset)."""
    ids = data.test_mask.nonzero().reshape(-1)
    if ids.numel() > MAX_EVAL_NODES:
        gen = torch.Generator().manual_seed(int(seed))
        ids = ids[torch.randperm(ids.numel(), generator=gen)[:MAX_EVAL_NODES]].sort().values
    return ids


def export_context(
    adjacency: AdjacencyFormat,
    student: GNN,
    data: Data,
    fanouts: str | int | Sequence[int | str] | None,
    seed: int,
    dtype: str = "float32",
    precompute: bool | str = False,
) -> ExportContext:
    """The CSR, fanout tables (``adjacency.fanouts``, seeded) and scored test nodes.

    Raises:
        ConfigError: a bad fanout value or count.
    """
    if is_typed(data):
        ids = eval_ids(data, seed)
        return typed_export_context(adjacency, student, data, fanouts, seed, ids, dtype, precompute)
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    ks = adjacency.fanouts(fanouts, student.num_layers, csr.max_degree)
    sampler = NeighborSampler(csr, ks, student.norm, seed=seed)
    return ExportContext(student, data, csr, ks, sampler, eval_ids(data, seed), dtype, precompute)


@dataclass(frozen=True)
class ReferenceScores:
    """The PyTorch student's scores that every artifact is compared with.

    Attributes:
        labels: [len(eval_ids)] labels of the scored test nodes.
        student: Score on the graph the artifact sees (its fanout tables).
        exact_graph: Score on the exact graph.
    """

    labels: np.ndarray
    student: float
    exact_graph: float


def reference_scores(ctx: ExportContext, exact_graph: bool) -> ReferenceScores:
    """Scores of the PyTorch student on ``ctx.eval_ids`` (``exact_graph``: the artifact
    sees the whole graph, so the student does too)."""
    if ctx.typed:
        return ReferenceScores(*typed_scores(ctx, exact_graph))
    labels = ctx.data.y[ctx.eval_ids].numpy()
    student = score(ctx.data.metric, labels, student_logits(ctx, exact_graph))
    exact = exact_graph_score(ctx.student, ctx.data, ctx.csr, ctx.eval_ids)
    return ReferenceScores(labels, student, exact)


@torch.no_grad()
def student_logits(ctx: ExportContext, exact_graph: bool) -> np.ndarray:
    """The PyTorch student's logits on ``eval_ids`` with the same graph the artifact sees.

    Padded forms (``ell``/``embedded``): the student on :class:`EllBlock` s from the
    export's fanout tables (the same fanout); ``exact_graph`` (``coo``): the student on
    the exact :class:`FullGraph`.
    """
    student, data = ctx.student, ctx.data
    if exact_graph:
        full = student(data.x, FullGraph(ctx.csr, student.norm))[0]
        return full[ctx.eval_ids].float().numpy()

    def batch(ids: Tensor) -> np.ndarray:
        b = ctx.sampler.sample(ids)
        return student(data.x[b.n_id], b.blocks)[0].float().numpy()

    return batched(ctx, batch)


@torch.no_grad()
def exact_graph_score(student: GNN, data: Data, csr: CSR, eval_ids: torch.Tensor) -> float:
    """Score of the student on the exact graph (``FullGraph``) at ``eval_ids``."""
    logits = student(data.x, FullGraph(csr, student.norm))[0][eval_ids]
    return score(data.metric, data.y[eval_ids].numpy(), logits.float().numpy())
