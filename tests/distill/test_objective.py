"""Objective: method presets, option routing, normalisation, warm-up, parameters."""

from __future__ import annotations

import pytest
import torch

from abkd_deploy.distill.losses import LayerDims
from abkd_deploy.distill.objective import (
    DEFAULT_ABKD_WARMUP,
    METHODS,
    Objective,
    term_options,
)
from abkd_deploy.errors import ConfigError
from tests.distill.test_losses import DIMS, make_batch


def build(method: str, **kw) -> Objective:
    torch.manual_seed(0)
    return Objective.from_method(method, DIMS, **kw)


def test_methods_registered() -> None:
    assert METHODS.names() == ["abkd", "at", "ce", "fitnet", "gcrd", "kd", "lsp"]


@pytest.mark.parametrize(
    ("method", "weights"),
    [
        ("ce", {"ce": 1.0}),
        ("kd", {"ce": pytest.approx(0.4), "kd": 0.6}),
        ("fitnet", {"ce": pytest.approx(0.4), "kd": 0.6, "fitnet": 2.0}),
        ("at", {"ce": pytest.approx(0.4), "kd": 0.6, "at": 2.0}),
        ("lsp", {"ce": pytest.approx(0.4), "kd": 0.6, "lsp": 2.0}),
        ("gcrd", {"ce": pytest.approx(0.4), "kd": 0.6, "gcrd": 2.0}),
        ("abkd", {"ce": pytest.approx(0.4), "kd": 0.6, "abkd": 2.0}),
    ],
)
def test_method_presets(method: str, weights: dict) -> None:
    obj = build(method, alpha=0.6, beta=2.0, normalize=False)
    assert obj.weights == weights
    assert list(obj.terms) == list(weights)


def test_unknown_method_and_bad_hyperparameters() -> None:
    with pytest.raises(ConfigError, match="unknown KD method 'bogus'"):
        build("bogus")
    with pytest.raises(ConfigError, match="alpha"):
        build("kd", alpha=1.5)
    with pytest.raises(ConfigError, match="beta"):
        build("abkd", beta=-1)
    with pytest.raises(ConfigError, match="tau"):
        build("kd", tau=0)
    with pytest.raises(ConfigError, match="unknown loss"):
        Objective.from_weights({"ce": 1.0, "nope": 1.0}, DIMS)
    with pytest.raises(ConfigError, match="weight"):
        Objective.from_weights({"ce": -1.0}, DIMS)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build("abkd", warmup_epochs=-2)


def test_unknown_or_unused_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        build("abkd", bogus=3)
    with pytest.raises(ConfigError, match="kd_nodes"):
        build("kd", kd_nodes=64)  # an abkd option given to a method without abkd


def test_options_are_routed_to_the_terms_that_take_them() -> None:
    obj = build("abkd", tau=2.0, dissimilarity="similarity", kd_nodes=8, seed=5)
    assert obj.terms["kd"].tau == 2.0
    abkd = obj.terms["abkd"]
    assert (abkd.dissimilarity, abkd.kd_nodes, abkd.seed) == ("similarity", 8, 5)
    combo = Objective.from_weights(
        {"ce": 0.5, "fitnet": 1.0, "at": 1.0}, DIMS, pairs=[(1, 3)], at={"p": 4}
    )
    assert combo.terms["fitnet"].pairs == [(1, 3)] and combo.terms["at"].pairs == [(1, 3)]
    assert combo.terms["at"].p == 4.0
    assert "kd_nodes" in term_options("abkd") and "tau" in term_options("kd")


