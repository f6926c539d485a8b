"""Teacher and student GNNs (``gcn``, ``sage``, ``gat``, ``gcnii``, ``mlp``; typed: ``rgcn``,
``rsage``, ``res-rgcn``)."""

from __future__ import annotations

from typing import Any

from abkd_deploy.models import gat, gcn, gcnii, mlp, res_rgcn, rgcn, rsage, sage  # noqa: F401
from abkd_deploy.models.base import GNN, MODELS, count_parameters
from abkd_deploy.models.checkpoint import load_model, save_model


def build_model(arch: str, **config: Any) -> GNN:
    """Builds a registered architecture from keyword config (see :attr:`GNN.config`)."""
    return MODELS.get(arch)(**config)


__all__ = ["GNN", "MODELS", "build_model", "count_parameters", "load_model", "save_model"]
