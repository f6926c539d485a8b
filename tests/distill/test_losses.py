"""Loss terms on random tensors: shape, finiteness, minima, gradients, options, determinism."""

from __future__ import annotations

import pytest
import torch

from abkd_deploy.distill.losses import LOSSES, KDBatch, LayerDims, LossTerm, proportional_layer
from abkd_deploy.distill.losses.abkd import fixed_orthogonal
from abkd_deploy.distill.losses.dissimilarity import (
    feature_dissimilarity,
    similarity_dissimilarity,
)
from abkd_deploy.errors import ConfigError

ALL_TERMS = ["ce", "kd", "fitnet", "at", "lsp", "gcrd", "abkd"]
DIMS = LayerDims(teacher=[8, 8, 8, 4], student=[5, 4], num_classes=4)


def random_edges(n: int, num_edges: int, g: torch.Generator) -> torch.Tensor:
    """A ring (every node has an incoming edge) plus random extra edges."""
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    extra = torch.randint(0, n, (2, num_edges), generator=g)
    return torch.cat([ring, extra], dim=1)


def make_batch(
    dims: LayerDims = DIMS, n: int = 16, seed: int = 0, teacher_grad: bool = False
) -> KDBatch:
    """Random batch; student tensors are leaves that require grad, teacher ones are frozen."""
    g = torch.Generator().manual_seed(seed)

    def leaf(rows: int, cols: int, grad: bool) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g).requires_grad_(grad)

    return KDBatch(
        student_logits=leaf(n, dims.num_classes, True),
        student_hiddens=[leaf(n, d, True) for d in dims.student],
        teacher_logits=leaf(n, dims.num_classes, teacher_grad),
        teacher_hiddens=[leaf(n, d, teacher_grad) for d in dims.teacher],
        y=torch.randint(0, dims.num_classes, (n,), generator=g),
        train_mask=torch.rand(n, generator=g) < 0.5,
        edge_index=random_edges(n, 3 * n, g),
    )


def mirrored_batch(dims: LayerDims, n: int = 16, scale: float = 1.0) -> KDBatch:
    """Student hiddens/logits equal to the teacher's (times ``scale``); needs equal dims."""
    b = make_batch(dims, n)
    b.student_hiddens = [(scale * h).detach().requires_grad_(True) for h in b.teacher_hiddens]
    b.student_logits = b.teacher_logits.detach().clone().requires_grad_(True)
    return b


def build(name: str, dims: LayerDims = DIMS, **options) -> LossTerm:
    torch.manual_seed(0)
    return LOSSES.get(name)(dims, **options)


def student_tensors(b: KDBatch) -> list[torch.Tensor]:
    return [b.student_logits, *b.student_hiddens]


def test_all_terms_registered() -> None:
    assert sorted(ALL_TERMS) == LOSSES.names()


@pytest.mark.parametrize("name", ALL_TERMS)
def test_scalar_finite_and_gradients(name: str) -> None:
    term = build(name)
    b = make_batch()
    loss = term(b)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [t.grad for t in student_tensors(b) if t.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    for t in [b.teacher_logits, *b.teacher_hiddens]:
        assert t.grad is None  # frozen teacher: nothing flows back
    for pname, p in term.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ALL_TERMS)
def test_deterministic_given_seed(name: str) -> None:
    runs = []
    for _ in range(2):
        term = build(name, kd_nodes=6) if name == "abkd" else build(name)
        runs.append([term(make_batch(seed=s)).item() for s in range(3)])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", ALL_TERMS)
def test_unknown_option_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="bogus_option"):
        build(name, bogus_option=1)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("kd", {"tau": 0}),
        ("kd", {"tau": "hot"}),
        ("fitnet", {"pairs": [(5, 0)]}),
        ("fitnet", {"pairs": "0-1"}),
        ("at", {"pairs": [(0, 9)]}),
        ("lsp", {"kernel": "laplace"}),
        ("gcrd", {"num_negatives": 0}),
        ("gcrd", {"nce_tau": -1}),
        ("abkd", {"dissimilarity": "cosine"}),
        ("abkd", {"kd_nodes": -3}),
        ("abkd", {"d_a": 0}),
        ("abkd", {"student_layers": [5]}),
        ("abkd", {"student_layers": "last"}),
        ("abkd", {"detach_summaries": "maybe"}),
    ],
)
def test_bad_option_values(name: str, options: dict) -> None:
    with pytest.raises(ConfigError):
        build(name, **options)


