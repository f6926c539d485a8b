"""Shared fixtures: the ../shared/data folder (skip when absent) and the cuda marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ABKD_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always present in the test env
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def planetoid_root() -> Path:
    root = SHARED_DATA / "planetoid"
    if not (root / "Cora" / "raw" / "ind.cora.x").exists():
        pytest.skip(f"Cora raw files not found under {root}")
    return root


@pytest.fixture(scope="session")
def heterophilous_root() -> Path:
    root = SHARED_DATA / "heterophilous"
    if not (root / "tolokers" / "raw" / "tolokers.npz").exists():
        pytest.skip(f"Tolokers not found under {root}")
    return root
