"""ABKD attention variants of issue 15: align, entropy, prior, the joint-mode teacher anchor."""

from __future__ import annotations

import math

import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.distill.losses import LOSSES, KDBatch, LayerDims
from abkd_deploy.distill.losses.abkd_attention import (
    holdout_split,
    row_entropy,
    softmax_entropy_floor,
    standardize_rows,
)
from abkd_deploy.distill.objective import Objective
from abkd_deploy.distill.trainer import TrainConfig, Trainer
from abkd_deploy.errors import ConfigError
from abkd_deploy.models import build_model

DIMS = LayerDims(teacher=[8, 8, 8, 4], student=[5, 4], num_classes=4)


def connected_batch(n: int = 30, seed: int = 0, teacher_grad: bool = False) -> KDBatch:
    """A batch whose student logits are computed from its hidden layer (a tiny 2-layer MLP),
    so that the task loss has a gradient on every student hidden; the last hidden is the
    logits, as for the GCN/SAGE/GAT students."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w1 = torch.randn(6, DIMS.student[0], generator=g).requires_grad_(True)
    w2 = torch.randn(DIMS.student[0], DIMS.num_classes, generator=g).requires_grad_(True)
    h1 = torch.tanh(x @ w1)
    z = h1 @ w2
    return KDBatch(
        student_logits=z,
        student_hiddens=[h1, z],
        teacher_logits=torch.randn(n, DIMS.num_classes, generator=g),
        teacher_hiddens=[
            torch.randn(n, d, generator=g).requires_grad_(teacher_grad) for d in DIMS.teacher
        ],
        y=torch.randint(0, DIMS.num_classes, (n,), generator=g),
        train_mask=torch.rand(n, generator=g) < 0.5,
        edge_index=torch.zeros(2, 0, dtype=torch.long),
    )


def build(**options):
    torch.manual_seed(0)
    return LOSSES.get("abkd")(DIMS, **options)


def student_grads(loss: torch.Tensor, batch: KDBatch) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, batch.student_hiddens, retain_graph=True))


# ------------------------------------------------------------------ entropy floor
@pytest.mark.parametrize("floor", [0.1, 0.5, 0.9])
def test_entropy_floor_holds_on_peaked_rows(floor: float) -> None:
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0, 50.0]])
    assert (row_entropy(torch.softmax(logits, -1)) < 0.01).all()  # collapsed before
    probs = softmax_entropy_floor(logits, floor)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert (row_entropy(probs) >= floor * math.log(5) - 1e-5).all()
    assert (row_entropy(probs) <= floor * math.log(5) + 1e-3).all()  # smallest temperature
    assert (probs.argmax(-1) == logits.argmax(-1)).all()  # the ranking is kept


def test_entropy_floor_leaves_spread_rows_alone() -> None:
    logits = torch.tensor([[0.1, 0.0, -0.1, 0.2]])
    assert torch.equal(softmax_entropy_floor(logits, 0.5), torch.softmax(logits, -1))
    assert torch.equal(softmax_entropy_floor(logits * 100, 0.0), torch.softmax(logits * 100, -1))


def test_entropy_attention_keeps_floor_when_logits_push_to_collapse() -> None:
    term = build(attention="entropy")
    assert term.entropy_floor == 0.5
    batch = connected_batch()
    _push_rows_to_layer0(term, batch)
    loss = term(batch)
    attn = term.attention()
    assert (row_entropy(attn) >= 0.5 * math.log(len(DIMS.teacher)) - 1e-5).all()
    loss.backward()
    assert term.position.grad is not None and torch.isfinite(term.position.grad).all()
    plain = build()
    with torch.no_grad():
        plain.position.copy_(term.position)
    plain(connected_batch())
    assert (row_entropy(plain.attention()) < 0.01).all()  # the spec's attention collapses


def _push_rows_to_layer0(term, batch: KDBatch) -> None:
    """Sets the position embedding of teacher layer 0 so that ``q_j . e_0 = 1e4`` for
    every row ``j``: every spec softmax row then sits on layer 0."""
    with torch.no_grad():
        pairs = zip(term.query, batch.student_hiddens, strict=True)
        q = torch.stack([w(h.mean(0)) for w, h in pairs])
        term.position.zero_()
        term.position[0] = torch.linalg.lstsq(q, torch.full((2, 1), 1e4)).solution[:, 0]


def test_entropy_floor_also_applies_to_learned() -> None:
    term = build(entropy_floor=0.8)
    _push_rows_to_layer0(term, connected_batch())
    term(connected_batch())
    assert (row_entropy(term.attention()) >= 0.8 * math.log(4) - 1e-5).all()


# ------------------------------------------------------------------ align
def test_alignment_is_inner_product_of_pair_and_task_gradients() -> None:
    term = build(attention="align")
    batch = connected_batch()
    term(batch)
    c = term.last_alignment()
    assert c is not None and c.shape == (2, 4)
    # reference: the task gradient and each pair's gradient by plain autograd
    b = connected_batch()
    logits = b.student_logits
    task = torch.nn.functional.kl_div(
        torch.log_softmax(logits, -1), torch.softmax(b.teacher_logits, -1), reduction="batchmean"
    ) + torch.nn.functional.cross_entropy(logits[b.train_mask], b.y[b.train_mask])
    _assert_alignment_is(c, term, b, task)
    assert not torch.allclose(c, torch.zeros_like(c))


def _assert_alignment_is(c: torch.Tensor, term, b: KDBatch, task: torch.Tensor) -> None:
    """``c[j, i]`` equals ``<dD[j, i]/dH_j, dtask/dH_j>`` taken by plain autograd on ``b``."""
    g = torch.autograd.grad(task, b.student_hiddens)
    for j, h in enumerate(b.student_hiddens):
        for i in range(4):
            hj = h.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_pair_dissimilarity(term, hj, b, j, i), hj)
            assert torch.allclose(c[j, i], (grad * g[j]).sum(), rtol=1e-4, atol=1e-6)


def _pair_dissimilarity(term, h: torch.Tensor, batch: KDBatch, j: int, i: int) -> torch.Tensor:
    """``D[j, i]`` of student layer ``j`` given as ``h``, by the plain (list) formula."""
    from abkd_deploy.distill.losses.dissimilarity import feature_dissimilarity

    a_t = term._map_teacher(batch.teacher_hiddens)
    return feature_dissimilarity([term.regressors[j](h)], [a_t[i]])[0, 0]


def test_align_student_gets_lattn_only_through_d_and_attention_gets_alignment() -> None:
    term = build(attention="align")
    batch = connected_batch()
    loss = term(batch)
    attn, dis = term.attention(), term.last_dissimilarity()
    assert torch.allclose(loss, (attn * dis).sum(1).mean(), atol=1e-6)  # value is L_att
    got = student_grads(loss, batch)
    # the same loss with A a constant: the student's gradient is identical
    fixed = build(attention="align")
    b2 = connected_batch()
    fixed(b2)
    _, dis_graph = _dis_with_graph(fixed, b2)
    want = student_grads((attn * dis_graph).sum(1).mean(), b2)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    loss.backward()
    # attention parameters: gradient of -mean_j sum_i A z(c), not of L_att
    att_params = [*term.query.parameters(), *term.key.parameters(), term.position]
    assert all(p.grad is not None for p in att_params)
    z = standardize_rows(term.last_alignment())
    ref = build(attention="align")
    ref_attn = ref.attention_weights(
        [h.detach() for h in connected_batch().student_hiddens], connected_batch().teacher_hiddens
    )
    (-(ref_attn * z).sum(1).mean()).backward()
    assert torch.allclose(term.position.grad, ref.position.grad, atol=1e-6)


def _dis_with_graph(term, batch: KDBatch):
    from abkd_deploy.distill.losses.dissimilarity import feature_dissimilarity

    a_s = [p(h) for p, h in zip(term.regressors, batch.student_hiddens, strict=True)]
    return None, feature_dissimilarity(a_s, term._map_teacher(batch.teacher_hiddens))


@pytest.mark.slow
def test_align_attention_moves_to_the_most_aligned_layer() -> None:
    term = build(attention="align")
    opt = torch.optim.Adam([*term.query.parameters(), *term.key.parameters(), term.position], 0.1)
    batch = connected_batch(n=60, seed=3)
    term(batch)
    start, c = term.attention().clone(), term.last_alignment()
    for _ in range(25):
        opt.zero_grad()
        term(connected_batch(n=60, seed=3)).backward()
        opt.step()
    end = term.attention()
    best = c.argmax(dim=1)
    rows = torch.arange(2)
    assert (end[rows, best] > start[rows, best] + 0.2).all()
    assert (end.argmax(dim=1) == best).all()
    # on this batch the most aligned layer is not the closest one: the spec's attention,
    # trained the same way, goes to argmin D instead
    assert (term.last_dissimilarity().argmin(dim=1) != best).all()
    plain = build()
    opt2 = torch.optim.Adam(
        [*plain.query.parameters(), *plain.key.parameters(), plain.position], 0.1
    )
    for _ in range(25):
        opt2.zero_grad()
        plain(connected_batch(n=60, seed=3)).backward()
        opt2.step()
    argmin_d = plain.last_dissimilarity().argmin(dim=1)
    assert (plain.attention().argmax(dim=1) == argmin_d).all()


def test_align_without_gradients_is_plain_lattn() -> None:
    term = build(attention="align")
    with torch.no_grad():
        loss = term(connected_batch())
    assert term.last_alignment() is None
    assert torch.allclose(loss, (term.attention() * term.last_dissimilarity()).sum(1).mean())


def test_align_every_reuses_the_alignment_between_updates() -> None:
    term = build(attention="align", align_every=3)
    seen = []
    for k in range(7):
        term(connected_batch(seed=k)).backward()
        seen.append(term.last_alignment())
    fresh = [k for k in range(7) if k == 0 or seen[k] is not seen[k - 1]]
    assert fresh == [0, 3, 6]
    every = build(attention="align")
    every(connected_batch(seed=1))
    assert not torch.allclose(every.last_alignment(), seen[1])  # seed 1's own alignment


# ------------------------------------------------------------------ prior
def test_prior_is_gibbs_of_detached_d_with_zero_lattn_gradient_to_attention() -> None:
    term = build(attention="prior", prior_temperature=0.5)
    g = torch.Generator().manual_seed(1)
    # logits independent of the hiddens: the task gradient on them is zero, so is c
    batch = connected_batch()
    batch.student_logits = torch.randn(30, 4, generator=g).requires_grad_(True)
    batch.student_hiddens = [h.detach().requires_grad_(True) for h in batch.student_hiddens]
    loss = term(batch)
    dis, attn = term.last_dissimilarity(), term.attention()
    assert torch.allclose(attn, torch.softmax(-standardize_rows(dis) / 0.5, dim=1), atol=1e-6)
    assert (row_entropy(attn) > 0.1).all()  # soft, not an argmin
    assert torch.allclose(loss, (attn * dis).sum(1).mean(), atol=1e-6)
    loss.backward()
    # D reaches the prior b neither through A's value nor its gradient path
    assert term.prior.grad is None or torch.count_nonzero(term.prior.grad) == 0
    # the student's gradient is that of sum A D with A constant (no path through A)
    b2 = connected_batch()
    b2.student_hiddens = [h.detach().requires_grad_(True) for h in b2.student_hiddens]
    _, dis_graph = _dis_with_graph(build(attention="prior"), b2)
    want = torch.autograd.grad((attn * dis_graph).sum(1).mean(), b2.student_hiddens)
    for a, b in zip(batch.student_hiddens, want, strict=True):
        assert torch.allclose(a.grad, b, atol=1e-6)


def test_prior_learns_from_alignment() -> None:
    term = build(attention="prior")
    term(connected_batch()).backward()
    assert term.prior.grad is not None and term.prior.grad.abs().sum() > 0
    z = standardize_rows(term.last_alignment())
    a = term.attention()
    want = -(a * (z - (a * z).sum(1, keepdim=True))) / 2  # softmax gradient, mean over 2 rows
    assert torch.allclose(term.prior.grad, want, atol=1e-6)


# ------------------------------------------------------------------ joint-mode anchor
def test_teacher_anchor_pulls_teacher_towards_its_snapshot() -> None:
    term = build(teacher_anchor=2.0)
    batch = connected_batch(teacher_grad=True)
    first = term(batch)
    assert torch.allclose(first, (term.attention() * term.last_dissimilarity()).sum(1).mean())
    moved = connected_batch(teacher_grad=True)
    moved.teacher_hiddens = [
        (h.detach() + 0.5 * torch.randn_like(h)).requires_grad_(True) for h in moved.teacher_hiddens
    ]
    loss = term(moved)
    l_att = (term.attention() * term.last_dissimilarity()).sum(1).mean()
    assert loss - l_att > 0.05  # the anchor term
    loss.backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in moved.teacher_hiddens)
    frozen = build(teacher_anchor=2.0)
    b = connected_batch()  # frozen teacher: no anchor
    assert torch.allclose(
        frozen(b), (frozen.attention() * frozen.last_dissimilarity()).sum(1).mean()
    )


# ------------------------------------------------------------------ options and integration
@pytest.mark.parametrize(
    "options",
    [
        {"attention": "hard"},
        {"entropy_floor": 1.0},
        {"entropy_floor": -0.1},
        {"entropy_floor": "high"},
        {"prior_temperature": 0},
        {"teacher_anchor": -1},
        {"align_every": 0},
        {"attention": "align", "holdout": 1.0},
        {"attention": "prior", "holdout": -0.2},
        {"holdout": 0.2},  # the spec's attention has no alignment to train on them
    ],
)
def test_bad_variant_options(options) -> None:
    with pytest.raises(ConfigError, match=list(options)[-1]):
        build(**options)


def test_learned_stays_the_default_and_variants_route_through_objective() -> None:
    assert build().attention_mode == "learned" and build().entropy_floor == 0.0
    for mode in ("learned", "uniform", "align", "entropy", "prior"):
        obj = Objective.from_method("abkd", DIMS, attention=mode, warmup_epochs=0)
        obj.train()
        total, _ = obj(connected_batch())
        assert torch.isfinite(total) and obj.terms["abkd"].attention_mode == mode
        total.backward()


def tiny_setup():
    """A small csbm graph, a 3-layer GCN teacher and a 2-layer GCN student (seeded)."""
    data = load_dataset("csbm:num_nodes=400,num_features=16,num_classes=4,homophily=0.85")
    torch.manual_seed(0)
    teacher = build_model("gcn", in_channels=16, hidden=16, out_channels=4, num_layers=3)
    student = build_model("gcn", in_channels=16, hidden=4, out_channels=4, num_layers=2)
    return data, teacher, student, LayerDims(teacher.layer_dims, student.layer_dims, 4)


@pytest.mark.parametrize("mode", ["align", "prior"])
def test_variant_trains_a_student_end_to_end(mode: str) -> None:
    data, teacher, student, dims = tiny_setup()
    obj = Objective.from_method("abkd", dims, attention=mode, warmup_epochs=2)
    cfg = TrainConfig(epochs=8, patience=8, progress=False, device="cpu")
    result = Trainer(student, data, cfg, objective=obj, teacher=teacher).fit()
    attn = obj.attention()
    assert attn.shape == (2, 3) and torch.allclose(attn.sum(1), torch.ones(2))
    assert obj.terms["abkd"].last_alignment() is not None
    assert all(math.isfinite(h["loss/abkd"]) for h in result.history)


# ------------------------------------------------------------------ held-out split
def test_holdout_split_is_a_seeded_partition_of_the_labelled_rows() -> None:
    mask = torch.zeros(100, dtype=torch.bool)
    mask[torch.arange(0, 100, 3)] = True  # 34 labelled rows
    kept, held = holdout_split(mask, 0.25, seed=3)
    assert not (kept & held).any() and torch.equal(kept | held, mask)
    assert int(held.sum()) == round(0.25 * 34)
    again, held_again = holdout_split(mask, 0.25, seed=3)
    assert torch.equal(held, held_again) and torch.equal(kept, again)
    assert not torch.equal(holdout_split(mask, 0.25, seed=4)[1], held)
    # never everything, never nothing
    assert int(holdout_split(mask, 0.999, seed=0)[0].sum()) == 1
    assert int(holdout_split(mask, 0.001, seed=0)[1].sum()) == 1
    kept, held = holdout_split(mask, 0.0, seed=0)
    assert torch.equal(kept, mask) and not held.any()


def test_holdout_alignment_uses_the_held_out_cross_entropy_only() -> None:
    term = build(attention="align", holdout=0.3)
    b = connected_batch()
    held = torch.zeros_like(b.train_mask)
    held[~b.train_mask] = True  # rows the CE of this batch does not use
    b.holdout_mask = held
    term(b)
    c = term.last_alignment()
    ref = connected_batch()
    logits = ref.student_logits
    task = torch.nn.functional.cross_entropy(logits[held], ref.y[held])
    _assert_alignment_is(c, term, ref, task)
    # a batch without held-out rows keeps the last alignment
    empty = connected_batch(seed=1)
    empty.holdout_mask = torch.zeros_like(empty.train_mask)
    term(empty)
    assert torch.equal(term.last_alignment(), c)


@pytest.mark.parametrize("batch_size", [0, 128])
def test_holdout_labels_never_reach_the_students_cross_entropy(batch_size: int) -> None:
    data, teacher, student, dims = tiny_setup()
    obj = Objective.from_method("abkd", dims, attention="prior", holdout=0.4, warmup_epochs=0)
    assert obj.holdout_fraction() == 0.4
    seen: list[KDBatch] = []
    forward = obj.forward

    def spy(batch: KDBatch):
        seen.append(batch)
        return forward(batch)

    obj.forward = spy
    cfg = TrainConfig(epochs=3, patience=3, progress=False, device="cpu", batch_size=batch_size)
    trainer = Trainer(student, data, cfg, objective=obj, teacher=teacher)
    labelled = int(data.train_mask.sum())
    assert int(trainer.holdout_mask.sum()) == round(0.4 * labelled)
    assert torch.equal(trainer.train_mask | trainer.holdout_mask, data.train_mask)
    trainer.fit()
    assert seen and all(b.holdout_mask is not None for b in seen)
    assert all(not (b.train_mask & b.holdout_mask).any() for b in seen)
    assert sum(int(b.holdout_mask.sum()) for b in seen) > 0
    assert obj.terms["abkd"].last_alignment() is not None
    # without the option nothing is held out
    plain = Objective.from_method("abkd", dims, attention="prior", warmup_epochs=0)
    t2 = Trainer(student, data, cfg, objective=plain, teacher=teacher)
    assert t2.holdout_mask is None and torch.equal(t2.train_mask, data.train_mask)
