"""Writing and validating ``new_nodes.onnx`` next to an ``embedded`` ONNX export.

Two checks, both before the export is renamed into place:

1. The ONNX graph equals its PyTorch module (:class:`~.new_nodes.NewNodeStudent`) on
   made-up new nodes and on re-described stored nodes (:func:`~.validate.validate_artifact`).
2. The module agrees with the main graph: stored nodes whose tables hold all their
   neighbours, re-described as new nodes, get their own answers (:func:`check_consistency`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abkd_deploy.errors import ValuesMismatch
from abkd_deploy.export.adjacency import ExportContext, ExportSpec
from abkd_deploy.export.formats import DTYPES, cast_module, get_format, runner_threads
from abkd_deploy.export.new_nodes import (
    NEW_NODES_FILE,
    PAD,
    describe_existing,
    exact_nodes,
    new_node_module,
    new_node_spec,
    refuse_new_nodes,
)
from abkd_deploy.export.onnx_tables import initializer_tables
from abkd_deploy.export.quantize import quantize_tables, table_names
from abkd_deploy.export.validate import validate_artifact

#: Stored nodes compared in :func:`check_consistency` (at most).
CONSISTENCY_NODES = 512


def wants_new_nodes(ctx: ExportContext, adjacency: str, formats: list[str]) -> bool:
    """Whether this export gets a new-node graph: ``embedded`` ONNX of a supported arch."""
    return adjacency == "embedded" and "onnx" in formats and refuse_new_nodes(ctx.student) is None


@torch.no_grad()
def check_consistency(
    ctx: ExportContext, module: nn.Module, main: nn.Module, width: int, atol: float
) -> float:
    """Max abs diff between the new-node answers of re-described stored nodes and the main
    module's answers for them (0.0 when no stored node has all its neighbours in its tables).

    Raises:
        ValuesMismatch: a difference above ``atol`` (the new-node semantics are broken).
    """
    ids = exact_nodes(ctx)[:CONSISTENCY_NODES]
    if not ids.numel():
        return 0.0
    worst = 0.0
    new = module(*describe_existing(ctx, ids, width))
    stored = main(ids)
    for name, a, b in zip(("logits", "embedding"), new, stored, strict=True):
        diff = float((a.float() - b.float()).abs().max())
        worst = max(worst, diff)
        if diff > atol:
            raise ValuesMismatch(
                f"new-node graph: {name} of {ids.numel()} stored nodes re-described as new "
                f"nodes differ from their own answers by {diff:.3g} > atol {atol:g}"
            )
    return worst


def write_new_nodes(
    ctx: ExportContext,
    main: ExportSpec,
    tmp: Path,
    opset: int,
    dtype: str,
    atol: float,
    log: Callable[[str], None],
    quantize: str = "none",
    rtol: float = 0.0,
) -> tuple[dict[str, Any], list[str]]:
    """Exports, checks and validates ``new_nodes.onnx`` into the staging folder ``tmp``.

    ``quantize="int8"``: the stored states (``state_l``) become int8 tables with per-row
    scales, as in the main graph (:func:`~.quantize.quantize_tables`), validated against
    the float32 module within ``atol + rtol`` x each output's scale.

    Returns:
        ``(manifest entry, files written)``.

    Raises:
        ExportError / ValidationError: the graph could not be written or validated.
    """
    t0 = time.perf_counter()
    fmt = get_format("onnx")
    emb_dim = int(main.outputs[1]["shape"][1])
    module = new_node_module(ctx)
    spec = new_node_spec(ctx, module, emb_dim)
    spec.external_data = True  # its tables are what refresh rewrites
    width = int(spec.inputs[1]["shape"][1])
    reference = main.module if main.reference is None else main.reference
    consistency = check_consistency(ctx, module, reference, width, atol)
    art = cast_module(module, DTYPES[dtype])
    if quantize == "int8":
        art = quantize_tables(art)
    paths = fmt.export(art, spec, tmp / NEW_NODES_FILE, opset)
    runner = fmt.load(paths[0], DTYPES[dtype], runner_threads())
    diffs = validate_artifact(
        "new_nodes.onnx",
        runner,
        module,
        spec.validation,
        spec.output_names,
        atol,
        lambda _msg: None,
        declared=fmt.output_names(paths[0]) if fmt.output_names else None,
        rtol=rtol,
    )
    size = sum(p.stat().st_size for p in paths)
    log(
        f"  new nodes: {', '.join(p.name for p in paths)} ({size / 2**20:.1f} MiB), up to "
        f"{width} neighbours; max abs diff {max(diffs.values()):.2e} vs PyTorch, "
        f"{consistency:.2e} vs stored answers"
    )
    entry = {
        "file": NEW_NODES_FILE,
        "inputs": spec.inputs,
        "outputs": spec.outputs,
        "max_neighbors": width,
        "padding": PAD,
        "fanouts": list(ctx.fanouts),
        "max_abs_diff": diffs,
        "stored_answers_max_abs_diff": consistency,
        "tables": initializer_tables(paths[0], art, ctx.data.num_nodes),
        "int8_tables": table_names(module) if quantize == "int8" else [],
        "export_s": round(time.perf_counter() - t0, 3),
    }
    return entry, [p.name for p in paths]
