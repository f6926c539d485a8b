"""Reading and replacing the per-node tables of a written ONNX graph (``refresh``).

An ``embedded`` graph's per-node tables (features, fanout tables, precomputed states)
are initializers named after the export-form module's buffers (``hidden``,
``last.nbr_1``, ``state_0``, ...). A refresh changes their values and their row count,
never the graph: so it rewrites the initializers of the parent's file instead of tracing
the model again. The exporter may rename a buffer it rewrites (``last.features`` can
become ``clone``), so the export records which initializer holds which buffer, found by
content (:func:`initializer_tables`). Every initializer with the parent's row count (or one
more: a source table with the extra zero row of a factored ``mean`` layer,
:class:`~abkd_deploy.export.modules.FactoredTableBlock`) must be replaced, or the file is
refused (a table the refresh does not know would keep stale rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from abkd_deploy.errors import ExportError


@dataclass
class Graph:
    """An ONNX file's protobuf, with its external tensors left on disk.

    Attributes:
        model: The protobuf (external tensors are references).
        directory: Where the external data files are.
    """

    model: onnx.ModelProto
    directory: Path


def load_graph(path: Path) -> Graph:
    """The protobuf of ``path``; external tensors are read only when asked for.

    Raises:
        ExportError: the file cannot be read.
    """
    try:
        return Graph(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise ExportError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def tensor_array(tensor: onnx.TensorProto, directory: Path) -> np.ndarray:
    """A writable copy of an initializer, internal or external.

    Raises:
        ExportError: an external reference that leaves ``directory`` or is cut short.
    """
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor).copy()
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    raw = _external_bytes(tensor, directory, count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(list(tensor.dims))


def _external_bytes(tensor: onnx.TensorProto, directory: Path, size: int) -> bytearray:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location or Path(location).name != location:
        raise ExportError(f"initializer {tensor.name!r} points outside its folder: {location!r}")
    offset, length = int(info.get("offset", 0)), int(info.get("length", size))
    with open(directory / location, "rb") as f:
        f.seek(offset)
        raw = bytearray(f.read(length))
    if len(raw) != size:
        raise ExportError(f"{location}: initializer {tensor.name!r} is cut short")
    return raw


def read_initializers(graph: Graph, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Copies of the initializers ``names`` of ``graph``.

    Raises:
        ExportError: ``graph`` lacks one of the names.
    """
    found = {t.name: t for t in graph.model.graph.initializer if t.name in set(names)}
    missing = [n for n in names if n not in found]
    if missing:
        raise ExportError(f"the new-node graph has no initializer {missing[0]!r}; re-export it")
    return {n: tensor_array(found[n], graph.directory) for n in names}


def initializer_tables(path: Path, module: nn.Module, num_rows: int) -> dict[str, str]:
    """``{initializer name: buffer name}`` for the per-node tables of an exported file.

    An initializer with ``num_rows`` rows (or ``num_rows + 1``: :func:`is_node_table`) is
    matched to the buffer of ``module`` (the module the file was exported from) with the
    same dtype, shape and values; one without a match is left out (a refresh then refuses
    the file).
    """
    model = onnx.load(str(path))
    buffers = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    names = {}
    for init in model.graph.initializer:
        if not is_node_table(list(init.dims), num_rows):
            continue
        arr = numpy_helper.to_array(init)
        if init.name in buffers and _same(buffers[init.name], arr):
            names[init.name] = init.name
            continue
        match = next((k for k, v in buffers.items() if _same(v, arr)), None)
        if match is not None:
            names[init.name] = match
    return names


def is_node_table(dims: Sequence[int], num_rows: int) -> bool:
    """Whether an initializer of shape ``dims`` is a per-node table of a ``num_rows``-node
    graph: ``num_rows`` rows, or one more (a source table with its extra zero row)."""
    return bool(dims) and dims[0] in (num_rows, num_rows + 1)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@dataclass(frozen=True)
