import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.distill.trainer import TrainConfig, Trainer
from abkd_deploy.errors import ConfigError, DeviceError
from abkd_deploy.models import build_model
from abkd_deploy.seeding import seed_everything

DATASET = "csbm:num_nodes=1500,num_features=16,num_classes=4,homophily=0.85,train_ratio=0.1"


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATASET)


def _model(arch="gcn", layers=2):
    return build_model(arch, in_channels=16, hidden=16, out_channels=4, num_layers=layers)


def test_full_batch_training_learns(data):
    cfg = TrainConfig(epochs=60, patience=60, progress=False, device="cpu")
    result = Trainer(_model(), data, cfg).fit()
    assert result.scores["val"] > 0.6  # chance is 0.25
    assert 1 <= result.best_epoch <= len(result.history) <= 60
    assert result.seconds_per_epoch > 0


@pytest.mark.slow
def test_mini_batch_training_learns(data):
    cfg = TrainConfig(
        epochs=25, patience=25, progress=False, device="cpu", batch_size=64, fanouts=(5, 5)
    )
    result = Trainer(_model("sage"), data, cfg).fit()
    assert result.scores["val"] > 0.6


def test_early_stopping_and_best_weights_restored(data):
    cfg = TrainConfig(epochs=200, patience=3, lr=0.05, progress=False, device="cpu")
    model = _model()
    result = Trainer(model, data, cfg).fit()
    assert len(result.history) < 200
    assert result.history[result.best_epoch - 1]["val"] == max(h["val"] for h in result.history)


def test_deterministic_with_seed(data):
    runs = []
    for _ in range(2):
        cfg = TrainConfig(epochs=5, patience=5, progress=False, device="cpu", seed=11)
        seed_everything(11)
        model = _model()
        Trainer(model, data, cfg).fit()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_an_error(data):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        Trainer(_model(), data, TrainConfig(device="cuda", progress=False))


def test_bad_configs(data):
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=-1)
    with pytest.raises(ConfigError, match="teacher"):
        Trainer(_model(), data, TrainConfig(progress=False), objective=object())


@pytest.mark.cuda
def test_training_on_cuda(data):
    cfg = TrainConfig(epochs=30, patience=30, progress=False, device="cuda")
    model = _model()
    result = Trainer(model, data, cfg).fit()
    assert next(model.parameters()).device.type == "cuda"
    assert result.scores["val"] > 0.5


def test_objective_params_have_their_own_weight_decay(data, monkeypatch):
    from abkd_deploy.distill.losses import LayerDims
    from abkd_deploy.distill.objective import Objective

    teacher = _model(layers=3)
    original = torch.optim.Adam
    for owd, expected in ((None, 5e-4), (0.0, 0.0)):
        student = _model()
        obj = Objective.from_method(
            "abkd", LayerDims(teacher.layer_dims, student.layer_dims, 4), warmup_epochs=0
        )
        cfg = TrainConfig(
            epochs=2, patience=2, progress=False, device="cpu", objective_weight_decay=owd
        )
        captured = []

        def spy(params, captured=captured, **kw):
            captured.append([dict(g) for g in params])
            return original(params, **kw)

        monkeypatch.setattr(torch.optim, "Adam", spy)
        Trainer(student, data, cfg, objective=obj, teacher=teacher).fit()
        student_group, objective_group = captured[0]
        assert objective_group["weight_decay"] == expected
        assert "weight_decay" not in student_group  # the student keeps cfg.weight_decay
