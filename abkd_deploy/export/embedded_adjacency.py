"""``embedded`` adjacency (the default): node ids in, (logits, embedding) out.

Features and per-layer fanout tables are baked in as initializers; the model gathers each
request's L-hop receptive field as a tree, with the first linear map folded into the
features (:mod:`abkd_deploy.export.fold`) and, for ``gcn``/``sage``, layers ``1..L-1``
precomputed (:mod:`abkd_deploy.export.precompute`). docs/ARCHITECTURE.md section 4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.export import Dim

from abkd_deploy.export.adjacency import (
    ADJACENCY,
    AdjacencyFormat,
    ExportContext,
    ExportSpec,
    batched,
    refuse_float16_gat,
    spec,
)
from abkd_deploy.export.fold import fold_input_transform
from abkd_deploy.export.formats import Runner
from abkd_deploy.export.modules import TABLE_FIRST_ARCHS, EmbeddedStudent
from abkd_deploy.export.precompute import (
    OUTPUT_CHUNK,
    PrecomputedStudent,
    can_precompute,
    output_tables,
    precompute_mode,
    precompute_student,
)


def build_embedded(ctx: ExportContext) -> ExportSpec:
    """``embedded``: node ids in, (logits, embedding) out; features and tables baked in."""
    if ctx.typed:  # typed students: per-type and per-relation tables
        from abkd_deploy.export.typed_embedded import build_typed_embedded

        return build_typed_embedded(ctx)
    student, n_nodes = ctx.student, ctx.data.num_nodes
    index_dtype = torch.int32 if n_nodes < 2**31 - 1 else torch.int64
    folded = fold_input_transform(student, ctx.data.x)
    if folded is None:
        module = EmbeddedStudent(student, ctx.data.x, ctx.tables, index_dtype=index_dtype)
        features, layout = ctx.data.x, "raw"
    else:
        table_first = student.arch in TABLE_FIRST_ARCHS
        module = EmbeddedStudent(
            folded.model,
            folded.features,
            ctx.tables,
            index_dtype=index_dtype,
            dst_features=folded.dst_features,
            table_first=table_first,
            factor=ctx.factor,
        )
        features, layout = folded.features, "first_linear_folded"
    tree, precomputed = module, 0
    mode = precompute_mode(ctx.precompute, "embedded")
    if mode != "none" and can_precompute(student):
        module = precompute_student(
            student,
            ctx.data.x,
            ctx.tables,
            index_dtype,
            hidden=ctx.layer_states()[-1],
            factor=ctx.factor,
        )
        features, layout = module.last.features, "precomputed"
        precomputed = student.num_layers - 1
    if mode == "all":  # every output stored: the graph is the lookup
        module = output_tables(module.eval(), n_nodes, ctx.batch_limit(OUTPUT_CHUNK))
        features, layout = module.logits_table, "outputs"
        precomputed = student.num_layers
    # the EmbeddedStudent that reads a table in its layer 1 (none for a lookup)
    embedded = module.last if isinstance(module, PrecomputedStudent) else module
    factored = bool(getattr(embedded, "factored", False))
    params = {
        "layout": "lookup" if mode == "all" else "tree",
        "index_dtype": str(index_dtype).removeprefix("torch."),
        "features": layout,
        "feature_width": int(features.size(1)),
        "dst_features": module.dst_features is not None,
        "first_layer": "table" if precomputed or module.table_first else "tree",
        "table_weights": "scale" if factored else "slots",
        "precomputed_layers": precomputed,
        "precompute": mode if precomputed else "none",
    }
    return node_id_spec(ctx, module, n_nodes, params, tree if precomputed else None)


def node_id_spec(
    ctx: ExportContext,
    module: torch.nn.Module,
    n_nodes: int,
    params: dict[str, Any],
    reference: torch.nn.Module | None,
) -> ExportSpec:
    """The ``node_ids [batch] -> (logits, embedding)`` spec every ``embedded`` module
    shares (homogeneous and typed): seeded example and validation ids (a batch of 1, 7
    with duplicates, a large one) in ``[0, n_nodes)``, and the artifact's test logits."""
    student = ctx.student
    gen = ctx.generator()
    example = (torch.randint(0, n_nodes, (11,), generator=gen),)
    seven = torch.randint(0, n_nodes, (7,), generator=gen)
    seven[1] = seven[4] = seven[0]
    big = ctx.batch_limit(1000)
    validation = [
        ("batch of 1", (torch.randint(0, n_nodes, (1,), generator=gen),)),
        ("batch of 7 with duplicate ids", (seven,)),
        (f"batch of {big} with duplicate ids", (torch.randint(0, n_nodes, (big,), generator=gen),)),
    ]
    with torch.no_grad():
        emb_dim = module(example[0])[1].size(1)

    def logits(runner: Runner) -> np.ndarray:
        return batched(ctx, lambda ids: runner((ids,))[0])

    return ExportSpec(
        module=module,
        example=example,
        input_names=["node_ids"],
        output_names=["logits", "embedding"],
        inputs=[spec("node_ids", "int64", ["batch"])],
        outputs=[
            spec("logits", ctx.dtype, ["batch", student.out_channels]),
            spec("embedding", ctx.dtype, ["batch", emb_dim]),
        ],
        dynamic_shapes=({0: Dim("batch", min=1)},),
        validation=validation,
        logits=logits,
        params=params,
        reference=reference,
    )


ADJACENCY.register("embedded")(
    AdjacencyFormat("embedded", build_embedded, default_fanout=10, refuse_dtype=refuse_float16_gat)
)
