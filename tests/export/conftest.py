"""Small trained run directories for the export tests (2-layer students on a 600-node csbm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from abkd_deploy.data import load_dataset
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.models import build_model, save_model

DATASET = "csbm:num_nodes=600"


def make_run(
    directory: Path,
    arch: str,
    dataset: str = DATASET,
    root: str | None = None,
    epochs: int = 20,
    hidden: int = 16,
    metrics: dict | None = None,
    dropout: float = 0.5,
    lr: float = 0.01,
) -> Path:
    """Trains a 2-layer ``arch`` student with a plain full-batch loop and saves it."""
    data = load_dataset(dataset, root)
    torch.manual_seed(0)
    model = build_model(
        arch,
        in_channels=data.num_features,
        hidden=hidden,
        out_channels=data.num_classes,
        num_layers=2,
        dropout=dropout,
    )
    graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, model.norm)
    optim = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        optim.zero_grad()
        logits = model(data.x, graph)[0]
        F.cross_entropy(logits[data.train_mask], data.y[data.train_mask]).backward()
        optim.step()
    extra = {"dataset": {"name": dataset, "root": root, "split": None}}
    save_model(model.eval(), directory, "student", extra=extra)
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


@pytest.fixture(scope="session")
def gcn_run(tmp_path_factory) -> Path:
    metrics = {
        "method": "abkd",
        "compression_ratio": 31.5,
        "teacher": {"test_acc": 0.9, "params": 35000},
        "student": {"test_acc": 0.8, "params": 1125},
    }
    return make_run(tmp_path_factory.mktemp("gcn_run"), "gcn", metrics=metrics)


@pytest.fixture(scope="session")
def sage_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("sage_run"), "sage")


@pytest.fixture(scope="session")
def csbm_data():
    return load_dataset(DATASET)


@pytest.fixture(scope="session")
def gcn_embedded(gcn_run, tmp_path_factory) -> tuple[Path, dict]:
    """gcn student exported as embedded onnx + torchscript + pt2."""
    from abkd_deploy.export import export

    out = tmp_path_factory.mktemp("exports") / "gcn_embedded"
    manifest = export(gcn_run, out, formats=("onnx", "torchscript", "pt2"), progress=False)
    return out, manifest


@pytest.fixture(scope="session")
def ell_exports(gcn_run, sage_run, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """gcn and sage students exported as ell onnx with exact fanout."""
    from abkd_deploy.export import export

    base = tmp_path_factory.mktemp("ell")
    out = {}
    for arch, run in (("gcn", gcn_run), ("sage", sage_run)):
        path = base / arch
        out[arch] = (path, export(run, path, adjacency="ell", fanouts="max", progress=False))
    return out


#: A tiny typed graph (4 node types, 7 relations with the reverse ones, 200 papers).
TYPED_DATASET = "csbm-mag:num_papers=200,num_features=16,num_classes=4"


def make_typed_run(
    directory: Path, arch: str, dataset: str = TYPED_DATASET, epochs: int = 20
) -> Path:
    """Trains a 2-layer typed ``arch`` student (hidden 8, emb_dim 8) full-batch and saves it."""
    from abkd_deploy.data.typed_blocks import TypedBlock

    data = load_dataset(dataset)
    torch.manual_seed(0)
    model = build_model(
        arch,
        hidden=8,
        out_channels=data.num_classes,
        num_layers=2,
        dropout=0.0,
        schema=data.schema(),
        emb_dim=8,
    )
    graph = TypedBlock.full_graph(data, model.norm)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        optim.zero_grad()
        logits = model(model.inputs(data), graph)[0]
        F.cross_entropy(logits[data.train_mask], data.y[data.train_mask]).backward()
        optim.step()
    extra = {"dataset": {"name": dataset, "root": None, "split": None}}
    save_model(model.eval(), directory, "student", extra=extra)
    return directory


@pytest.fixture(scope="session")
def typed_data():
    return load_dataset(TYPED_DATASET)


@pytest.fixture(scope="session")
def rgcn_run(tmp_path_factory) -> Path:
    return make_typed_run(tmp_path_factory.mktemp("rgcn_run"), "rgcn")


@pytest.fixture(scope="session")
def rsage_run(tmp_path_factory) -> Path:
    return make_typed_run(tmp_path_factory.mktemp("rsage_run"), "rsage")
