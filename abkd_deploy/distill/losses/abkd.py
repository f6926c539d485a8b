"""``abkd``: attention-based multi-layer distillation, the L_att term (docs/ARCHITECTURE.md 5).

Ahluwalia et al., "ABKD: Graph Neural Network Compression with Attention-Based Knowledge
Distillation" (arXiv 2310.15938), building on the attention-weighted feature matching of
Ji, Heo & Park, "Show, Attend and Distill: Knowledge Distillation via Attention-based
Feature Matching", AAAI 2021 (arXiv 2102.02973).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.errors import ConfigError

from .abkd_attention import (
    anchor_distance,
    softmax_entropy_floor,
    standardize_rows,
    task_alignment,
    task_gradients,
)
from .base import KDBatch, LayerDims, LossTerm, register_loss
from .dissimilarity import similarity_dissimilarity, unit_feature_dissimilarity, unit_rows
from .options import as_choice, as_float, as_int

DISSIMILARITIES = ("feature", "similarity")
#: Node sample of the ``similarity`` form when ``kd_nodes`` is not given (its cost is n^2).
DEFAULT_SIMILARITY_NODES = 512
#: ``feature`` form without ``kd_nodes``: batches of up to :data:`LARGE_BATCH_NODES` rows
#: use all of them, larger ones a sample of :data:`DEFAULT_FEATURE_NODES` (the measurement
#: behind these sizes: docs/ARCHITECTURE.md section 9.2).
DEFAULT_FEATURE_NODES = 1024
LARGE_BATCH_NODES = 4096
#: Largest cache of a frozen teacher's normalised features (bytes); above it the teacher
#: side is recomputed on the node sample every step.
TEACHER_CACHE_BYTES = 512 * 2**20
#: ``learned`` (the spec) or ``uniform`` (ablation: A = 1 / L_T, no attention parameters
#: used); see docs/DESIGN_NOTES.md on why the learned rows collapse onto one layer. The
#: variants of issue 15 (docs/benchmarks/abkd-attention.md, :mod:`.abkd_attention`):
#: ``align`` (query/key attention trained on the task-gradient alignment of each pair, not
#: on L_att), ``entropy`` (the spec's attention with a row-entropy floor), ``prior``
#: (``A = softmax(b - z(D) / T)``: D detached, a learned prior ``b`` over teacher layers
#: trained on the task-gradient alignment).
ATTENTION_CHOICES = ("learned", "uniform", "align", "entropy", "prior")
#: Attentions whose parameters are trained on the task-gradient alignment.
ALIGNED_ATTENTIONS = ("align", "prior")
#: Entropy floor of ``attention=entropy`` when ``entropy_floor`` is not given (a fraction
#: of ``log L_T``).
DEFAULT_ENTROPY_FLOOR = 0.5
#: Which student layers take part by default (see :class:`AttentionKDTerm`).
STUDENT_LAYER_CHOICES = ("all", "hidden")


def fixed_orthogonal(d_in: int, d_out: int, generator: torch.Generator) -> Tensor:
    """A seeded random ``[d_in, d_out]`` matrix with orthonormal columns or rows.

    For ``d_in >= d_out`` the columns are orthonormal (a projection onto a random
    ``d_out``-dimensional subspace); otherwise the rows are, so ``x -> x @ R`` is an
    isometry that keeps every norm and angle. Built from the QR factors of a Gaussian
    matrix with the signs fixed by ``diag(R)``, so the draw is uniform (Haar).
    """
    big, small = max(d_in, d_out), min(d_in, d_out)
    gauss = torch.randn(big, small, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q if d_in >= d_out else q.T).float().contiguous()


@register_loss("abkd")
class AttentionKDTerm(LossTerm):
    """``L_att = mean_j sum_i A[j, i] * D[j, i]`` over all student/teacher layer pairs.

    * Teacher side, FIXED: ``a_T^i = H_T^i @ R_T^i``; ``R_T^i`` is the identity when every
      teacher layer already has width ``d_a``, else a seeded random orthogonal map per layer
      (:func:`fixed_orthogonal`). They are buffers (saved, moved with the module, never
      trained): with trainable maps on both sides the dissimilarity can be zeroed by the maps
      alone and the student learns nothing (docs/ARCHITECTURE.md sections 5 and 9.3).
    * Student side, trainable: ``a_S^j = P_S^j(H_S^j)``, a linear map without bias (a bias
      could only add a shared offset; without it ``P_S^j = I`` reproduces ``H_S^j``).
    * Attention: ``s_j``, ``t_i`` are node means of the raw ``H_S^j``, ``H_T^i`` over all
      rows of the batch; ``q_j = W_q^j s_j``, ``k_i = W_k^i t_i + e_i`` (bias-free linear
      maps, ``e_i`` a learned position embedding of teacher layer ``i``);
      ``A[j, :] = softmax_i(q_j . k_i / sqrt(d_k))``.
    * ``D``: ``feature`` (default) or ``similarity``, see :mod:`.dissimilarity`, computed on
      a node sample of ``kd_nodes`` rows when the batch is larger (seeded generator,
      advanced every call).

    Gradients of L_att reach the student through ``D`` and through the summaries ``s_j``
    (the spec does not stop them; ``detach_summaries=True`` does), and reach ``P_S``,
    ``W_q``, ``W_k`` and ``e``.

    Training dynamics (measured on Cora, docs/ARCHITECTURE.md 9.1): the per-node L2
    normalisation makes the gradient of ``D`` scale as ``1 / ||a_S^j(v)||``, which is huge
    for an untrained student (tiny activations); without a warm-up of ``beta`` the first
    Adam steps follow L_att alone and kill the student's ReLU units. The objective
    therefore warms ``abkd`` up by default (:data:`..objective.DEFAULT_ABKD_WARMUP`).

    Spec choices left open, and how they were settled:

    * Which student layers take part: all of them by default (the spec's "j = 1..L_S"),
      the last one being the logits for GCN/SAGE/GAT students; ``student_layers="hidden"``
      leaves the logits out.

    Args:
        dims: Layer widths of ``student_hiddens`` / ``teacher_hiddens`` (every teacher
            layer takes part; the student layers of ``student_layers``).
        dissimilarity: ``feature`` or ``similarity``.
        d_a: Shared width of the ``feature`` form. Default: the teacher width when all
            teacher layers share it (``R_T = I``), else the widest teacher layer, so that
            every ``R_T^i`` is an isometry (nothing of the teacher is projected away).
            Unused by ``similarity``.
        d_k: Width of queries and keys (default 32).
        kd_nodes: Rows sampled for ``D`` when the batch has more (0: all rows). Default:
            ``feature``: all rows up to 4,096, else 1,024 (:data:`LARGE_BATCH_NODES`,
            :data:`DEFAULT_FEATURE_NODES`); ``similarity``: 512
            (docs/ARCHITECTURE.md section 9.2).
        seed: Seed of the fixed teacher maps and of the node sampler (default 0).
        student_layers: ``all`` (default), ``hidden`` (all but the last, i.e. not the
            logits), or student layer indices (``[0]``, ``"0,1"``, negative from the end).
            The attention matrix has one row per participating layer.
        detach_summaries: Detach ``s_j`` before the queries (default False: the spec's
            gradient path through the attention into the student is kept).
        attention: ``learned`` (default, the spec) or ``uniform`` (every teacher layer
            weighted ``1 / L_T``; an ablation of the attention itself), or one of the
            variants of issue 15: ``align``, ``entropy``, ``prior`` (see
            :data:`ATTENTION_CHOICES`). With ``align`` and ``prior`` the student gets L_att
            through ``D`` only (``A`` is detached in its path) and the attention parameters
            get ``-mean_j sum_i A[j, i] z_i(c[j, i])`` instead, ``c`` the task-gradient
            alignment (:func:`.abkd_attention.task_alignment`, ``z``: row z-scores).
        entropy_floor: Keep every row's entropy >= ``entropy_floor * log L_T`` by raising
            its softmax temperature (:func:`.abkd_attention.softmax_entropy_floor`), in
            ``[0, 1)``. Default: 0.5 for ``attention=entropy``, else 0 (off).
        prior_temperature: ``T`` of ``attention=prior`` (default 1, on z-scores of D).
        teacher_anchor: Weight of ``mean_i || norm(H_T^i) - norm(H_T^i at the first call)
            ||^2`` added to the loss when the teacher carries gradients (joint mode), to keep
            it near its frozen self (default 0: off).
        align_every: ``align``/``prior``: recompute the alignment ``c`` every this many
            forward passes and reuse the last one in between (default 1: every pass; larger
            values trade freshness for time).
        holdout: ``align``/``prior``: hold this fraction of the labelled nodes out of the
            student's cross-entropy (:func:`.abkd_attention.holdout_split`, seeded by the
            run's seed) and train the attention on the alignment with the held-out rows'
            cross-entropy instead of the student's own loss (default 0: off). The trainer
            does the split (:meth:`Objective.holdout_fraction`).

    Raises:
        ConfigError: Unknown or out-of-range options.
    """

    def __init__(
        self,
        dims: LayerDims,
        *,
        dissimilarity: str = "feature",
        d_a: int | None = None,
        d_k: int = 32,
        kd_nodes: int | None = None,
        seed: int = 0,
        student_layers: Any = "all",
        detach_summaries: bool = False,
        attention: str = "learned",
        entropy_floor: float | None = None,
        prior_temperature: float = 1.0,
        teacher_anchor: float = 0.0,
        align_every: int = 1,
        holdout: float = 0.0,
        **unknown: Any,
    ) -> None:
        super().__init__(dims, **unknown)
        self.dissimilarity = as_choice(self.name, "dissimilarity", dissimilarity, DISSIMILARITIES)
        self.detach_summaries = _as_bool(self.name, "detach_summaries", detach_summaries)
        self.attention_mode = as_choice(self.name, "attention", attention, ATTENTION_CHOICES)
        if entropy_floor is None:
            entropy_floor = DEFAULT_ENTROPY_FLOOR if self.attention_mode == "entropy" else 0.0
        self.entropy_floor = as_float(self.name, "entropy_floor", entropy_floor, low=0.0)
        if self.entropy_floor >= 1.0:
            raise ConfigError(f"{self.name}: option entropy_floor={entropy_floor!r} must be < 1")
        self.prior_temperature = as_float(
            self.name, "prior_temperature", prior_temperature, low=0.0, strict=True
        )
        self.teacher_anchor = as_float(self.name, "teacher_anchor", teacher_anchor, low=0.0)
        self.align_every = as_int(self.name, "align_every", align_every)
        self.holdout = as_float(self.name, "holdout", holdout, low=0.0)
        if self.holdout >= 1.0:
            raise ConfigError(f"{self.name}: option holdout={holdout!r} must be < 1")
        if self.holdout > 0 and self.attention_mode not in ALIGNED_ATTENTIONS:
            raise ConfigError(
                f"{self.name}: option holdout={holdout!r} needs attention=align or prior "
                f"(got attention={self.attention_mode})"
            )
        self._align_calls = 0
        self.student_layers = _student_layers(self.name, student_layers, len(dims.student))
        s_dims = [dims.student[j] for j in self.student_layers]
        self.d_k = as_int(self.name, "d_k", d_k)
        self.seed = as_int(self.name, "seed", seed, low=0)
        #: ``feature`` without an explicit sample: all rows of small batches (see forward)
        self.auto_sample = kd_nodes is None and self.dissimilarity == "feature"
        if kd_nodes is None:
            similarity = self.dissimilarity == "similarity"
            kd_nodes = DEFAULT_SIMILARITY_NODES if similarity else DEFAULT_FEATURE_NODES
        self.kd_nodes = as_int(self.name, "kd_nodes", kd_nodes, low=0)  # 0: all rows
        uniform = len(set(dims.teacher)) == 1
        default_da = dims.teacher[0] if uniform else max(dims.teacher)
        self.d_a = default_da if d_a is None else as_int(self.name, "d_a", d_a)
        generator = torch.Generator().manual_seed(self.seed)
        self.teacher_identity = all(d == self.d_a for d in dims.teacher)
        self.num_teacher_maps = 0
        self.regressors = nn.ModuleList()
        if self.dissimilarity == "feature":
            for i, d in enumerate(dims.teacher):
                r = (
                    torch.eye(d)
                    if self.teacher_identity
                    else fixed_orthogonal(d, self.d_a, generator)
                )
                self.register_buffer(f"teacher_map_{i}", r)
            self.num_teacher_maps = len(dims.teacher)
            self.regressors.extend(nn.Linear(d, self.d_a, bias=False) for d in s_dims)
        self.query = nn.ModuleList(nn.Linear(d, self.d_k, bias=False) for d in s_dims)
        self.key = nn.ModuleList(nn.Linear(d, self.d_k, bias=False) for d in dims.teacher)
        self.position = nn.Parameter(torch.randn(len(dims.teacher), self.d_k) * 0.02)
        if self.attention_mode == "prior":  # logits of the prior over teacher layers
            self.prior = nn.Parameter(torch.zeros(len(s_dims), len(dims.teacher)))
        self._anchor: list[Tensor] | None = None
        self._alignment: Tensor | None = None
        self.sampler = torch.Generator().manual_seed(self.seed)
        self._attention: Tensor | None = None
        self._dissimilarity: Tensor | None = None
        self._cache: dict[str, Any] | None = None

    def _map_teacher(self, teacher: list[Tensor]) -> list[Tensor]:
        """``a_T^i = H_T^i R_T^i`` (no product for identity maps)."""
        if self.teacher_identity:
            return list(teacher)
        return [h @ r.to(h.dtype) for h, r in zip(teacher, self.teacher_maps(), strict=True)]

    @torch.no_grad()
    def _teacher_cache(self, teacher: list[Tensor]) -> dict[str, Any] | None:
        """Layer means and (``feature``) unit-row teacher features, computed once while the
        very same frozen teacher tensors come back (full-batch training with a frozen,
        cached teacher); ``None`` when they cannot be cached (joint mode: they carry
        gradients; new tensors every mini-batch; or more than
        :data:`TEACHER_CACHE_BYTES`)."""
        if any(h.requires_grad for h in teacher):
            return None
        cached = self._cache
        if (
            cached is not None
            and len(cached["refs"]) == len(teacher)
            and all(a is b for a, b in zip(cached["refs"], teacher, strict=True))
        ):
            return cached
        n = teacher[0].shape[0]
        size = len(teacher) * n * (self.d_a if self.dissimilarity == "feature" else 0) * 4
        if size > TEACHER_CACHE_BYTES:
            return None
        self._cache = {
            "refs": list(teacher),
            "means": [h.mean(dim=0) for h in teacher],
            "unit": unit_rows(self._map_teacher(teacher)).float()
            if self.dissimilarity == "feature"
            else None,
        }
        return self._cache

    def teacher_maps(self) -> list[Tensor]:
        """The fixed ``[d_T^i, d_a]`` maps ``R_T^i`` (empty for ``similarity``)."""
        return [getattr(self, f"teacher_map_{i}") for i in range(self.num_teacher_maps)]

    def attention(self) -> Tensor:
        """The ``[L_S, L_T]`` attention ``A`` of the last forward (detached; rows sum to 1).

        Raises:
            RuntimeError: No forward has run yet.
        """
        if self._attention is None:
            raise RuntimeError("abkd: attention() is only available after a forward pass")
        return self._attention

    def last_dissimilarity(self) -> Tensor:
        """The ``[L_S, L_T]`` dissimilarity ``D`` of the last forward (detached)."""
        if self._dissimilarity is None:
            raise RuntimeError("abkd: last_dissimilarity() needs a forward pass first")
        return self._dissimilarity

    def last_alignment(self) -> Tensor | None:
        """The ``[L_S, L_T]`` task-gradient alignment ``c`` of the last forward (``align``
        and ``prior`` only; ``None`` before, or when no gradient could be taken)."""
        return self._alignment

    def attention_weights(
        self,
        student: list[Tensor],
        teacher: list[Tensor],
        teacher_means: list[Tensor] | None = None,
        dissimilarity: Tensor | None = None,
    ) -> Tensor:
        """``A = softmax_i(q_j . k_i / sqrt(d_k))`` from ``[n, d]`` hiddens; ``[L_S, L_T]``.

        ``student`` holds the participating student layers only. With
        ``detach_summaries`` (and always for ``align``) the summaries ``s_j`` are detached
        (A still trains ``W_q``, ``W_k`` and ``e``, but L_att reaches the student only
        through ``D``). ``attention=prior`` needs ``dissimilarity`` (``D``, ``[L_S, L_T]``)
        and returns ``softmax_i(b[j, i] - z_i(D[j, i]) / T)`` with ``D`` detached.
        A positive ``entropy_floor`` raises each row's temperature as needed.
        """
        if self.attention_mode == "uniform":
            n_t = len(self.key)
            return torch.full((len(student), n_t), 1.0 / n_t, device=student[0].device)
        if self.attention_mode == "prior":
            if dissimilarity is None:
                raise ValueError("abkd: attention=prior needs the dissimilarity D")
            z = standardize_rows(dissimilarity.detach())
            return softmax_entropy_floor(
                self.prior - z / self.prior_temperature, self.entropy_floor
            )
        if self.detach_summaries or self.attention_mode == "align":
            student = [h.detach() for h in student]
        q = torch.stack([w(h.mean(dim=0)) for w, h in zip(self.query, student, strict=True)])
        if teacher_means is None:
            teacher_means = [h.mean(dim=0) for h in teacher]
        k = torch.stack([w(t) for w, t in zip(self.key, teacher_means, strict=True)])
        k = k + self.position
        return softmax_entropy_floor(q @ k.T / math.sqrt(self.d_k), self.entropy_floor)

    def forward(self, batch: KDBatch) -> Tensor:
        """Args: batch with ``student_hiddens`` (``L_S`` x ``[n, d_S^j]``) and
        ``teacher_hiddens`` (``L_T`` x ``[n, d_T^i]``).

        Returns:
            Scalar ``L_att`` (plus ``teacher_anchor`` times the anchor distance in joint
            mode). For ``align``/``prior`` its value is ``L_att`` and its gradient on the
            attention parameters that of the alignment loss (see the class).
        """
        self.check_hiddens(batch)
        full = [batch.student_hiddens[j] for j in self.student_layers]
        teacher = batch.teacher_hiddens
        cache = self._teacher_cache(teacher)
        n = batch.num_nodes
        idx = None
        small = self.auto_sample and n <= LARGE_BATCH_NODES
        if 0 < self.kd_nodes < n and not small:
            idx = torch.randperm(n, generator=self.sampler)[: self.kd_nodes]
            idx = idx.to(full[0].device)
        student = full if idx is None else [h[idx] for h in full]
        if self.dissimilarity == "feature":
            if cache is not None:
                unit_t = cache["unit"] if idx is None else cache["unit"].index_select(1, idx)
            else:
                rows = teacher if idx is None else [h[idx] for h in teacher]
                unit_t = unit_rows(self._map_teacher(rows))

            def dis_of(*hs: Tensor) -> Tensor:
                a_s = unit_rows([p(h) for p, h in zip(self.regressors, hs, strict=True)])
                return unit_feature_dissimilarity(a_s, unit_t.to(a_s.dtype))
        else:
            rows = teacher if idx is None else [h[idx] for h in teacher]

            def dis_of(*hs: Tensor) -> Tensor:
                return similarity_dissimilarity(list(hs), rows)

        dis = dis_of(*student)
        means = cache["means"] if cache else None
        attn = self.attention_weights(full, teacher, means, dis)
        self._attention = attn.detach()
        self._dissimilarity = dis.detach()
        if self.attention_mode not in ALIGNED_ATTENTIONS:
            loss = (attn * dis).sum(dim=1).mean()
        else:
            loss = (attn.detach() * dis).sum(dim=1).mean()
            fresh = self._align_calls % self.align_every == 0 or self._alignment is None
            self._align_calls += 1
            grads = task_gradients(batch, full) if fresh else None
            if grads is not None:
                grads = grads if idx is None else [g[idx] for g in grads]
                self._alignment = task_alignment(dis_of, student, grads)
            if self._alignment is not None and torch.is_grad_enabled():
                att_loss = -(attn * standardize_rows(self._alignment)).sum(dim=1).mean()
                loss = loss + (att_loss - att_loss.detach())  # value L_att, gradient on A
        if self.teacher_anchor > 0 and any(h.requires_grad for h in teacher):
            loss = loss + self.teacher_anchor * self._anchor_distance(teacher)
        return loss

    def _anchor_distance(self, teacher: list[Tensor]) -> Tensor:
        """Distance of the teacher's unit rows from their snapshot at the first call (taken
        again when the node rows change)."""
        ref = self._anchor
        if ref is None or [r.shape[0] for r in ref] != [h.shape[0] for h in teacher]:
            with torch.no_grad():
                ref = [F.normalize(h.detach().float(), dim=-1) for h in teacher]
            self._anchor = ref
        return anchor_distance(teacher, ref)


def _as_bool(term: str, key: str, value: Any) -> bool:
    """``value`` as a bool (also ``"true"``/``"false"``/``"1"``/``"0"`` from a command line)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{term}: option {key}={value!r} is not a boolean")
    return bool(value)


def _student_layers(term: str, value: Any, num_student: int) -> list[int]:
    """Indices of the student layers that take part: ``all``, ``hidden`` (all but the
    last, i.e. not the logits; ``all`` for a one-layer student), or explicit indices
    (``[0]``, ``"0,1"``; negative ones count from the end)."""
    if isinstance(value, str) and value.strip().lower() in STUDENT_LAYER_CHOICES:
        if value.strip().lower() == "all" or num_student == 1:
            return list(range(num_student))
        return list(range(num_student - 1))
    raw = value.split(",") if isinstance(value, str) else value
    try:
        idx = [int(v) for v in ([raw] if isinstance(raw, int) else raw)]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{term}: option student_layers={value!r}; expected all, hidden or layer indices"
        ) from None
    if not idx or any(not -num_student <= j < num_student for j in idx):
        raise ConfigError(
            f"{term}: option student_layers={value!r} out of range for {num_student} student layers"
        )
    return sorted({j % num_student for j in idx})