class Rewritten:
    """What :func:`rewrite_initializers` wrote: its files and the graph's output names."""

    files: list[Path]
    output_names: list[str]


def rewrite_initializers(
    src: Path | Graph,
    dst: Path,
    values: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    old_rows: int,
) -> Rewritten:
    """Writes ``src`` to ``dst`` with the initializers named in ``values`` replaced.

    Tables are written as raw little-endian arrays into ``dst.name + ".data"`` (ONNX
    external data, offsets aligned to 4 KiB for memory mapping), so neither the parent's
    tables nor the new ones pass through protobuf; the protobuf itself is small.

    Args:
        src: The parent's ONNX file, or that file already loaded (:func:`load_graph`;
            changed in place).
        dst: Where to write.
        values: New values by buffer name. Each must keep its initializer's dtype and
            every dimension but the first.
        names: ``{initializer name: buffer name}`` of the tables (:func:`initializer_tables`).
        old_rows: The parent's node count: every initializer with that many rows (or one
            more) must be in ``values``.

    Returns:
        The files written (``dst`` and possibly its ``.data``) and the output names.

    Raises:
        ExportError: a dtype or trailing shape differs, or a node table is not replaced.
    """
    graph = load_graph(src) if isinstance(src, Path) else src
    model, label = graph.model, dst.name
    data = dst.with_name(dst.name + ".data")
    with open(data, "wb") as out:
        for init in model.graph.initializer:
            dims = list(init.dims)
            if init.name in names:
                arr = np.ascontiguousarray(values[names[init.name]])
                want = helper.tensor_dtype_to_np_dtype(init.data_type)
                if arr.dtype != want or list(arr.shape[1:]) != dims[1:] or arr.ndim != len(dims):
                    raise ExportError(
                        f"{label}: initializer {init.name!r} is {want}{dims}, the refreshed "
                        f"table is {arr.dtype}{list(arr.shape)}; re-export instead of refreshing"
                    )
                _write_external(
                    init,
                    arr.astype(arr.dtype.newbyteorder("<")).tobytes(),
                    arr.shape,
                    out,
                    data.name,
                )
            elif is_node_table(dims, old_rows):
                raise ExportError(
                    f"{label}: initializer {init.name!r} {dims} looks like a per-node table "
                    "this refresh does not rebuild; re-export instead of refreshing"
                )
            elif init.data_location == onnx.TensorProto.EXTERNAL:  # a weight: copied as is
                size = int(np.prod(dims, dtype=np.int64)) * _itemsize(init.data_type)
                raw = _external_bytes(init, graph.directory, size)
                _write_external(init, bytes(raw), dims, out, data.name)
        written = out.tell()
    _drop_stale_shapes(model.graph, old_rows)
    onnx.save_model(model, str(dst))
    outputs = [o.name for o in model.graph.output]
    if not written:
        data.unlink()
        return Rewritten([dst], outputs)
    return Rewritten([dst, data], outputs)


#: Offsets of external tensors are multiples of this (memory-mappable pages).
ALIGN = 4096


def _write_external(
    init: onnx.TensorProto, raw: bytes, shape: Sequence[int], out: Any, location: str
) -> None:
    """Appends ``raw`` to ``out`` (aligned) and points ``init`` at it."""
    pad = -out.tell() % ALIGN
    out.write(b"\0" * pad)
    offset = out.tell()
    out.write(raw)
    data_type, name = init.data_type, init.name
    init.Clear()
    init.name, init.data_type = name, data_type
    init.dims.extend(int(d) for d in shape)
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
        entry = init.external_data.add()
        entry.key, entry.value = key, str(value)


def _drop_stale_shapes(graph: onnx.GraphProto, old_rows: int) -> None:
    """Removes the shape annotations (``value_info``) that name the parent's row count:
    they are optional, and stale once the tables grew."""
    keep = [
        vi
        for vi in graph.value_info
        if not any(d.dim_value in (old_rows, old_rows + 1) for d in vi.type.tensor_type.shape.dim)
    ]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
