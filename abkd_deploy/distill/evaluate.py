"""Full-graph inference and split scores."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data

from abkd_deploy.metrics import score
from abkd_deploy.models.base import GNN


@torch.no_grad()
def full_graph_outputs(model: GNN, x: Tensor, graph) -> tuple[Tensor, list[Tensor]]:
    """Model outputs on every node, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    try:
        return model(x, graph)
    finally:
        model.train(was_training)


def split_scores(data: Data, logits: Tensor) -> dict[str, float]:
    """``{"train", "val", "test"}`` scores of ``logits`` under ``data.metric``."""
    y = data.y.cpu().numpy()
    z = logits.detach().float().cpu().numpy()
    out = {}
    for split in ("train", "val", "test"):
        mask = getattr(data, f"{split}_mask").cpu().numpy()
        out[split] = score(data.metric, y[mask], z[mask])
    return out
