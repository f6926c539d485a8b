"""Full-graph inference and split scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

from abkd_deploy.distill.graphs import GraphView
from abkd_deploy.models.base import GNN
from abkd_deploy.scoring import score


@torch.no_grad()
def full_graph_outputs(model: GNN, x: Any, graph) -> tuple[Tensor, list[Tensor]]:
    """Model outputs on every node, in eval mode (restores the previous mode).

    ``x``: ``[N, F]`` features, or a typed model's input dict (:meth:`TypedGNN.inputs`).
    """
    was_training = model.training
    model.eval()
    try:
        return model(x, graph)
    finally:
        model.train(was_training)


def dataset_outputs(model: GNN, data: Any) -> tuple[Tensor, list[Tensor]]:
    """Eval-mode outputs of ``model`` on every target row of ``data`` (homogeneous or
    typed), on the model's device: logits ``[N_target, C]`` and the hidden list."""
    device = next(model.parameters()).device
    return full_graph_outputs(model, *GraphView(data, device).full(model))


def split_scores(data: Data, logits: Tensor) -> dict[str, float]:
    """``{"train", "val", "test"}`` scores of ``logits`` under ``data.metric``.

    ``logits``: ``[N_target, C]`` (every node of a homogeneous graph, the target type of a
    typed one, whose ``y`` and masks are on that type).
    """
    y = data.y.cpu().numpy()
    z = logits.detach().float().cpu().numpy()
    out = {}
    for split in ("train", "val", "test"):
        mask = getattr(data, f"{split}_mask").cpu().numpy()
        out[split] = score(data.metric, y[mask], z[mask])
    return out
