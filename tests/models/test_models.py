import json

import pytest
import torch

from abkd_deploy.data.csbm import CSBMConfig, generate_csbm
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.models import MODELS, build_model, count_parameters, load_model, save_model

ARCHS = ["gcn", "sage", "gat", "gcnii", "mlp"]


@pytest.fixture(scope="module")
def data():
    return generate_csbm(CSBMConfig(num_nodes=300, num_features=10, num_classes=3))


def test_registry_names():
    typed = ["res-rgcn", "rgcn", "rsage"]  # tests/models/test_rgcn.py, test_res_rgcn.py
    assert MODELS.names() == sorted([*ARCHS, *typed])
    with pytest.raises(ConfigError, match=r"unknown architecture .gin.*gcnii"):
        build_model("gin", in_channels=3, hidden=4, out_channels=2, num_layers=2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [1, 3])
def test_outputs_and_hiddens(data, arch, layers):
    model = build_model(arch, in_channels=10, hidden=8, out_channels=3, num_layers=layers)
    logits, hiddens = model(data.x, FullGraph.from_edge_index(data.edge_index, 300, model.norm))
    assert logits.shape == (300, 3)
    assert len(hiddens) == layers
    assert [h.shape[1] for h in hiddens] == model.layer_dims
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_count_grows_with_width():
    small = build_model("gcn", in_channels=10, hidden=4, out_channels=3, num_layers=2)
    big = build_model("gcn", in_channels=10, hidden=64, out_channels=3, num_layers=2)
    assert count_parameters(small) == 10 * 4 + 4 + 4 * 3 + 3
    assert count_parameters(big) > 10 * count_parameters(small)


@pytest.mark.parametrize("bad", [{"hidden": 0}, {"num_layers": 0}, {"dropout": 1.0}])
def test_bad_model_config(bad):
    cfg = {"in_channels": 4, "hidden": 8, "out_channels": 2, "num_layers": 2, **bad}
    with pytest.raises(ConfigError):
        build_model("sage", **cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(tmp_path, data, arch):
    model = build_model(arch, in_channels=10, hidden=8, out_channels=3, num_layers=2).eval()
    save_model(model, tmp_path, "student", extra={"dataset": {"name": "csbm"}})
    loaded, meta = load_model(tmp_path, "student")
    assert meta["dataset"]["name"] == "csbm" and meta["model"]["arch"] == arch
    graph = FullGraph.from_edge_index(data.edge_index, 300, model.norm)
    with torch.no_grad():
        assert torch.equal(model(data.x, graph)[0], loaded(data.x, graph)[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="student.json is missing"):
        load_model(tmp_path, "student")
    model = build_model("gcn", in_channels=10, hidden=8, out_channels=3, num_layers=2)
    save_model(model, tmp_path, "student")
    (tmp_path / "student.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path, "student")
    save_model(model, tmp_path, "student")
    meta = json.loads((tmp_path / "student.json").read_text())
    meta["model"]["hidden"] = 16
    (tmp_path / "student.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path, "student")
