"""Attention variants of ``abkd`` that do not collapse onto ``argmin D`` (issue 15).

The spec's attention (``learned``) trains its query/key maps on ``L_att = mean_j sum_i
A[j, i] D[j, i]`` itself. ``dL_att / dA[j, i] = D[j, i]``, so every softmax row drifts to
the smallest ``D[j, i]`` (docs/DESIGN_NOTES.md section 2). The helpers here give the
attention another signal, or bound how far it can drift:

* :func:`task_gradients` and :func:`task_alignment`: the first-order effect of one step on
  ``D[j, i]`` on the student's task loss (CE on the labelled rows + logit KD at ``T = 1``)
  - the hypergradient of a one-step lookahead, taken in representation space.
* :func:`holdout_split`: labelled rows held out of the student's cross-entropy, whose
  loss then is the alignment's task loss (``holdout``: direction (a) with a held-out split).
* :func:`softmax_entropy_floor`: a row softmax whose temperature is raised, per row, just
  enough to keep the entropy at or above a floor.
* :func:`standardize_rows`: z-scores of a ``[L_S, L_T]`` matrix per row, so that a
  temperature on it is free of the scale of ``D`` or of the gradients.
* :func:`anchor_distance`: how far a jointly trained teacher's layers moved from a
  snapshot of themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import KDBatch

#: Bisection steps on ``log T`` in :func:`softmax_entropy_floor` (``T`` up to ``e^12``).
_BISECT_STEPS = 40
_LOG_T_MAX = 12.0


def holdout_split(train_mask: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Splits the labelled rows ``train_mask [N]`` into ``(kept, held)`` masks.

    ``held`` takes ``round(fraction * labelled)`` rows (at least 1 and at most all but one
    when ``fraction > 0`` and there are two or more), drawn with a generator seeded by
    ``seed``, so every rank and every run with the same seed holds out the same rows.
    """
    rows = train_mask.nonzero().flatten()
    held = torch.zeros_like(train_mask)
    if fraction > 0 and rows.numel() >= 2:
        k = min(max(round(fraction * rows.numel()), 1), rows.numel() - 1)
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        pick = rows[torch.randperm(rows.numel(), generator=gen)[:k].to(rows.device)]
        held[pick] = True
    return train_mask & ~held, held