def test_layer_dims_validation() -> None:
    with pytest.raises(ConfigError):
        LayerDims(teacher=[], student=[4], num_classes=2)
    with pytest.raises(ConfigError):
        LayerDims(teacher=[4], student=[0], num_classes=2)


def test_proportional_layer() -> None:
    assert [proportional_layer(j, 2, 16) for j in range(2)] == [7, 15]
    assert [proportional_layer(j, 4, 4) for j in range(4)] == [0, 1, 2, 3]
    assert [proportional_layer(j, 3, 2) for j in range(3)] == [0, 0, 1]


def test_wrong_hidden_widths_raise() -> None:
    term = build("abkd")
    b = make_batch(LayerDims(teacher=[8, 8, 8, 4], student=[6, 4], num_classes=4))
    with pytest.raises(ValueError, match="widths"):
        term(b)


# ---- minima -------------------------------------------------------------------------------

SAME = LayerDims(teacher=[6, 6], student=[6, 6], num_classes=3)
ONE = LayerDims(teacher=[6], student=[6], num_classes=3)


def test_kd_zero_when_logits_match_and_positive_otherwise() -> None:
    assert build("kd", SAME)(mirrored_batch(SAME)).item() == pytest.approx(0.0, abs=1e-6)
    assert build("kd", SAME)(make_batch(SAME)).item() > 0


def test_kd_matches_formula() -> None:
    b = make_batch(SAME)
    tau = 3.0
    p_t = torch.softmax(b.teacher_logits / tau, dim=-1)
    log_p_s = torch.log_softmax(b.student_logits / tau, dim=-1)
    expected = tau**2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    got = build("kd", SAME, tau=tau)(b)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ce_uses_only_masked_rows() -> None:
    b = make_batch(SAME)
    term = build("ce", SAME)
    before = term(b).item()
    b.student_logits.data[~b.train_mask] += 100.0  # rows outside the mask do not count
    assert term(b).item() == pytest.approx(before)
    b.train_mask = torch.zeros_like(b.train_mask)
    empty = term(b)
    assert empty.item() == 0.0
    empty.backward()


def test_fitnet_zero_with_identity_regressor() -> None:
    term = build("fitnet", SAME, pairs=[(1, 1)])
    with torch.no_grad():
        term.regressors[0].weight.copy_(torch.eye(6))
        term.regressors[0].bias.zero_()
    assert term(mirrored_batch(SAME)).item() == pytest.approx(0.0, abs=1e-7)


def test_fitnet_default_pair_is_student_zero_with_proportional_teacher() -> None:
    dims = LayerDims(teacher=[8] * 16, student=[4, 3], num_classes=3)
    assert build("fitnet", dims).pairs == [(0, 7)]


