"""Shared by the live-graph benchmarks: a 2-layer student of a ``csbm`` graph, saved as a
run directory that ``abkd_deploy.export.export`` takes (full-batch training, accuracy is not
the point)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch_geometric.data import Data

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.models import build_model, save_model


def csbm_student_run(run_dir: Path, num_nodes: int, arch: str, hidden: int, epochs: int) -> Data:
    """Trains ``arch`` 2 x ``hidden`` on ``csbm:num_nodes=N`` for ``epochs`` full-batch
    epochs (0: untrained), saves it to ``run_dir`` and returns the dataset."""
    name = f"csbm:num_nodes={num_nodes}"
    data = load_dataset(name)
    torch.manual_seed(0)
    model = build_model(
        arch,
        in_channels=data.num_features,
        hidden=hidden,
        out_channels=data.num_classes,
        num_layers=2,
    )
    if epochs:
        graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, model.norm)
        optim = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(epochs):
            optim.zero_grad()
            out = model(data.x, graph)[0]
            F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
            optim.step()
    extra = {"dataset": {"name": name, "root": None, "split": None}}
    save_model(model.eval(), run_dir, "student", extra=extra)
    return data