def row_entropy(probs: Tensor) -> Tensor:
    """Entropy (nats) of every row of ``probs [R, K]``; returns ``[R]``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)


def softmax_entropy_floor(logits: Tensor, floor: float) -> Tensor:
    """``softmax(logits / T_r)`` per row ``r`` with the smallest ``T_r >= 1`` whose entropy
    is at least ``floor * log K``.

    Entropy of ``softmax(z / T)`` grows with ``T`` (to ``log K`` as ``T -> inf``), so ``T_r``
    is found by bisection on ``log T`` (no gradient through ``T_r``: it is a data-dependent
    constant and the gradient reaches ``logits`` through the softmax).

    Args:
        logits: ``[R, K]`` attention logits.
        floor: Fraction of the largest entropy ``log K``, in ``[0, 1)``; 0 returns the
            plain softmax.

    Returns:
        ``[R, K]`` rows summing to 1 with ``row_entropy >= floor * log K`` (up to 1e-5).
    """
    plain = torch.softmax(logits, dim=-1)
    k = logits.shape[-1]
    if floor <= 0.0 or k < 2:
        return plain
    target = floor * math.log(k)
    with torch.no_grad():
        z = logits.detach().float()
        lo = torch.zeros(z.shape[0], device=z.device)  # log T; entropy(lo) may be < target
        hi = torch.full_like(lo, _LOG_T_MAX)
        ok = row_entropy(torch.softmax(z, dim=-1)) >= target
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            above = row_entropy(torch.softmax(z / mid.exp()[:, None], dim=-1)) >= target
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        log_t = torch.where(ok, torch.zeros_like(hi), hi)  # hi always meets the floor
    return torch.softmax(logits / log_t.exp().to(logits.dtype)[:, None], dim=-1)


def standardize_rows(m: Tensor, eps: float = 1e-12) -> Tensor:
    """``(m - row mean) / row std`` of ``m [R, K]`` (rows with no spread become 0)."""
    centred = m - m.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return centred / std.clamp_min(eps)


def task_gradients(batch: KDBatch, hiddens: Sequence[Tensor]) -> list[Tensor] | None:
    """``dL_task / dH`` for every tensor of ``hiddens`` (student layers of ``batch``).

    ``L_task = CE(z_S, y)`` on the batch's labelled rows ``+ KL(softmax(z_T) ||
    softmax(z_S))`` on all rows: the student's own objective with the KD temperature at 1,
    without any feature term. With a held-out split (``batch.holdout_mask``), ``L_task`` is
    the cross-entropy on the held-out rows only: a validation loss the student's own
    objective does not contain. The graph is kept (``retain_graph``) for the main backward.

    Returns:
        One ``[n, d_S^j]`` gradient per hidden (zeros where a hidden does not reach the
        logits), or ``None`` when no gradient can be taken (no grad mode, the logits do
        not require grad, or a held-out split with no held-out row in the batch).
    """
    logits = batch.student_logits
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return None
    log_p = F.log_softmax(logits.float(), dim=-1)
    held = batch.holdout_mask
    if held is not None:
        if not bool(held.any()):
            return None
        task = F.nll_loss(log_p[held], batch.y[held])
    else:
        task = F.kl_div(
            log_p, F.softmax(batch.teacher_logits.detach().float(), dim=-1), reduction="batchmean"
        )
        mask = batch.train_mask
        if mask is not None and bool(mask.any()):
            task = task + F.nll_loss(log_p[mask], batch.y[mask])
    wanted = [h for h in hiddens if h.requires_grad]
    if not wanted:
        return None
    grads = iter(torch.autograd.grad(task, wanted, retain_graph=True, allow_unused=True))
    out = []
    for h in hiddens:
        g = next(grads) if h.requires_grad else None
        out.append(torch.zeros_like(h) if g is None else g.detach())
    return out


def task_alignment(
    dissimilarity: Callable[..., Tensor], student: Sequence[Tensor], grads: Sequence[Tensor]
) -> Tensor:
    """``c[j, i] = <dD[j, i] / dH_S^j, dL_task / dH_S^j>`` for all pairs, by one JVP.

    A student step ``-eta * dD[j, i] / dH`` changes the task loss by ``-eta * c[j, i]`` to
    first order, so a large ``c[j, i]`` marks a teacher layer whose matching also lowers the
    task loss (the hypergradient of a one-step lookahead with respect to ``A[j, i]``).

    Args:
        dissimilarity: ``(*student) -> D [L_S, L_T]``, ``D[j, :]`` depending on
            ``student[j]`` only.
        student: ``L_S`` tensors ``[m, d_S^j]`` (the rows ``D`` is computed on).
        grads: ``L_S`` task gradients on the same rows.

    Returns:
        ``[L_S, L_T]``, detached.
    """
    primals = tuple(h.detach() for h in student)
    tangents = tuple(g.detach().to(h.dtype) for g, h in zip(grads, primals, strict=True))
    _, c = torch.func.jvp(dissimilarity, primals, tangents)
    return c.detach()


def anchor_distance(teacher: Sequence[Tensor], reference: Tensor) -> Tensor:
    """``mean_i mean_v || norm(H_T^i(v)) - ref_i(v) ||^2`` (scalar).

    Args:
        teacher: ``L_T`` tensors ``[n, d_T^i]`` (carrying gradients in joint mode).
        reference: ``[L_T, n, d]``-like stack or list of unit-row snapshots.
    """
    terms = [
        (F.normalize(h.float(), dim=-1) - r).pow(2).sum(dim=-1).mean()
        for h, r in zip(teacher, reference, strict=True)
    ]
    return torch.stack(terms).mean()