def test_forward_total_is_weighted_sum_of_values() -> None:
    obj = build("lsp", alpha=0.7, beta=0.5)
    assert not obj.normalize
    total, values = obj(make_batch())
    assert set(values) == {"ce", "kd", "lsp"}
    assert all(isinstance(v, float) for v in values.values())
    expected = 0.3 * values["ce"] + 0.7 * values["kd"] + 0.5 * values["lsp"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_normalize_matches_kd_magnitude_on_first_step_then_stays_fixed() -> None:
    obj = build("abkd", beta=1.0, warmup_epochs=0)  # no warm-up: the full weight at epoch 0
    assert obj.normalize  # default for abkd
    total, values = obj(make_batch(seed=1))
    scale = obj.scale_values()["abkd"]
    assert scale * values["abkd"] == pytest.approx(values["kd"], rel=1e-5)
    assert obj.scale_values()["ce"] == 1.0 and obj.scale_values()["kd"] == 1.0
    expected = 0.3 * values["ce"] + 0.7 * values["kd"] + 1.0 * values["kd"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    obj(make_batch(seed=2))
    assert obj.scale_values()["abkd"] == scale  # fixed after the first call


def test_normalize_scale_is_saved_with_state() -> None:
    obj = build("abkd")
    obj(make_batch(seed=1))
    fresh = build("abkd")
    fresh.load_state_dict(obj.state_dict())
    assert fresh.scale_values() == obj.scale_values()
    fresh(make_batch(seed=7))  # already calibrated: no recalibration
    assert fresh.scale_values() == obj.scale_values()


def test_normalize_not_in_eval_mode_and_optional() -> None:
    obj = build("abkd").eval()
    obj(make_batch())
    assert obj.scale_values()["abkd"] == 1.0
    assert not build("abkd", normalize=False).normalize
    assert build("fitnet", normalize=True).normalize
    assert Objective.from_weights({"ce": 1.0, "kd": 1.0, "abkd": 1.0}, DIMS).normalize
    with pytest.raises(ConfigError, match="normalize"):
        Objective.from_weights({"lsp": 1.0}, DIMS, normalize=True)


def test_warmup_ramps_aux_weights() -> None:
    obj = build("abkd", beta=2.0, warmup_epochs=4, normalize=False)
    ramp = []
    for epoch in (0, 2, 4, 10):
        obj.set_epoch(epoch)
        ramp.append(obj.effective_weights()["abkd"])
    assert ramp == [0.0, 1.0, 2.0, 2.0]
    assert obj.effective_weights()["kd"] == pytest.approx(0.7)  # base terms never ramp
    obj.set_epoch(0)
    total, values = obj(make_batch())
    assert total.item() == pytest.approx(0.3 * values["ce"] + 0.7 * values["kd"], rel=1e-5)


def test_parameters_are_distillation_only_and_get_gradients() -> None:
    obj = build("abkd", warmup_epochs=0)
    names = {n for n, _ in obj.named_parameters()}
    assert names and all(n.startswith("terms.abkd.") for n in names)
    assert list(build("kd").parameters()) == []
    b = make_batch()
    total, _ = obj(b)
    total.backward()
    assert all(p.grad is not None for p in obj.parameters())
    assert b.student_logits.grad is not None and b.student_hiddens[0].grad is not None
    assert all(h.grad is None for h in b.teacher_hiddens)
    a = obj.attention()
    assert a is not None and a.shape == (len(DIMS.student), len(DIMS.teacher))
    assert build("kd").attention() is None


def test_abkd_warms_up_by_default_others_do_not() -> None:
    obj = build("abkd")
    assert obj.warmup_epochs == DEFAULT_ABKD_WARMUP > 0
    assert obj.effective_weights()["abkd"] == 0.0  # epoch 0: CE + KD only
    total, values = obj(make_batch(seed=1))
    assert total.item() == pytest.approx(0.3 * values["ce"] + 0.7 * values["kd"], rel=1e-5)
    scale = obj.scale_values()["abkd"]
    assert scale * values["abkd"] == pytest.approx(values["kd"], rel=1e-5)  # calibrated anyway
    obj.set_epoch(DEFAULT_ABKD_WARMUP)
    assert obj.effective_weights()["abkd"] == pytest.approx(scale)
    assert build("abkd", warmup_epochs=0).warmup_epochs == 0
    assert build("lsp").warmup_epochs == 0 and build("kd").warmup_epochs == 0


def test_deterministic_given_seed() -> None:
    runs = [build("abkd", kd_nodes=6)(make_batch())[0].item() for _ in range(2)]
    assert runs[0] == runs[1]


def test_other_dims_work() -> None:
    dims = LayerDims(teacher=[16] * 6, student=[4, 3], num_classes=3)
    torch.manual_seed(0)
    obj = Objective.from_method("abkd", dims, dissimilarity="similarity", kd_nodes=8)
    total, values = obj(make_batch(dims, n=20))
    assert torch.isfinite(total) and set(values) == {"ce", "kd", "abkd"}
