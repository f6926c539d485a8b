"""Distillation loss terms, each registered by name in :data:`LOSSES`.

Importing this package registers every term: ``ce``, ``kd`` (Hinton et al. 2015), ``fitnet``
(Romero et al. 2015), ``at`` (Zagoruyko & Komodakis 2017), ``lsp`` (Yang et al. 2020),
``gcrd`` (Joshi et al. 2022) and ``abkd`` (Ahluwalia et al. 2023; docs/ARCHITECTURE.md
section 5).
Build one with ``LOSSES.get(name)(dims, **options)``.
"""

from .abkd import AttentionKDTerm
from .at import AttentionTransferTerm
from .base import LOSSES, KDBatch, LayerDims, LossTerm, proportional_layer, register_loss
from .ce import CrossEntropyTerm
from .fitnet import FitNetTerm
from .gcrd import ContrastiveTerm
from .kd import LogitKDTerm
from .lsp import LocalStructureTerm

__all__ = [
    "LOSSES",
    "AttentionKDTerm",
    "AttentionTransferTerm",
    "ContrastiveTerm",
    "CrossEntropyTerm",
    "FitNetTerm",
    "KDBatch",
    "LayerDims",
    "LocalStructureTerm",
    "LogitKDTerm",
    "LossTerm",
    "proportional_layer",
    "register_loss",
]
