"""The PyTorch side of a typed export: context, fanout tables, reference scores, manifest.

A typed student (``rgcn``, ``rsage``) on a :class:`~abkd_deploy.data.typed_graph.TypedGraph`
gets a :class:`TypedExportContext`: the same :class:`~.adjacency.ExportContext` fields,
with a :class:`~abkd_deploy.data.typed_sampler.TypedNeighborSampler` whose ``tables`` are
one ``{relation: FanoutTable}`` per layer (layer ``l``, relation ``i`` drawn with seed
``seed + 101 (l - 1) + i``), and target-type ids throughout. The fanout ``K_l`` asked for
layer ``l`` is capped per relation at that relation's maximum in-degree (``max`` = every
relation exact; a cap changes only the padding, never a sampled neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from abkd_deploy.data.typed_blocks import relation_csr
from abkd_deploy.data.typed_graph import Relation, TypedGraph, relation_key
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.export.adjacency import MAX_TREE_ROWS, AdjacencyFormat, ExportContext
from abkd_deploy.export.typed_reference import exact_sources, layerwise_logits, table_sources
from abkd_deploy.models.base import GNN
from abkd_deploy.models.typed import TypedGNN, parameter_counts
from abkd_deploy.scoring import score

#: Adjacency formats a typed student can be exported with.
TYPED_ADJACENCY = ("embedded", "ell")
#: Schema keys a student and the graph it is exported with must agree on.
SCHEMA_KEYS = ("node_types", "relations", "target", "num_nodes", "num_features")


@dataclass
class TypedExportContext(ExportContext):
    """:class:`~.adjacency.ExportContext` of a typed student (``csr`` is ``None``).

    Attributes:
        relation_fanouts: ``{relation: K}`` per layer (layer 1 first), the table widths.
        degree: Largest in-degree over every relation.
        typed_states: ``H^1..H^{L-1}`` as ``{type: [N_t, hidden]}``, computed on first
            use (:meth:`layer_states`).
    """

    relation_fanouts: list[dict[Relation, int]] = field(default_factory=list)
    degree: int = 0
    typed_states: list[dict[str, Tensor]] | None = None

    typed: ClassVar[bool] = True

    @property
    def max_degree(self) -> int:
        return self.degree

    def layer_states(self) -> list[dict[str, Tensor]]:  # type: ignore[override]
        """``H^1..H^{L-1}`` per node type (:func:`.typed_modules.typed_layer_states`)."""
        if self.typed_states is None:
            from abkd_deploy.export.typed_modules import typed_layer_states

            self.typed_states = typed_layer_states(self.student, self.data.x_dict, self.tables)
        return self.typed_states

    def batch_limit(self, wanted: int) -> int:
        """``wanted`` targets, fewer if their tree (``prod(1 + sum_r K_r)`` rows) is huge."""
        rows = math.prod(1 + sum(ks.values()) for ks in self.relation_fanouts)
        return max(1, min(wanted, MAX_TREE_ROWS // rows))

    def graph_entry(self) -> dict[str, Any]:
        """The manifest's ``graph``: ids are target-type ids; ``schema`` is the graph's."""
        data: TypedGraph = self.data
        return {
            "num_nodes": data.num_target_nodes,
            "num_edges": data.total_edges,
            "max_degree": self.degree,
            "num_features": data.num_features_dict[data.target],
            "num_classes": int(data.num_classes),
            "typed": True,
            "schema": data.schema(),
        }


def check_typed_run(student: GNN, data: TypedGraph, name: str) -> None:
    """The typed dataset has the student's schema and classes.

    Raises:
        CheckpointError: naming the first schema key that differs.
    """
    if not isinstance(student, TypedGNN):
        raise CheckpointError(f"dataset {name!r} is a typed graph but the student is not typed")
    have = data.schema()
    for key in SCHEMA_KEYS:
        if student.schema[key] != have[key]:
            raise CheckpointError(
                f"the student's schema {key} is {student.schema[key]!r} but dataset {name!r} "
                f"has {have[key]!r}; expected the graph the student was trained on"
            )
    if int(data.num_classes) != student.out_channels:
        raise CheckpointError(
            f"the student expects {student.out_channels} classes but dataset {name!r} has "
            f"{data.num_classes}"
        )


def typed_export_context(
    adjacency: AdjacencyFormat,
    student: TypedGNN,
    data: TypedGraph,
    fanouts: str | int | Sequence[int | str] | None,
    seed: int,
    eval_ids: Tensor,
    dtype: str = "float32",
    precompute: bool | str = False,
) -> TypedExportContext:
    """Seeded per-relation fanout tables (capped at each relation's max in-degree).

    Raises:
        ConfigError: a bad fanout value or count.
    """
    if adjacency.name not in TYPED_ADJACENCY:
        raise ConfigError(
            f"typed students export with --adjacency {' or '.join(TYPED_ADJACENCY)}; got "
            f"{adjacency.name!r}"
        )
    degrees = {
        r: relation_csr(data.edge_index_dict[r], data.num_nodes_dict[r[2]]).max_degree
        for r in data.relations
    }
    top = max(degrees.values(), default=1)
    ks = adjacency.fanouts(fanouts, student.num_layers, top)
    sampler = TypedNeighborSampler(data, ks, student.norm, seed=seed)
    sampler.fanouts = [{r: min(k, max(1, d)) for r, d in degrees.items()} for k in ks]
    sampler.resample(0)
    return TypedExportContext(
        student,
        data,
        None,  # type: ignore[arg-type]
        ks,
        sampler,  # type: ignore[arg-type]
        eval_ids,
        dtype,
        precompute,
        relation_fanouts=sampler.fanouts,
        degree=top,
    )


def typed_student_logits(ctx: TypedExportContext, exact_graph: bool) -> np.ndarray:
    """The PyTorch student's logits on ``eval_ids``: on the export's tables, or on the
    exact graph (``exact_graph``); layer by layer over the scored papers' receptive
    field, in bounded row chunks (:mod:`.typed_reference`)."""
    student, data = ctx.student, ctx.data
    if exact_graph:
        sources = exact_sources(data, student.norm, student.num_layers)
    else:
        sources = table_sources(ctx.tables, student.norm)
    return layerwise_logits(student, data, sources, ctx.eval_ids).numpy()


def typed_params(ctx: TypedExportContext) -> dict[str, Any]:
    """What a typed ``embedded`` export adds to the manifest's ``adjacency``."""
    return {
        "typed": True,
        "target": ctx.data.target,
        "node_types": ctx.data.node_types,
        "relations": [list(r) for r in ctx.data.relations],
        "relation_fanouts": [
            {relation_key(r): int(k) for r, k in sorted(ks.items())} for ks in ctx.relation_fanouts
        ],
        "params_without_embeddings": parameter_counts(ctx.student)["params_without_embeddings"],
    }


def typed_scores(ctx: TypedExportContext, exact_graph: bool) -> tuple[np.ndarray, float, float]:
    """``(labels, score on the export's graph, score on the exact graph)`` of the student."""
    labels = ctx.data.y[ctx.eval_ids].numpy()
    student = score(ctx.data.metric, labels, typed_student_logits(ctx, exact_graph))
    exact = score(ctx.data.metric, labels, typed_student_logits(ctx, True))
    return labels, student, exact
