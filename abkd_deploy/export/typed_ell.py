"""``ell`` adjacency of typed students: flat named inputs per node type and relation.

Dict inputs do not export, so a typed block is flattened (DESIGN section 8): per level-0
node type ``t`` (sorted) ``x__<t>`` (``[n0__<t>, F_t]`` features) or, for a featureless
type, ``ids__<t>`` (int64 ``[n0__<t>]`` global ids into the student's embedding table);
then per layer ``l = 0..L-1`` and relation ``r = (h, rel, t)`` into a type that layer
outputs (sorted) ``nbr__<h>__<rel>__<t>__l<l>`` (int64 ``[n<l+1>__<t>, k__...]``, row ids
into the layer's ``h`` rows) and ``weight__...`` (same shape, 0 on padding). Each layer's
destinations of type ``t`` are the first ``n<l+1>__<t>`` rows of its ``t`` rows (the
prefix layout of :class:`~abkd_deploy.data.typed_sampler.TypedNeighborSampler`). Output
``logits`` ``[n<L>__<target>, C]``. Gather + MatMul only, every size dynamic.
:func:`~.ell_adjacency.build_ell` hands typed contexts here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim

from abkd_deploy.data.ell import EllBlock
from abkd_deploy.data.typed_blocks import TypedBlock, relation_weights
from abkd_deploy.data.typed_graph import Relation, relation_key
from abkd_deploy.export.adjacency import ExportSpec, batched, spec
from abkd_deploy.export.formats import Runner
from abkd_deploy.export.typed_context import TypedExportContext, typed_params
from abkd_deploy.export.typed_modules import level_types
from abkd_deploy.models.typed import TypedGNN

#: At most this many nodes (all types) for the "full graph" validation set.
FULL_GRAPH_NODES = 50_000


class TypedEllStudent(nn.Module):
    """``ell`` form of a typed student (module docstring for the flat inputs).

    Args:
        student: Trained typed student (eval mode).
    """

    def __init__(self, student: TypedGNN) -> None:
        super().__init__()
        self.student = student.eval()
        self.levels = level_types(student.relations, student.target, student.num_layers)
        self.layer_relations: list[list[Relation]] = [
            sorted(r for r in student.relations if r[2] in self.levels[layer])
            for layer in range(1, student.num_layers + 1)
        ]

    def input_names(self) -> list[str]:
        """Flat input names, in ``forward`` order."""
        names = [f"{'ids' if t in self.student.embeddings else 'x'}__{t}" for t in self.levels[0]]
        for layer, rels in enumerate(self.layer_relations):
            for r in rels:
                names += [
                    f"nbr__{relation_key(r)}__l{layer}",
                    f"weight__{relation_key(r)}__l{layer}",
                ]
        return names

    def forward(self, *flat: Tensor) -> Tensor:
        """Runs the student on the flat typed blocks.

        Args:
            *flat: The inputs named by :meth:`input_names`.

        Returns:
            logits ``[n<L>__<target>, C]``.
        """
        n_types = len(self.levels[0])
        inputs = dict(zip(self.levels[0], flat[:n_types], strict=True))
        pos, blocks = n_types, []
        for rels in self.layer_relations:
            block = TypedBlock(num_dst={})
            for r in rels:
                nbr, weight = flat[pos], flat[pos + 1]
                pos += 2
                block.rel_ops[r] = EllBlock(nbr, weight, None)
                block.num_dst[r[2]] = nbr.size(0)
            blocks.append(block)
        return self.student(inputs, blocks)[0]


def _input_spec(ctx: TypedExportContext, module: TypedEllStudent) -> tuple[list, tuple]:
    """Manifest specs and ``torch.export`` dynamic shapes of the flat inputs."""
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        return dims.setdefault(name, Dim(name, min=1))

    specs, shapes = [], []
    widths = ctx.data.num_features_dict
    for t in module.levels[0]:
        n = f"n0__{t}"
        if t in ctx.student.embeddings:
            specs.append(spec(f"ids__{t}", "int64", [n]))
        else:
            specs.append(spec(f"x__{t}", ctx.dtype, [n, widths[t]]))
        shapes.append({0: dim(n)})
    for layer, rels in enumerate(module.layer_relations):
        for r in rels:
            key = f"{relation_key(r)}__l{layer}"
            n, k = f"n{layer + 1}__{r[2]}", f"k__{key}"
            specs += [
                spec(f"nbr__{key}", "int64", [n, k]),
                spec(f"weight__{key}", ctx.dtype, [n, k]),
            ]
            shapes += [{0: dim(n), 1: dim(k)}, {0: dim(n), 1: dim(k)}]
    return specs, (tuple(shapes),)


def _rows(ctx: TypedExportContext, t: str, ids: Tensor) -> Tensor:
    """Level-0 input of type ``t`` for global ``ids``: ids (featureless) or feature rows."""
    if t in ctx.student.embeddings:
        return ids.contiguous()
    return ctx.data.x_dict[t][ids].contiguous()


def sampled_inputs(ctx: TypedExportContext, module: TypedEllStudent, targets: Tensor) -> tuple:
    """Flat inputs of the sampled typed blocks of ``targets`` (the export's tables)."""
    batch = ctx.sampler.sample(targets)
    flat = [_rows(ctx, t, batch.n_id[t]) for t in module.levels[0]]
    for block, rels in zip(batch.blocks, module.layer_relations, strict=True):
        for r in rels:
            op = block.rel_ops[r]
            flat += [op.nbr.contiguous(), op.weight.contiguous()]
    return tuple(flat)


def full_inputs(ctx: TypedExportContext, module: TypedEllStudent) -> tuple:
    """Flat inputs of the whole graph (every node of every type, the export's tables)."""
    n = ctx.data.num_nodes_dict
    flat = [_rows(ctx, t, torch.arange(n[t])) for t in module.levels[0]]
    for tables, rels in zip(ctx.tables, module.layer_relations, strict=True):
        for r in rels:
            flat += [tables[r].nbr.contiguous(), relation_weights(tables[r], ctx.student.norm)]
    return tuple(flat)


def random_inputs(
    ctx: TypedExportContext, module: TypedEllStudent, base: int, gen: torch.Generator
) -> tuple:
    """Random blocks with pairwise different sizes (none 0 or 1), duplicate neighbour ids
    and ~20% padded slots; level sizes grow downwards so every prefix exists."""
    used: set[int] = set()

    def fresh(at_least: int) -> int:
        v = max(2, at_least)
        while v in used:
            v += 1
        used.add(v)
        return v

    levels = module.levels
    sizes = [dict[str, int]() for _ in levels]
    sizes[-1] = {ctx.student.target: fresh(base)}
    for level in range(len(levels) - 2, -1, -1):
        for t in levels[level]:
            sizes[level][t] = fresh(sizes[level + 1].get(t, 0) + base)
    flat = []
    for t in levels[0]:
        ids = torch.randint(0, ctx.data.num_nodes_dict[t], (sizes[0][t],), generator=gen)
        flat.append(_rows(ctx, t, ids))
    for layer, rels in enumerate(module.layer_relations):
        for r in rels:
            n, src, k = sizes[layer + 1][r[2]], sizes[layer][r[0]], fresh(3)
            w = torch.rand(n, k, generator=gen) * (torch.rand(n, k, generator=gen) > 0.2)
            flat += [
                torch.randint(0, src, (n, k), generator=gen),
                w / (w.sum(1, keepdim=True) + 0.5),
            ]
    return tuple(flat)


def build_typed_ell(ctx: TypedExportContext) -> ExportSpec:
    """``ell`` spec of a typed student (module docstring)."""
    module = TypedEllStudent(ctx.student)
    inputs, dynamic_shapes = _input_spec(ctx, module)
    gen = ctx.generator()
    n_target = ctx.data.num_target_nodes
    one = torch.randint(0, n_target, (1,), generator=gen)
    seven = torch.randperm(n_target, generator=gen)[:7]
    validation = [
        ("sampled blocks, batch of 1", sampled_inputs(ctx, module, one)),
        ("sampled blocks, batch of 7", sampled_inputs(ctx, module, seven)),
        ("random blocks with duplicate neighbour ids", random_inputs(ctx, module, 9, gen)),
    ]
    if ctx.data.total_nodes <= FULL_GRAPH_NODES:
        validation.append(("full graph", full_inputs(ctx, module)))

    def logits(runner: Runner) -> np.ndarray:
        return batched(ctx, lambda ids: runner(sampled_inputs(ctx, module, ids))[0])

    target = ctx.student.target
    return ExportSpec(
        module=module,
        example=random_inputs(ctx, module, 4, gen),
        input_names=module.input_names(),
        output_names=["logits"],
        inputs=inputs,
        outputs=[
            spec(
                "logits",
                ctx.dtype,
                [f"n{ctx.student.num_layers}__{target}", ctx.student.out_channels],
            )
        ],
        dynamic_shapes=dynamic_shapes,
        validation=validation,
        logits=logits,
        params={"input_layout": "prefix", **typed_params(ctx)},
    )
