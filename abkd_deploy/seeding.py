"""Seeding of Python, numpy and torch for a reproducible run."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, numpy and torch (CPU and, when present, every CUDA device).

    It does not switch torch to deterministic algorithms
    (``torch.use_deterministic_algorithms``): the trainer's CPU kernels give the same
    result for a given seed, while on CUDA some kernels (scatter-add, atomics in sparse
    matmul) may still differ between runs in the last bits.

    Args:
        seed: Any int (numpy gets ``seed % 2**32``).
    """
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
