"""int8 tables (``export --quantize int8``): per-row int8, dequantised after the gather.

The per-node float tables of an ``embedded`` module (:data:`TABLE_NAMES`: the (folded)
``features`` / ``dst_features``, the precomputed ``hidden`` table, the ``--precompute
all`` output tables, the per-slot neighbour weights ``weight_l`` and the states
``state_l`` of ``new_nodes.onnx``) at least :data:`MIN_WIDTH` columns wide become
:class:`QuantizedTable` s: int8 values with one float32 scale per row (symmetric:
``scale = max|row| / 127``, an all-zero row gets scale 1). A request gathers int8 rows
and their scales and dequantises right after the gather (torch: ``Cast`` and ``Mul``;
ONNX: one ``DequantizeLinear`` per gather, :mod:`abkd_deploy.export.quantize_onnx`), so
no table is ever materialised in float. Integer tables (neighbour ids) are unchanged; the
compute (weights, activations) stays float32. Validated against the float32 PyTorch
module with a tolerance relative to each output's scale (:data:`INT8_RTOL`).

docs/FORMATS.md "int8 tables" describes the graph; docs/BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import Tensor, nn

from abkd_deploy.errors import ConfigError

#: ``quantize`` values; ``None`` means ``"none"``.
QUANTIZE_MODES = ("none", "int8")
#: Buffer names of the float per-node tables that ``int8`` stores as :class:`QuantizedTable`.
TABLE_NAMES = ("features", "dst_features", "hidden", "logits_table", "embedding_table")
#: Per-slot neighbour weights ``weight_1``, ``weight_2``, ... ([N, K] float) and the
#: stored states ``state_0``, ``state_1``, ... of ``new_nodes.onnx`` are tables too.
NUMBERED_TABLE = re.compile(r"(weight|state)_\d+")
#: Narrower tables stay float32: a per-row float32 scale makes int8 save less than 2.3x
#: on them, and each quantized gather costs a dequantising node per request (measured:
#: the [N, C] folded last-layer table of a precomputed export, C = 5 classes, added ~30%
#: to the p50 at batch 64 and saved 11 bytes per node; docs/BENCHMARKS.md).
MIN_WIDTH = 8
#: Validation tolerance of an int8 artifact, relative to each output's scale (the largest
#: |value| of that output in the float32 reference over all input sets): per-row int8
#: rounds each table entry by at most ``max|row| / 254`` (0.4% of the row's scale) and the
#: test students stay near 0.3% of the output scale, so 2% leaves room for deeper models
#: (and the optional int8 weights) while a wrong graph (a scale per column, a missing
#: dequantisation) is far above it.
INT8_RTOL = 0.02
#: Whether ``int8`` also quantizes the ONNX MatMul weights
#: (:func:`~abkd_deploy.export.quantize_onnx.quantize_onnx_weights`, onnxruntime dynamic
#: quantization). Off: measured on a per-request tree (100k-node csbm, batch 64) it gained
#: neither size (the weights are kilobytes) nor p50 nor accuracy, and a precomputed export
#: has no weight MatMul left in its main graph (docs/BENCHMARKS.md); benchmarks set it.
QUANTIZE_WEIGHTS = False


def quantize_mode(value: str | None) -> str:
    """Normalises ``export(quantize=...)`` (``None`` -> ``"none"``).

    Raises:
        ConfigError: a value that is not one of :data:`QUANTIZE_MODES`.
    """
    mode = "none" if value is None else str(value)
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"unknown quantize mode {value!r}; expected one of: none, int8")
    return mode


def refuse_quantize(mode: str, adjacency: str, dtype: str) -> str | None:
    """Why ``mode`` cannot be exported with ``adjacency`` / ``dtype``, or ``None``."""
    if mode == "none":
        return None
    if adjacency != "embedded":
        return (
            f"--quantize int8 stores the embedded tables as int8 and needs --adjacency "
            f"embedded; {adjacency!r} takes its graph as input (use --quantize none)"
        )
    if dtype != "float32":
        return (
            f"--quantize int8 dequantises to float32 and cannot be combined with --dtype "
            f"{dtype}; use --dtype float32"
        )
    return None


def quantize_rows(table: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization.

    Args:
        table: [N, F] float.

    Returns:
        ``(values, scale)``: values [N, F] int8 in ``[-127, 127]``, scale [N, 1] float32
        with ``scale = max|row| / 127`` (1 for an all-zero row), so that
        ``values * scale`` is within ``scale / 2`` of ``table`` element-wise.
    """
    t = table.detach().to(torch.float32)
    peak = t.abs().amax(dim=1, keepdim=True) if t.size(1) else t.new_zeros((t.size(0), 1))
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    values = torch.round(t / scale).clamp_(-127, 127).to(torch.int8)
    return values.contiguous(), scale.contiguous()


