"""Artifact formats (``onnx``, ``torchscript``, ``pt2``): the registry and its protocol.

A format turns an export-form module (:mod:`abkd_deploy.export.modules`) plus its
:class:`~abkd_deploy.export.adjacency.ExportSpec` into files, and loads them back as a
:data:`Runner` so that validation and accuracy use the artifact itself, not the module.
Formats register themselves in :data:`FORMATS` (one module each).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from abkd_deploy.errors import ExportError, first_line
from abkd_deploy.registry import Registry

if TYPE_CHECKING:
    from abkd_deploy.export.adjacency import AdjacencyFormat, ExportSpec

#: Runs an artifact: flat fp32/int64 torch inputs -> float32 numpy outputs.
Runner = Callable[[Sequence[Tensor]], list[np.ndarray]]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself for float32, else a copy with float params/buffers in ``dtype``."""
    if dtype == torch.float32:
        return module
    return copy.deepcopy(module).to(dtype)


@contextlib.contextmanager
def exporter_call(what: str, logger: str | None = None) -> Iterator[None]:
    """Runs a torch exporter quietly and turns its failure into one line.

    Warnings, stdout and (if named) ``logger`` below ERROR are silenced (the exporters
    print deprecation notes, graph dumps and "torchvision is not installed"); any
    exception becomes ``ExportError("{what} failed: <first line>")``.
    """
    log = logging.getLogger(logger) if logger else None
    level = log.level if log else logging.NOTSET
    if log:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:  # exporter errors come in many types
        first = first_line(exc)
        raise ExportError(f"{what} failed: {first}") from exc
    finally:
        if log:
            log.setLevel(level)


def accepts_every_dtype(dtype: str, adjacency: AdjacencyFormat) -> str | None:
    """Default :attr:`ArtifactFormat.refuse_dtype`: nothing is refused."""
    return None


def no_check(path: Path, adjacency: AdjacencyFormat) -> None:
    """Default :attr:`ArtifactFormat.check`: nothing beyond loading and validating."""


def no_finalize(path: Path, manifest: dict[str, Any]) -> None:
    """Default :attr:`ArtifactFormat.finalize`: the manifest is not stored in the file."""


@dataclass(frozen=True)
class ArtifactFormat:
    """One artifact format: how it is written and loaded, and its hooks in the pipeline.

    Attributes:
        name: Registry name (``--format``).
        filename: Main file written in the export directory.
        export: ``(module, spec, path, opset) -> files written`` (``module`` is already
            in the artifact dtype; the first file is ``path``).
        load: ``(path, dtype, threads) -> Runner``.
        refuse_dtype: ``(dtype, adjacency) -> reason`` when this format cannot hold that
            adjacency form in ``dtype``, else ``None`` (checked before anything is built).
        check: ``(path, adjacency)``: checks of the written file before it is loaded
            (raises :class:`ExportError`), e.g. ONNX's checker and gather-only graphs.
        finalize: ``(path, manifest)``: last write to the file once validation passed and
            the manifest is built (before the files are hashed), e.g. ONNX metadata.
        output_names: ``path -> names`` of the outputs the file declares, checked by
            validation; ``None`` for formats whose outputs are positional.
    """

    name: str
    filename: str
    export: Callable[[nn.Module, ExportSpec, Path, int], list[Path]]
    load: Callable[[Path, torch.dtype, int], Runner]
    refuse_dtype: Callable[[str, AdjacencyFormat], str | None] = accepts_every_dtype
    check: Callable[[Path, AdjacencyFormat], None] = no_check
    finalize: Callable[[Path, dict[str, Any]], None] = no_finalize
    output_names: Callable[[Path], list[str]] | None = None


FORMATS: Registry[ArtifactFormat] = Registry("export format")


def get_format(name: str) -> ArtifactFormat:
    """The registered format ``name`` (ConfigError listing the known ones otherwise)."""
    _import_builtin_formats()
    return FORMATS.get(name)


def format_names() -> list[str]:
    _import_builtin_formats()
    return FORMATS.names()


def runner_threads() -> int:
    """Threads a loaded artifact runs with: the CPUs really available to this process
    (validation must see the thread count that serving uses; docs/ARCHITECTURE.md 9.4)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def module_dtype(module: nn.Module) -> torch.dtype:
    """Float dtype of a module's first floating parameter or buffer (float32 if none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def cast_inputs(inputs: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Float inputs -> ``dtype`` (the artifact's); integer inputs unchanged, contiguous."""
    return [(t.to(dtype) if t.is_floating_point() else t).contiguous() for t in inputs]


def as_numpy_outputs(outputs: Tensor | Sequence[Tensor]) -> list[np.ndarray]:
    """Module outputs (one tensor or a tuple) -> list of float32 numpy arrays."""
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    return [o.detach().float().cpu().numpy() for o in outputs]


def torch_runner(module: Callable[..., Tensor], dtype: torch.dtype) -> Runner:
    """A :data:`Runner` around a callable torch module (TorchScript / torch.export)."""

    def run(inputs: Sequence[Tensor]) -> list[np.ndarray]:
        with torch.inference_mode():
            return as_numpy_outputs(module(*cast_inputs(inputs, dtype)))

    return run


def _import_builtin_formats() -> None:
    # Importing a format module registers it (one module per format).
    import abkd_deploy.export.onnx_format
    import abkd_deploy.export.pt2_format
    import abkd_deploy.export.torchscript_format  # noqa: F401
