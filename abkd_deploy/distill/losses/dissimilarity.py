"""The two ABKD layer-pair dissimilarities, for all pairs at once (docs/ARCHITECTURE.md 5).

Both return a ``[L_S, L_T]`` matrix ``D`` whose entry ``(j, i)`` compares student layer
``j`` with teacher layer ``i`` on the same ``m`` node rows. They use the expansion
``mean (x - y)^2 = mean x^2 + mean y^2 - 2 mean x*y`` so that one matrix product covers every
pair (cost ``O(L_S * L_T * m * d)`` resp. ``O(L_S * L_T * m^2)``, memory linear in the layer
count); rounding can make an entry a tiny negative number, which is clamped to zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pairwise_mean_sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """``out[j, i] = sum_k (a[j, k] - b[i, k])^2 / k_count`` for ``a [L_S, K]``, ``b [L_T, K]``."""
    k = a.shape[1]
    sq_a = a.pow(2).sum(dim=1) / k
    sq_b = b.pow(2).sum(dim=1) / k
    cross = a @ b.T / k
    return (sq_a[:, None] + sq_b[None, :] - 2.0 * cross).clamp_min(0.0)


def unit_rows(layers: list[Tensor]) -> Tensor:
    """``[L, m, d]``: the layers stacked, each row L2-normalised (all-zero rows stay zero)."""
    return torch.stack([F.normalize(h, dim=-1) for h in layers])


def unit_feature_dissimilarity(student: Tensor, teacher: Tensor) -> Tensor:
    """:func:`feature_dissimilarity` of already normalised stacks.

    Args:
        student: ``[L_S, m, d_a]`` unit rows (:func:`unit_rows`).
        teacher: ``[L_T, m, d_a]`` unit rows.

    Returns:
        ``[L_S, L_T]``.
    """
    m = student.shape[1]
    a = student.reshape(student.shape[0], -1)
    b = teacher.reshape(teacher.shape[0], -1)
    # the helper averages over m * d_a entries; the spec sums over features, so rescale
    return _pairwise_mean_sq_diff(a, b) * (a.shape[1] / m)


def feature_dissimilarity(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """``D[j, i] = mean over nodes v of || norm(a_S^j(v)) - norm(a_T^i(v)) ||^2``.

    Args:
        student: ``L_S`` tensors ``[m, d_a]``, the student layers after their regressors.
        teacher: ``L_T`` tensors ``[m, d_a]``, the teacher layers after their fixed maps.

    Returns:
        ``[L_S, L_T]`` dissimilarities in ``[0, 4]`` (``norm`` is per-node L2
        normalisation; an all-zero row stays zero).
    """
    return unit_feature_dissimilarity(unit_rows(student), unit_rows(teacher))


def cosine_similarity_matrix(h: Tensor) -> Tensor:
    """``[m, m]`` cosine similarities between the rows of ``h [m, d]``."""
    u = F.normalize(h, dim=-1)
    return u @ u.T


def similarity_dissimilarity(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """``D[j, i] = mean over node pairs (u, v) of (G_S^j[u, v] - G_T^i[u, v])^2``.

    ``G`` is the cosine-similarity matrix of a layer's raw representations on the node
    sample, so widths may differ and no projection is involved.

    Args:
        student: ``L_S`` tensors ``[m, d_S^j]``.
        teacher: ``L_T`` tensors ``[m, d_T^i]``.

    Returns:
        ``[L_S, L_T]`` dissimilarities in ``[0, 4]``.
    """
    a = torch.stack([cosine_similarity_matrix(h).reshape(-1) for h in student])
    b = torch.stack([cosine_similarity_matrix(h).reshape(-1) for h in teacher])
    return _pairwise_mean_sq_diff(a, b)
