"""The PyTorch side of an export: the run's dataset, the scored test nodes, and the
student's own accuracy on the same graph the artifact sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from abkd_deploy.data import load_dataset
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.errors import CheckpointError
from abkd_deploy.export.adjacency import ExportContext, batched
from abkd_deploy.metrics import score
from abkd_deploy.models.base import GNN

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


@torch.no_grad()
def student_logits(ctx: ExportContext, adjacency: str) -> np.ndarray:
    """The PyTorch student's logits on ``eval_ids`` with the same graph the artifact sees.

    ``ell``/``embedded``: the student on :class:`EllBlock` s from the export's fanout
    tables (the same fanout); ``coo``: the student on the exact :class:`FullGraph`.
    """
    student, data = ctx.student, ctx.data
    if adjacency == "coo":
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
