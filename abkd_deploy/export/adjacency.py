"""Static sparse adjacency formats (``ell``, ``embedded``, ``coo``) by name.

Each format builds, from an :class:`ExportContext` (student, dataset, fanout tables),
an :class:`ExportSpec`: the export-form module, example inputs for tracing (sizes
chosen so no dimension is 0, 1 or equal to another), named input/output specs with
symbolic dims, the input sets used for validation (other sizes than the traced one,
duplicate ids, a batch of 1) and how to get the artifact's logits on the evaluated
test nodes. The wire contract is docs/FORMATS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim
from torch_geometric.data import Data

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import FanoutTable
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.export.fold import fold_input_transform
from abkd_deploy.export.formats import Runner, as_numpy_outputs
from abkd_deploy.export.modules import (
    TABLE_FIRST_ARCHS,
    CooStudent,
    EllStudent,
    EmbeddedStudent,
)
from abkd_deploy.export.precompute import can_precompute, precompute_student
from abkd_deploy.models.base import GNN
from abkd_deploy.registry import Registry

#: Target nodes per evaluation batch (bounds memory on large graphs).
EVAL_BATCH = 2048
#: Most receptive-field rows one evaluation / validation batch may expand to.
MAX_TREE_ROWS = 4_000_000


@dataclass
class ExportContext:
    """Everything a format needs to build its export module.

    Attributes:
        student: Trained student (eval mode, float32, CPU).
        data: The dataset the student was trained on.
        csr: In-neighbour lists of ``data``.
        fanouts: ``K_l`` per layer (layer 1 first).
        sampler: Sampler whose ``tables`` are the export's fanout tables (layer ``l``
            drawn with seed ``seed + l - 1``); also builds evaluation blocks.
        eval_ids: [n] sorted test node ids on which accuracy is computed.
        dtype: Artifact float dtype name (``float32`` / ``float16``), for the specs.
        precompute: ``embedded`` only: store the outputs of layers ``1..L-1`` instead of
            computing them per request (:mod:`abkd_deploy.export.precompute`), where the
            architecture allows it.
    """

    student: GNN
    data: Data
    csr: CSR
    fanouts: list[int]
    sampler: NeighborSampler
    eval_ids: Tensor
    dtype: str = "float32"
    precompute: bool = False

    @property
    def tables(self) -> list[FanoutTable]:
        return self.sampler.tables

    def batch_limit(self, wanted: int) -> int:
        """``wanted`` targets, fewer if their tree (``prod(1 + K_l)`` rows each) is huge."""
        return max(1, min(wanted, MAX_TREE_ROWS // math.prod(1 + k for k in self.fanouts)))

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.sampler.seed) + 1009 + offset)


@dataclass
class ExportSpec:
    """An export-form module and how to trace, describe, validate and score it.

    Attributes:
        module: Export-form module (float32 reference; formats cast it to the dtype).
        example: Flat example inputs used for tracing.
        input_names / output_names: Names of the flat inputs / outputs.
        inputs / outputs: Manifest specs ``{"name", "dtype", "shape"}`` (symbolic dims
            are strings).
        dynamic_shapes: ``torch.export`` dynamic shapes (structured like ``forward``).
        validation: Named flat input sets, none of them the traced sizes.
        logits: ``runner -> [len(eval_ids), C]`` logits of the artifact on the evaluated
            test nodes (``runner`` = the module itself gives the PyTorch numbers).
        params: Format parameters recorded under the manifest's ``adjacency``.
        reference: Module the artifact is validated against when it is not ``module``
            itself (a precomputed ``embedded`` module is checked against the tree form).
    """

    module: nn.Module
    example: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    dynamic_shapes: tuple[Any, ...]
    validation: list[tuple[str, tuple[Tensor, ...]]]
    logits: Callable[[Runner], np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)
    reference: nn.Module | None = None


@dataclass(frozen=True)
class AdjacencyFormat:
    """A registered adjacency format: its default fanout and its spec builder."""

    name: str
    default_fanout: str | int
    build: Callable[[ExportContext], ExportSpec]


ADJACENCY: Registry[AdjacencyFormat] = Registry("adjacency format")


def spec(name: str, dtype: str, shape: Sequence[int | str]) -> dict[str, Any]:
    """Manifest entry of one tensor."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def module_runner(module: nn.Module) -> Runner:
    """A :data:`Runner` calling a PyTorch module directly (the reference)."""

    def run(inputs: Sequence[Tensor]) -> list[np.ndarray]:
        with torch.inference_mode():
            return as_numpy_outputs(module(*inputs))

    return run


def _rows(ctx: ExportContext, n: int, gen: torch.Generator) -> Tensor:
    """``n`` real feature rows (random nodes, with repeats)."""
    return ctx.data.x[torch.randint(0, ctx.data.num_nodes, (n,), generator=gen)].contiguous()


# ----------------------------------------------------------------------------------- ell


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
    flat = [_rows(ctx, sizes[0], gen)]
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


def batched(ctx: ExportContext, fn: Callable[[Tensor], np.ndarray]) -> np.ndarray:
    """Concatenates ``fn(ids)`` over batches of the evaluated test nodes."""
    ids, step = ctx.eval_ids, ctx.batch_limit(EVAL_BATCH)
    return np.concatenate([fn(ids[i : i + step]) for i in range(0, ids.numel(), step)])


# ------------------------------------------------------------------------------ embedded


def build_embedded(ctx: ExportContext) -> ExportSpec:
    """``embedded``: node ids in, (logits, embedding) out; features and tables baked in."""
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
        )
        features, layout = folded.features, "first_linear_folded"
    tree, precomputed = module, 0
    if ctx.precompute and can_precompute(student):
        module = precompute_student(student, ctx.data.x, ctx.tables, index_dtype)
        features, layout = module.last.features, "precomputed"
        precomputed = student.num_layers - 1
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
        params={
            "layout": "tree",
            "index_dtype": str(index_dtype).removeprefix("torch."),
            "features": layout,
            "feature_width": int(features.size(1)),
            "dst_features": module.dst_features is not None,
            "first_layer": "table" if precomputed or module.table_first else "tree",
            "precomputed_layers": precomputed,
        },
        reference=tree if precomputed else None,
    )


# ----------------------------------------------------------------------------------- coo


def _random_graph(
    ctx: ExportContext, n: int, e: int, gen: torch.Generator, duplicates: int = 0
) -> tuple[Tensor, Tensor]:
    src = torch.randint(0, n, (e,), generator=gen)
    dst = (src + torch.randint(1, n, (e,), generator=gen)) % n  # never a self loop
    ei = torch.stack([src, dst])
    if duplicates:
        ei = torch.cat([ei, ei[:, :duplicates]], 1)
    return _rows(ctx, n, gen), ei.contiguous()


def build_coo(ctx: ExportContext) -> ExportSpec:
    """``coo``: x and edge_index in, logits out; exact (no fanout)."""
    student, data = ctx.student, ctx.data
    gen = ctx.generator()
    example = _random_graph(ctx, 23, 61, gen)
    validation = [
        ("single node, no edge", (_rows(ctx, 1, gen), torch.zeros(2, 0, dtype=torch.long))),
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


for _fmt in (
    AdjacencyFormat("ell", "max", build_ell),
    AdjacencyFormat("embedded", 10, build_embedded),
    AdjacencyFormat("coo", "max", build_coo),
):
    ADJACENCY.register(_fmt.name)(_fmt)
