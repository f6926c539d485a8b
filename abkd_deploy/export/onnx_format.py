"""``onnx`` format: ``torch.onnx.export(dynamo=True)`` with named dynamic dims.

Why the dynamo exporter: it is torch's default and maintained path; the TorchScript
exporter (``dynamo=False``) is deprecated, and at opset < 16 it silently writes
ScatterElements without reduction (docs/ARCHITECTURE.md section 9.4). Both produce the
same gather-only graphs for ``ell``/``embedded``; dynamo names the dynamic dims after the ``Dim`` s
(``n0``, ``batch``, ...), which the manifest uses too.

Weights larger than :data:`EXTERNAL_DATA_BYTES` go to ``model.onnx.data`` (ONNX
external data: raw little-endian tensors, memory-mappable), so the protobuf stays far
below its 2 GB limit. The manifest is stored in ``metadata_props`` by
:func:`write_metadata` once validation has passed. An int8 module (``--quantize int8``:
its tables are :class:`~abkd_deploy.export.quantize.QuantizedTable` s) gets one
``DequantizeLinear`` per lookup (:func:`~abkd_deploy.export.quantize_onnx.finish_int8`),
same external-data layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from abkd_deploy.errors import ExportError, first_line
from abkd_deploy.export import quantize
from abkd_deploy.export.adjacency import AdjacencyFormat, ExportSpec
from abkd_deploy.export.formats import (
    FORMATS,
    ArtifactFormat,
    Runner,
    cast_inputs,
    exporter_call,
    module_dtype,
)
from abkd_deploy.export.quantize_onnx import finish_int8
from abkd_deploy.manifest import METADATA_KEY

#: Initializers above this total size are written as external data.
EXTERNAL_DATA_BYTES = 64 * 2**20

_ONNX_DTYPES = {torch.float32: "tensor(float)", torch.float16: "tensor(float16)"}


def initializer_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (what becomes ONNX initializers)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(module: nn.Module, spec: ExportSpec, path: Path, opset: int) -> list[Path]:
    """Exports ``module`` (already in the artifact dtype) to ``path``.

    Returns:
        ``[model.onnx]`` or ``[model.onnx, model.onnx.data]``.

    Raises:
        ExportError: the exporter failed (its first line is kept).
    """
    example = tuple(cast_inputs(spec.example, module_dtype(module)))
    with exporter_call("ONNX export", logger="torch.onnx"):
        program = torch.onnx.export(
            module,
            example,
            None,
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamic_shapes=spec.dynamic_shapes,
            optimize=True,
            verbose=False,
        )
        external = spec.external_data or initializer_bytes(module) > EXTERNAL_DATA_BYTES
        program.save(str(path), external_data=external)
    if any(isinstance(m, quantize.QuantizedTable) for m in module.modules()):
        with exporter_call("int8 ONNX post-processing", logger="onnxruntime"):
            finish_int8(path, external, quantize.QUANTIZE_WEIGHTS)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    _check_opset(path, opset)
    return files


def _check_opset(path: Path, opset: int) -> None:
    model = onnx.load(str(path), load_external_data=False)
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"ONNX exporter wrote opset {got}, not the requested {opset}")


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` on the path (external data aware).

    Raises:
        ExportError: the model is invalid.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = first_line(exc)
        raise ExportError(f"{path.name} fails onnx.checker: {first}") from None


def op_types(path: Path) -> set[str]:
    """Op types used in the main graph of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def check_written(path: Path, adjacency: AdjacencyFormat) -> None:
    """The format's ``check``: :func:`check_onnx`, and no Scatter op in a graph that the
    adjacency format declares gather-only (``ell``/``embedded``).

    Raises:
        ExportError: the model is invalid or scatters where it must not.
    """
    check_onnx(path)
    if adjacency.gather_only:
        scatter = sorted(op for op in op_types(path) if op.startswith("Scatter"))
        if scatter:
            raise ExportError(f"{path.name} contains {', '.join(scatter)}; expected gather-only")


def output_names(path: Path) -> list[str]:
    """Names of the graph outputs of an ONNX file, in order."""
    model = onnx.load(str(path), load_external_data=False)
    return [out.name for out in model.graph.output]


def refuse_dtype(dtype: str, adjacency: AdjacencyFormat) -> str | None:
    """float16 with an adjacency that scatters: onnxruntime's CPU kernels lack it."""
    if dtype == "float16" and not adjacency.gather_only:
        return (
            f"{adjacency.name} adjacency cannot be exported to onnx as float16: onnxruntime's "
            "CPU ScatterElements has no float16 'add'; use --dtype float32 or --adjacency ell"
        )
    return None


def load_onnx(path: Path, dtype: torch.dtype, num_threads: int) -> Runner:
    """An onnxruntime CPU session on ``path`` as a :data:`Runner`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for node in session.get_inputs():
        if node.type.startswith("tensor(float") and node.type != _ONNX_DTYPES[dtype]:
            raise ExportError(f"{path.name}: input {node.name} is {node.type}, expected {dtype}")

    def run(inputs) -> list:
        feed = {n: t.numpy() for n, t in zip(names, cast_inputs(inputs, dtype), strict=True)}
        return [o.astype("float32", copy=False) for o in session.run(None, feed)]

    return run


def write_metadata(path: Path, manifest: dict[str, Any]) -> None:
    """Stores ``manifest`` as JSON in ``metadata_props[abkd_manifest]`` (protobuf only).

    External tensors keep their references: only ``model.onnx`` is rewritten.
    """
    model = onnx.load(str(path), load_external_data=False)
    entries = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(entries)
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, json.dumps(manifest, sort_keys=False)
    tmp = path.with_name(path.name + ".meta.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


FORMATS.register("onnx")(
    ArtifactFormat(
        "onnx",
        "model.onnx",
        export_onnx,
        load_onnx,
        refuse_dtype=refuse_dtype,
        check=check_written,
        finalize=write_metadata,
        output_names=output_names,
    )
)
