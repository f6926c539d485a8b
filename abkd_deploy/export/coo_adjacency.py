"""``coo`` adjacency: x and edge_index in, logits out; exact, for dynamic graphs.

Degrees and normalisation are computed inside with ScatterElements (add; max for GAT),
which needs opset >= 18 (docs/ARCHITECTURE.md section 9.4). It always sees the whole
graph: no fanout, no sampling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.export import Dim

from abkd_deploy.export.adjacency import (
    ADJACENCY,
    AdjacencyFormat,
    ExportContext,
    ExportSpec,
    feature_rows,
    spec,
)
from abkd_deploy.export.formats import Runner
from abkd_deploy.export.modules import CooStudent


def _random_graph(
    ctx: ExportContext, n: int, e: int, gen: torch.Generator, duplicates: int = 0
) -> tuple[Tensor, Tensor]:
    src = torch.randint(0, n, (e,), generator=gen)
    dst = (src + torch.randint(1, n, (e,), generator=gen)) % n  # never a self loop
    ei = torch.stack([src, dst])
    if duplicates:
        ei = torch.cat([ei, ei[:, :duplicates]], 1)
    return feature_rows(ctx, n, gen), ei.contiguous()


def build_coo(ctx: ExportContext) -> ExportSpec:
    """``coo``: x and edge_index in, logits out; exact (no fanout)."""
    student, data = ctx.student, ctx.data
    gen = ctx.generator()
    example = _random_graph(ctx, 23, 61, gen)
    validation = [
        ("single node, no edge", (feature_rows(ctx, 1, gen), torch.zeros(2, 0, dtype=torch.long))),
        ("random graph with duplicate edges", _random_graph(ctx, 57, 170, gen, duplicates=25)),
    ]
    if data.edge_index.size(1) <= 2_000_000:
        validation.append(("full graph", (data.x, data.edge_index)))
    else:
        validation.append(("random graph, 20000 nodes", _random_graph(ctx, 20_000, 100_000, gen)))

    def logits(runner: Runner) -> np.ndarray:
        return runner((data.x, data.edge_index))[0][ctx.eval_ids.numpy()]

    f, c = student.in_channels, student.out_channels
    return ExportSpec(
        module=CooStudent(student),
        example=example,
        input_names=["x", "edge_index"],
        output_names=["logits"],
        inputs=[
            spec("x", ctx.dtype, ["num_nodes", f]),
            spec("edge_index", "int64", [2, "num_edges"]),
        ],
        outputs=[spec("logits", ctx.dtype, ["num_nodes", c])],
        dynamic_shapes=({0: Dim("num_nodes", min=1)}, {1: Dim("num_edges", min=0)}),
        validation=validation,
        logits=logits,
        params={"normalisation": "computed inside (scatter-add)"},
    )


ADJACENCY.register("coo")(
    AdjacencyFormat(
        "coo",
        build_coo,
        exact_graph=True,
        gather_only=False,
        min_opset=18,
        opset_reason="ScatterElements add/max",
    )
)
