"""``torchscript`` format: ``torch.jit.trace`` of the export-form module -> ``model.pt``.

TorchScript is deprecated (every ``torch.jit`` call warns so); it is offered for
runtimes that still load ``.pt`` files (LibTorch C++). We *trace* rather than script:
``jit.script`` of the GCN student saves but fails to load and GAT fails to script
(docs/ARCHITECTURE.md section 9.4), while the export-form modules are straight-line
tensor code whose sizes trace as symbolic ``aten::size`` values, so one trace serves
every input size. That claim is checked, not assumed: the loaded file is validated on
other sizes than the traced one like every other artifact.
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


def export_torchscript(module: nn.Module, spec: ExportSpec, path: Path, opset: int) -> list[Path]:
    """Traces ``module`` on ``spec.example`` and saves it (``opset`` is unused).

    Raises:
        ExportError: tracing failed.
    """
    example = tuple(cast_inputs(spec.example, module_dtype(module)))
    with exporter_call("TorchScript trace"):
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
        torch.jit.save(traced, str(path))
    return [path]


def load_torchscript(path: Path, dtype: torch.dtype, num_threads: int) -> Runner:
    """Loads ``model.pt`` back (CPU) as a :data:`Runner`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    return torch_runner(module, dtype)


FORMATS.register("torchscript")(
    ArtifactFormat("torchscript", "model.pt", export_torchscript, load_torchscript)
)
