"""``embedded`` adjacency of typed students: target-type node ids in, (logits, embedding) out.

The same wire contract as the homogeneous ``embedded`` form (``node_ids`` [batch] int64
-> ``logits`` [batch, C], ``embedding`` [batch, d]), so serving is unchanged; the ids are
ids of the target node type. Inside: one feature table per node type and one fanout
table per layer and relation (:class:`~.typed_modules.TypedEmbeddedStudent`); with
``precompute`` (the default), layers ``1..L-1`` are stored per node type and a request
runs the last layer only; ``precompute="all"`` stores every target's outputs.
:func:`~.embedded_adjacency.build_embedded` hands typed contexts here.
"""

from __future__ import annotations

import torch

from abkd_deploy.export.adjacency import ExportSpec
from abkd_deploy.export.embedded_adjacency import node_id_spec
from abkd_deploy.export.precompute import OUTPUT_CHUNK, output_tables, precompute_mode
from abkd_deploy.export.typed_context import TypedExportContext, typed_params
from abkd_deploy.export.typed_modules import (
    TypedEmbeddedStudent,
    feature_tables,
    precomputed_typed_student,
)


def build_typed_embedded(ctx: TypedExportContext) -> ExportSpec:
    """``embedded`` spec of a typed student (module docstring)."""
    student, data = ctx.student, ctx.data
    n_nodes = data.num_target_nodes
    largest = max(data.num_nodes_dict.values())
    index_dtype = torch.int32 if largest < 2**31 - 1 else torch.int64
    features = feature_tables(student, data.x_dict)
    module = TypedEmbeddedStudent(student, features, ctx.tables, index_dtype=index_dtype)
    layout = {t: "embedding" if t in student.embeddings else "raw" for t in data.node_types}
    tree, precomputed = module, 0
    mode = precompute_mode(ctx.precompute, "embedded")
    if mode != "none" and student.num_layers >= 2:
        module = precomputed_typed_student(student, ctx.layer_states(), ctx.tables, index_dtype)
        layout = {t: "precomputed" for t in ctx.layer_states()[-1]}
        precomputed = student.num_layers - 1
    if mode == "all":  # every target's outputs stored: the graph is the lookup
        module = output_tables(module.eval(), n_nodes, ctx.batch_limit(OUTPUT_CHUNK))
        layout, precomputed = {data.target: "outputs"}, student.num_layers
    params = {
        "layout": "lookup" if mode == "all" else "tree",
        "index_dtype": str(index_dtype).removeprefix("torch."),
        "features": layout,
        "precomputed_layers": precomputed,
        "precompute": mode if precomputed else "none",
        **typed_params(ctx),
    }
    return node_id_spec(ctx, module, n_nodes, params, tree if precomputed else None)