def dequantize_rows(values: Tensor, scale: Tensor) -> Tensor:
    """``values`` [n, F] int8, ``scale`` [n, 1] float32 -> [n, F] float32."""
    return values.to(scale.dtype) * scale


class QuantizedTable(nn.Module):
    """A [N, F] float table stored as int8 rows with one float32 scale per row.

    Stands in for the float buffer it replaces: :meth:`index_select` (dim 0) and
    :meth:`lookup` gather the int8 rows and their scales, then dequantise (ONNX: Gather,
    Gather, Cast, Mul).

    Args:
        table: [N, F] float table to quantize (:func:`quantize_rows`).
    """

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        values, scale = quantize_rows(table)
        self.register_buffer("values", values)
        self.register_buffer("scale", scale)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def size(self, dim: int | None = None):
        return self.values.size() if dim is None else self.values.size(dim)

    def lookup(self, ids: Tensor) -> Tensor:
        """``ids`` [n] int64 -> [n, F] float32 dequantised rows."""
        return dequantize_rows(self.values.index_select(0, ids), self.scale.index_select(0, ids))

    def index_select(self, dim: int, ids: Tensor) -> Tensor:
        """``table.index_select(0, ids)`` of the float table it replaces (dim 0 only)."""
        if dim != 0:
            raise ValueError(f"a QuantizedTable gathers rows only (dim 0), got dim={dim}")
        return self.lookup(ids)

    def placeholder(self) -> Tensor:
        """An empty [0, F] float32 tensor (an input that the layer reads only through its
        operand, :class:`~abkd_deploy.export.modules.TableBlock`)."""
        return self.scale.new_zeros((0, self.values.size(1)))

    def dequantize(self) -> Tensor:
        """The whole [N, F] float32 table (tests and measurements only)."""
        return dequantize_rows(self.values, self.scale)


def lookup(table: Tensor | QuantizedTable, ids: Tensor) -> Tensor:
    """Rows ``ids`` of a float table (``F.embedding``: one Gather) or a quantized one."""
    if isinstance(table, QuantizedTable):
        return table.lookup(ids)
    return nn.functional.embedding(ids, table)


def is_table(name: str, buffer: Tensor) -> bool:
    """Whether a buffer is one of the float per-node tables that ``int8`` quantizes."""
    wanted = name in TABLE_NAMES or NUMBERED_TABLE.fullmatch(name) is not None
    return (
        wanted and buffer.is_floating_point() and buffer.dim() == 2 and buffer.size(1) >= MIN_WIDTH
    )


@torch.no_grad()
def quantize_tables(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every table buffer (:func:`is_table`) replaced by a
    :class:`QuantizedTable` registered under the same name (``module`` is not changed).

    Raises:
        ValueError: the module holds no table to quantize.
    """
    out = copy.deepcopy(module)
    count = 0
    for sub in list(out.modules()):
        for name, buf in list(sub._buffers.items()):
            if buf is not None and is_table(name, buf):
                del sub._buffers[name]
                sub.add_module(name, QuantizedTable(buf))
                count += 1
    if count == 0:
        raise ValueError(f"{type(module).__name__} holds no float table to quantize")
    return out


def table_names(module: nn.Module) -> list[str]:
    """Dotted names of the buffers of ``module`` that :func:`quantize_tables` replaces."""
    return [name for name, buf in module.named_buffers() if is_table(name.split(".")[-1], buf)]


def quantize_entry(mode: str, module: nn.Module) -> dict[str, Any]:
    """The manifest's ``quantize`` entry for an export of ``module`` (float32, unquantized).

    ``{"mode": "none"}``, or for ``int8``: the scheme, the tables it stored as int8
    (:func:`table_names`, also in ``new_nodes.onnx``) and the weights' dtype.
    """
    if mode == "none":
        return {"mode": "none"}
    return {
        "mode": mode,
        "tables": table_names(module),
        "scheme": "int8 values [N, F], symmetric float32 scale per row [N] = max|row| / 127",
        "min_width": MIN_WIDTH,
        "dequantize": "after the gather: DequantizeLinear(Gather(values), Gather(scale), axis 0)",
        "weights": "int8 (onnxruntime dynamic, MatMul)" if QUANTIZE_WEIGHTS else "float32",
        "rtol": INT8_RTOL,
    }
