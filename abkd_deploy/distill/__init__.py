"""Distillation: KD losses (registry), the trainer, teacher training, ``distill``.

The names below are imported on first use, so that the torch-free
:mod:`abkd_deploy.distill.specs` can be imported (by the command line) without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train_teacher": "abkd_deploy.distill.teacher",
    "FitResult": "abkd_deploy.distill.trainer",
    "TrainConfig": "abkd_deploy.distill.trainer",
    "Trainer": "abkd_deploy.distill.trainer",
}

__all__ = ["FitResult", "TrainConfig", "Trainer", "train_teacher"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