def test_at_zero_for_proportional_activations() -> None:
    term = build("at", SAME)
    assert term.pairs == [(0, 0), (1, 1)]
    assert term(mirrored_batch(SAME, scale=3.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert term(make_batch(SAME)).item() > 0


def test_lsp_zero_with_identical_hiddens() -> None:
    for kernel in ("rbf", "sqdist", "linear", "cosine"):
        term = build("lsp", SAME, kernel=kernel)
        assert term(mirrored_batch(SAME)).item() == pytest.approx(0.0, abs=1e-6), kernel
        assert term(make_batch(SAME)).item() > 0, kernel


def test_lsp_needs_edges() -> None:
    b = make_batch()
    b.edge_index = None
    with pytest.raises(ConfigError, match="edge_index"):
        build("lsp")(b)


def test_lsp_matches_dense_reference() -> None:
    """Per-node softmax over incoming neighbours, KL(teacher || student), mean over nodes."""
    b = make_batch(SAME, n=7)
    b.edge_index = torch.tensor([[1, 2, 3, 0, 0, 4, 5], [0, 0, 0, 1, 4, 4, 5]])  # 5->5 dropped
    got = build("lsp", SAME, kernel="sqdist")(b)
    src, dst = b.edge_index
    total = torch.zeros(())
    targets = [0, 1, 4]
    for i in targets:
        nbrs = [int(s) for s, d in zip(src, dst, strict=True) if int(d) == i and int(s) != i]
        zs, zt = b.student_hiddens[-1], b.teacher_hiddens[-1]
        p_s = torch.softmax(-((zs[i] - zs[nbrs]) ** 2).sum(-1) / 2, 0)
        p_t = torch.softmax(-((zt[i] - zt[nbrs]) ** 2).sum(-1) / 2, 0)
        total = total + (p_t * (p_t.log() - p_s.log())).sum()
    assert got.item() == pytest.approx((total / len(targets)).item(), rel=1e-5)


def test_gcrd_sampled_negatives_and_subsampled_anchors() -> None:
    b = make_batch(n=40)
    full = build("gcrd", num_negatives=100)(b)
    sampled = build("gcrd", num_negatives=5, max_nodes=30)(b)
    assert torch.isfinite(full) and torch.isfinite(sampled)
    sampled.backward()
    assert b.student_hiddens[-1].grad is not None


# ---- ABKD ---------------------------------------------------------------------------------


def test_abkd_attention_shape_rows_and_detached() -> None:
    term = build("abkd")
    with pytest.raises(RuntimeError):
        term.attention()
    term(make_batch())
    a = term.attention()
    assert a.shape == (len(DIMS.student), len(DIMS.teacher))
    assert torch.allclose(a.sum(dim=1), torch.ones(len(DIMS.student)))
    assert not a.requires_grad
    assert term.last_dissimilarity().shape == a.shape


def unit(h: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` divided by their L2 norm (written out, not the code under test)."""
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def reference_dissimilarity(term: LossTerm, b: KDBatch) -> torch.Tensor:
    """``D [L_S, L_T]`` from the spec, pair by pair, with the term's own weights and maps."""
    student = [b.student_hiddens[j] for j in term.student_layers]
    rows = []
    for j, h_s in enumerate(student):
        row = []
        for i, h_t in enumerate(b.teacher_hiddens):
            if term.dissimilarity == "feature":
                a_s = unit(h_s @ term.regressors[j].weight.T)  # trainable P_S^j
                a_t = unit(h_t @ term.teacher_maps()[i])  # fixed R_T^i
                row.append(((a_s - a_t) ** 2).sum(dim=1).mean())
            else:
                g_s, g_t = unit(h_s) @ unit(h_s).T, unit(h_t) @ unit(h_t).T
                row.append(((g_s - g_t) ** 2).mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def reference_attention(term: LossTerm, b: KDBatch) -> torch.Tensor:
    """``A[j, :] = softmax_i((W_q^j s_j) . (W_k^i t_i + e_i) / sqrt(d_k))`` from the spec."""
    student = [b.student_hiddens[j] for j in term.student_layers]
    q = [term.query[j].weight @ h.mean(dim=0) for j, h in enumerate(student)]
    k = [
        term.key[i].weight @ h.mean(dim=0) + term.position[i]
        for i, h in enumerate(b.teacher_hiddens)
    ]
    logits = torch.stack([torch.stack([qj @ ki for ki in k]) for qj in q]) / term.d_k**0.5
    return torch.softmax(logits, dim=1)


@pytest.mark.parametrize("dissimilarity", ["feature", "similarity"])
def test_abkd_loss_is_attention_weighted_mean(dissimilarity: str) -> None:
    """L_att, A and D against a pair-by-pair reference built from the term's weights only."""
    term = build("abkd", dissimilarity=dissimilarity)
    b = make_batch()  # 16 rows: below every default sample size, so all rows are used
    loss = term(b)
    dis, attn = reference_dissimilarity(term, b), reference_attention(term, b)
    assert dis.min() > 0.01 and (attn.max(dim=1).values < 0.99).all()  # not degenerate
    expected = (attn * dis).sum(dim=1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(term.last_dissimilarity(), dis, atol=1e-5)
    assert torch.allclose(term.attention(), attn, atol=1e-6)


def test_abkd_similarity_zero_when_student_equals_teacher() -> None:
    term = build("abkd", ONE, dissimilarity="similarity")
    assert term(mirrored_batch(ONE)).item() == pytest.approx(0.0, abs=1e-6)
    assert term(mirrored_batch(ONE, scale=2.5)).item() == pytest.approx(0.0, abs=1e-6)
    assert term(make_batch(ONE)).item() > 0
    assert list(term.regressors) == [] and term.teacher_maps() == []


def test_abkd_feature_zero_with_identity_regressor() -> None:
    term = build("abkd", ONE)
    assert term.teacher_identity
    with torch.no_grad():
        term.regressors[0].weight.copy_(torch.eye(6))
    assert term(mirrored_batch(ONE)).item() == pytest.approx(0.0, abs=1e-6)
    assert term(make_batch(ONE)).item() > 0


def test_abkd_feature_diagonal_zero_for_matching_layers() -> None:
    term = build("abkd", SAME)
    with torch.no_grad():
        for reg in term.regressors:
            reg.weight.copy_(torch.eye(6))
    term(mirrored_batch(SAME))
    dis = term.last_dissimilarity()
    assert torch.allclose(dis.diagonal(), torch.zeros(2), atol=1e-6)
    assert (dis + torch.eye(2)).min() > 0  # different layers differ


def test_abkd_teacher_maps_are_fixed_buffers() -> None:
    term = build("abkd")  # teacher widths 8, 8, 8, 4: not uniform -> orthogonal maps, d_a 8
    assert not term.teacher_identity and term.d_a == 8
    maps = term.teacher_maps()
    assert len(maps) == len(DIMS.teacher)
    buffers = dict(term.named_buffers())
    params = {id(p) for p in term.parameters()}
    for i, r in enumerate(maps):
        assert buffers[f"teacher_map_{i}"] is r
        assert id(r) not in params and not r.requires_grad
        assert f"teacher_map_{i}" in term.state_dict()
    before = [r.clone() for r in maps]
    opt = torch.optim.Adam(term.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        term(make_batch()).backward()
        opt.step()
    for r, r0 in zip(term.teacher_maps(), before, strict=True):
        assert torch.equal(r, r0)
    names = {n for n, _ in term.named_parameters()}
    assert {"regressors.0.weight", "query.0.weight", "key.0.weight", "position"} <= names


def test_abkd_identity_maps_when_teacher_widths_equal_d_a() -> None:
    term = build("abkd", SAME)
    assert term.teacher_identity and term.d_a == 6
    assert all(torch.equal(r, torch.eye(6)) for r in term.teacher_maps())
    other = build("abkd", SAME, d_a=4)
    assert not other.teacher_identity
    assert all(r.shape == (6, 4) for r in other.teacher_maps())


def test_fixed_orthogonal_is_orthonormal_and_seeded() -> None:
    tall = fixed_orthogonal(10, 4, torch.Generator().manual_seed(1))
    wide = fixed_orthogonal(4, 10, torch.Generator().manual_seed(1))
    assert torch.allclose(tall.T @ tall, torch.eye(4), atol=1e-5)
    assert torch.allclose(wide @ wide.T, torch.eye(4), atol=1e-5)
    again = fixed_orthogonal(10, 4, torch.Generator().manual_seed(1))
    assert torch.equal(tall, again)
    assert not torch.equal(tall, fixed_orthogonal(10, 4, torch.Generator().manual_seed(2)))


def test_abkd_seed_changes_maps_but_not_with_same_seed() -> None:
    a, b, c = build("abkd", seed=3), build("abkd", seed=3), build("abkd", seed=4)
    assert torch.equal(a.teacher_maps()[0], b.teacher_maps()[0])
    assert not torch.equal(a.teacher_maps()[0], c.teacher_maps()[0])


def test_abkd_kd_nodes_samples_rows() -> None:
    b = make_batch(n=50)
    term = build("abkd", kd_nodes=10)
    first, second = term(b).item(), term(b).item()
    assert first != second  # a fresh sample each call
    assert build("abkd", kd_nodes=10)(b).item() == first  # same seed, same sequence
    assert build("abkd", dissimilarity="similarity").kd_nodes == 512
    assert build("abkd", kd_nodes=0).kd_nodes == 0  # 0: always all rows


def test_abkd_default_sample_only_on_large_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from abkd_deploy.distill.losses import abkd

    monkeypatch.setattr(abkd, "LARGE_BATCH_NODES", 30)
    monkeypatch.setattr(abkd, "DEFAULT_FEATURE_NODES", 10)
    term = build("abkd")  # feature, no kd_nodes: automatic
    assert term.auto_sample and term.kd_nodes == 10
    small = make_batch(n=25)
    assert term(small).item() == term(small).item()  # <= 30 rows: all of them, no sampling
    large = make_batch(n=50)
    assert term(large).item() != term(large).item()  # > 30 rows: a fresh sample per call
    assert not build("abkd", kd_nodes=10).auto_sample


@pytest.mark.parametrize(
    ("option", "rows"), [("all", [0, 1]), ("hidden", [0]), ([-1], [1]), ("0,1", [0, 1])]
)
def test_abkd_student_layers_select_rows(option, rows) -> None:
    term = build("abkd", student_layers=option)
    assert term.student_layers == rows
    assert len(term.regressors) == len(term.query) == len(rows)
    b = make_batch()
    term(b).backward()
    assert term.attention().shape == (len(rows), len(DIMS.teacher))
    for j, h in enumerate(b.student_hiddens):
        assert (h.grad is not None) == (j in rows)


def test_abkd_detach_summaries_keeps_attention_trainable() -> None:
    b = make_batch()
    term = build("abkd", detach_summaries=True)
    student = [h for h in b.student_hiddens]
    term.attention_weights(student, b.teacher_hiddens).pow(2).sum().backward()
    assert all(h.grad is None for h in student)  # no path through s_j
    assert all(w.weight.grad is not None for w in term.query) and term.position.grad is not None
    build("abkd", detach_summaries=False).attention_weights(student, b.teacher_hiddens).pow(
        2
    ).sum().backward()
    assert all(h.grad is not None for h in student)
    assert build("abkd", detach_summaries="false").detach_summaries is False


def test_abkd_joint_mode_reaches_teacher() -> None:
    b = make_batch(teacher_grad=True)
    build("abkd")(b).backward()
    assert all(h.grad is not None for h in b.teacher_hiddens)


def test_dissimilarities_match_direct_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(9, 5, generator=g) for _ in range(2)]
    b = [torch.randn(9, 5, generator=g) for _ in range(3)]
    b[1][3] = 0.0  # an all-zero row
    nz = torch.nn.functional.normalize
    feat = torch.tensor(
        [[((nz(x, dim=-1) - nz(y, dim=-1)) ** 2).sum(-1).mean() for y in b] for x in a]
    )
    assert torch.allclose(feature_dissimilarity(a, b), feat, atol=1e-5)
    c = [torch.randn(9, 3, generator=g), torch.randn(9, 7, generator=g)]  # widths may differ
    gram = [nz(x, dim=-1) @ nz(x, dim=-1).T for x in c]
    gram_b = [nz(y, dim=-1) @ nz(y, dim=-1).T for y in b]
    sim = torch.tensor([[((gx - gy) ** 2).mean() for gy in gram_b] for gx in gram])
    assert torch.allclose(similarity_dissimilarity(c, b), sim, atol=1e-5)


@pytest.mark.parametrize("dissimilarity", ["feature", "similarity"])
@pytest.mark.parametrize("kd_nodes", [0, 10])
def test_abkd_frozen_teacher_cache_matches_uncached(
    monkeypatch: pytest.MonkeyPatch, dissimilarity: str, kd_nodes: int
) -> None:
    """The cached teacher side (frozen teacher, same tensors every step) changes nothing."""
    from abkd_deploy.distill.losses import abkd

    b = make_batch(n=50)
    cached = build("abkd", dissimilarity=dissimilarity, kd_nodes=kd_nodes)
    values = [cached(b) for _ in range(3)]
    assert cached._cache is not None and cached._cache["refs"][0] is b.teacher_hiddens[0]
    monkeypatch.setattr(abkd, "TEACHER_CACHE_BYTES", -1)  # force the uncached path
    plain = build("abkd", dissimilarity=dissimilarity, kd_nodes=kd_nodes)
    expected = [plain(b) for _ in range(3)]
    assert plain._cache is None
    for got, want in zip(values, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    g_cached = torch.autograd.grad(cached(b), b.student_hiddens)
    g_plain = torch.autograd.grad(plain(b), b.student_hiddens)
    for a, c in zip(g_cached, g_plain, strict=True):
        assert torch.allclose(a, c, atol=1e-6)


def test_abkd_cache_follows_new_teacher_tensors_and_skips_joint_mode() -> None:
    term = build("abkd")
    first = make_batch(n=20, seed=1)
    term(first)
    second = make_batch(n=20, seed=2)  # new tensors (next mini-batch): recomputed
    value = term(second)
    assert term._cache["refs"][0] is second.teacher_hiddens[0]
    fresh = build("abkd")
    assert torch.allclose(value, fresh(second), atol=1e-6)
    joint = build("abkd")
    joint(make_batch(n=20, teacher_grad=True))  # teacher carries gradients: not cached
    assert joint._cache is None


def test_abkd_uniform_attention_ablation() -> None:
    b = make_batch()
    term = build("abkd", attention="uniform")
    loss = term(b)
    attn = term.attention()
    assert torch.allclose(attn, torch.full_like(attn, 1 / len(DIMS.teacher)))
    expected = reference_dissimilarity(term, b).mean(dim=1).mean()  # A = 1 / L_T
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in term.query.parameters())  # attention not used
    assert any(p.grad is not None for p in term.regressors.parameters())
    with pytest.raises(ConfigError, match="attention"):
        build("abkd", attention="hard")
