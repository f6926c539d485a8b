"""``ell`` adjacency: x and per-layer padded neighbour tables in, logits out.

Gather + MatMul only, all sizes dynamic: for a caller that samples its own neighbourhoods
(the prefix layout: each layer's destinations are the first rows of its sources;
docs/FORMATS.md). ``None`` fanout means every neighbour (exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.export import Dim

from abkd_deploy.export.adjacency import (
    ADJACENCY,
    AdjacencyFormat,
    ExportContext,
    ExportSpec,
    batched,
    feature_rows,
    refuse_float16_gat,
    spec,
)
from abkd_deploy.export.formats import Runner
from abkd_deploy.export.modules import EllStudent


def _ell_block_inputs(ctx: ExportContext, targets: Tensor) -> tuple[Tensor, ...]:
    batch = ctx.sampler.sample(targets)
    flat = [ctx.data.x[batch.n_id].contiguous()]
    for blk in batch.blocks:
        flat += [blk.nbr.contiguous(), blk.weight.contiguous()]
        if blk.self_weight is not None and ctx.student.norm == "gcn":
            flat.append(blk.self_weight.reshape(-1).contiguous())
    return tuple(flat)


def _ell_random_inputs(
    ctx: ExportContext, sizes: Sequence[int], ks: Sequence[int], gen: torch.Generator
) -> tuple[Tensor, ...]:
    """Random blocks: ids drawn with replacement (duplicates), ~20% padded slots, and
    weights scaled like real normalised ones (each row sums to at most 1)."""
    flat = [feature_rows(ctx, sizes[0], gen)]
    for layer, k in enumerate(ks, start=1):
        n, src = sizes[layer], sizes[layer - 1]
        nbr = torch.randint(0, src, (n, k), generator=gen)
        w = torch.rand(n, k, generator=gen) * (torch.rand(n, k, generator=gen) > 0.2)
        flat += [nbr, w / (w.sum(1, keepdim=True) + 0.5)]
        if ctx.student.norm == "gcn":
            flat.append(torch.rand(n, generator=gen) / 2)
    return tuple(flat)


def build_ell(ctx: ExportContext) -> ExportSpec:
    """``ell``: x and per-layer padded tables in, logits out."""
    if ctx.typed:  # typed students: flat inputs per node type and relation
        from abkd_deploy.export.typed_ell import build_typed_ell

        return build_typed_ell(ctx)
    student, num_layers = ctx.student, ctx.student.num_layers
    with_self = student.norm == "gcn"
    names, inputs, shapes = ["x"], [spec("x", ctx.dtype, ["n0", student.in_channels])], []
    shapes.append({0: Dim("n0", min=1)})
    graph_shapes: list[dict[int, Any]] = []
    for layer in range(1, num_layers + 1):
        n, k = Dim(f"n{layer}", min=1), Dim(f"k{layer}", min=1)
        names += [f"nbr_{layer}", f"weight_{layer}"]
        inputs += [
            spec(f"nbr_{layer}", "int64", [f"n{layer}", f"k{layer}"]),
            spec(f"weight_{layer}", ctx.dtype, [f"n{layer}", f"k{layer}"]),
        ]
        graph_shapes += [{0: n, 1: k}, {0: n, 1: k}]
        if with_self:
            names.append(f"self_weight_{layer}")
            inputs.append(spec(f"self_weight_{layer}", ctx.dtype, [f"n{layer}"]))
            graph_shapes.append({0: n})
    sizes = [5]
    for _ in range(num_layers):
        sizes.insert(0, 2 * sizes[0] + 1)
    gen = ctx.generator()
    example = _ell_random_inputs(ctx, sizes, [k + 1 for k in ctx.fanouts], gen)
    n_nodes = ctx.data.num_nodes
    one = torch.randint(0, n_nodes, (1,), generator=gen)
    validation = [
        ("sampled blocks, batch of 1", _ell_block_inputs(ctx, one)),
        (
            "random blocks with duplicate neighbour ids",
            _ell_random_inputs(ctx, [4 * s + 3 for s in sizes], [k + 2 for k in ctx.fanouts], gen),
        ),
    ]
    if n_nodes <= 50_000:
        validation.append(("full graph", _ell_full_inputs(ctx)))
    else:
        big = ctx.batch_limit(1000)
        targets = torch.randperm(n_nodes, generator=gen)[:big]
        validation.append((f"sampled blocks, batch of {big}", _ell_block_inputs(ctx, targets)))

    def logits(runner: Runner) -> np.ndarray:
        return batched(ctx, lambda ids: runner(_ell_block_inputs(ctx, ids))[0])

    return ExportSpec(
        module=EllStudent(student),
        example=example,
        input_names=names,
        output_names=["logits"],
        inputs=inputs,
        outputs=[spec("logits", ctx.dtype, [f"n{num_layers}", student.out_channels])],
        dynamic_shapes=(shapes[0], tuple(graph_shapes)),
        validation=validation,
        logits=logits,
        params={"input_layout": "prefix"},
    )


def _ell_full_inputs(ctx: ExportContext) -> tuple[Tensor, ...]:
    flat = [ctx.data.x.contiguous()]
    for table in ctx.tables:
        w, sw = table.weights(ctx.student.norm)
        flat += [table.nbr.contiguous(), w]
        if ctx.student.norm == "gcn":
            flat.append(sw)
    return tuple(flat)


ADJACENCY.register("ell")(
    AdjacencyFormat("ell", build_ell, default_fanout="max", refuse_dtype=refuse_float16_gat)
)
