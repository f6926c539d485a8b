"""``pt2`` format: ``torch.export.export`` with dynamic shapes -> ``model.pt2``.

The program keeps the symbolic dims of the spec (``batch``, ``n0``, ``num_edges``, ...)
with their ranges; ``torch.export.load(path).module()`` runs it on any size in range.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from abkd_deploy.export.adjacency import ExportSpec
from abkd_deploy.export.formats import (
    FORMATS,
    ArtifactFormat,
    Runner,
    cast_inputs,
    exporter_call,
    module_dtype,
    torch_runner,
)


def export_pt2(module: nn.Module, spec: ExportSpec, path: Path, opset: int) -> list[Path]:
    """Exports ``module`` with ``spec.dynamic_shapes`` and saves it (``opset`` unused).

    Raises:
        ExportError: ``torch.export`` failed.
    """
    example = tuple(cast_inputs(spec.example, module_dtype(module)))
    with exporter_call("torch.export"):
        program = torch.export.export(module, example, dynamic_shapes=spec.dynamic_shapes)
        torch.export.save(program, str(path))
    return [path]


def load_pt2(path: Path, dtype: torch.dtype, num_threads: int) -> Runner:
    """Loads ``model.pt2`` back as a :data:`Runner`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(path)).module()
    return torch_runner(module, dtype)


FORMATS.register("pt2")(ArtifactFormat("pt2", "model.pt2", export_pt2, load_pt2))
