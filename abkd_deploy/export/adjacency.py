"""Adjacency formats by name: the protocol, the registry and what every format shares.

An adjacency format (``--adjacency``) decides what the artifact takes as its graph. From an
:class:`ExportContext` (student, dataset, fanout tables) it builds an :class:`ExportSpec`:
the export-form module, example inputs for tracing (sizes chosen so no dimension is 0, 1
or equal to another), named input/output specs with symbolic dims, the input sets used for
validation (other sizes than the traced one, duplicate ids, a batch of 1) and how to get
the artifact's logits on the evaluated test nodes. Its :class:`AdjacencyFormat` entry
declares what the pipeline needs to know without asking for its name: the default fanout,
whether it sees the exact graph, whether its graph must be gather-only, the opset it
needs, the dtypes it refuses, and what it records in the manifest.

One module per format registers itself (``ell_adjacency``, ``embedded_adjacency``,
``coo_adjacency``; docs/ARCHITECTURE.md section 4). The wire contract is docs/FORMATS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Data

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import FanoutTable
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.export.formats import Runner, as_numpy_outputs
from abkd_deploy.export.options import MIN_OPSET, parse_fanouts
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
            architecture allows it; ``"all"``: store every node's outputs (a lookup).
        states: ``embedded`` ``gcn``/``sage``: the layer states ``H^1..H^{L-1}`` over
            ``tables``, computed once on first use (:meth:`layer_states`) and shared by the
            precomputed main graph and the new-node graph.
        factor: ``embedded`` ``sage``: factor a table-read layer 1's mean weights into one
            scale per destination (:class:`~.modules.FactoredTableBlock`); ``refresh``
            turns it off for a parent exported before that layout.
    """

    student: GNN
    data: Data
    csr: CSR
    fanouts: list[int]
    sampler: NeighborSampler
    eval_ids: Tensor
    dtype: str = "float32"
    precompute: bool | str = False
    states: list[Tensor] | None = None
    factor: bool = True

    #: A typed student on a typed graph (:class:`.typed_context.TypedExportContext`).
    typed: ClassVar[bool] = False

    @property
    def max_degree(self) -> int:
        """Largest in-degree of the graph (what ``max`` fanouts resolve to)."""
        return self.csr.max_degree

    def graph_entry(self) -> dict[str, Any]:
        """The manifest's ``graph`` object."""
        return {
            "num_nodes": self.data.num_nodes,
            "num_edges": int(self.data.edge_index.size(1)),
            "max_degree": self.csr.max_degree,
            "num_features": self.data.num_features,
            "num_classes": int(self.data.num_classes),
        }

    def layer_states(self) -> list[Tensor]:
        """``H^1..H^{L-1}``, [N, hidden] each (:func:`.precompute.layer_states`)."""
        if self.states is None:
            from abkd_deploy.export.precompute import layer_states

            self.states = layer_states(self.student, self.data.x, self.tables)
        return self.states

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
        external_data: Write the ONNX initializers as external data whatever their size
            (live exports: ``refresh`` rewrites the tables as raw arrays, no protobuf).
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
    external_data: bool = False


def accepts_every_dtype(dtype: str, arch: str) -> str | None:
    """Default :attr:`AdjacencyFormat.refuse_dtype`: nothing is refused."""
    return None


@dataclass(frozen=True)
class AdjacencyFormat:
    """A registered adjacency format: its capabilities and its spec builder.

    Attributes:
        name: Registry name (``--adjacency``).
        build: ``ExportContext -> ExportSpec``.
        default_fanout: Fanout when none is given (``"max"``: every neighbour).
        exact_graph: The artifact takes the whole graph as it is (``coo``): the fanouts
            are always the maximum degree whatever is asked, the manifest records no
            fanouts and no sampling seed, and the PyTorch reference runs on the exact
            graph.
        gather_only: The export graph must use no Scatter op (artifact formats that can
            list their ops, ONNX, refuse one); formats that scatter set ``False``.
        min_opset: Lowest ONNX opset the form needs; ``opset_reason`` says why.
        refuse_dtype: ``(dtype, arch) -> reason`` when the form cannot be exported in
            ``dtype`` for that architecture, else ``None``.
    """

    name: str
    build: Callable[[ExportContext], ExportSpec]
    default_fanout: str | int = "max"
    exact_graph: bool = False
    gather_only: bool = True
    min_opset: int = MIN_OPSET
    opset_reason: str = ""
    refuse_dtype: Callable[[str, str], str | None] = accepts_every_dtype

    def fanouts(
        self, requested: str | int | Sequence[int | str] | None, num_layers: int, max_degree: int
    ) -> list[int]:
        """``K_l`` per layer for ``requested`` (``None``: :attr:`default_fanout`).

        Raises:
            ConfigError: a bad fanout value or count (checked even for exact formats).
        """
        value = self.default_fanout if requested is None else requested
        ks = parse_fanouts(value, num_layers, max_degree)
        return [max(1, max_degree)] * num_layers if self.exact_graph else ks

    def manifest_entry(self, ctx: ExportContext, spec: ExportSpec) -> dict[str, Any]:
        """The manifest's ``adjacency`` object: the common fields plus ``spec.params``."""
        return {
            "format": self.name,
            "fanouts": None if self.exact_graph else ctx.fanouts,
            "exact": all(k >= ctx.max_degree for k in ctx.fanouts),
            "sampling_seed": None if self.exact_graph else ctx.sampler.seed,
            "norm": ctx.student.norm,
            **spec.params,
        }


ADJACENCY: Registry[AdjacencyFormat] = Registry("adjacency format")


def refuse_float16_gat(dtype: str, arch: str) -> str | None:
    """``refuse_dtype`` of the padded forms: their GAT mask (-1e9) overflows float16."""
    if dtype == "float16" and arch == "gat":
        return (
            "gat students cannot be exported as float16 in ell/embedded form (the attention "
            "mask uses -1e9, which overflows float16); use --dtype float32"
        )
    return None


def spec(name: str, dtype: str, shape: Sequence[int | str]) -> dict[str, Any]:
    """Manifest entry of one tensor."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def module_runner(module: nn.Module) -> Runner:
    """A :data:`Runner` calling a PyTorch module directly (the reference)."""

    def run(inputs: Sequence[Tensor]) -> list[np.ndarray]:
        with torch.inference_mode():
            return as_numpy_outputs(module(*inputs))

    return run


def feature_rows(ctx: ExportContext, n: int, gen: torch.Generator) -> Tensor:
    """``[n, F]`` real feature rows (random nodes, with repeats)."""
    return ctx.data.x[torch.randint(0, ctx.data.num_nodes, (n,), generator=gen)].contiguous()


def batched(ctx: ExportContext, fn: Callable[[Tensor], np.ndarray]) -> np.ndarray:
    """Concatenates ``fn(ids)`` over batches of the evaluated test nodes."""
    ids, step = ctx.eval_ids, ctx.batch_limit(EVAL_BATCH)
    return np.concatenate([fn(ids[i : i + step]) for i in range(0, ids.numel(), step)])


# Importing a format module registers it (one module per format); last, because each of
# them imports the names above.
import abkd_deploy.export.coo_adjacency  # noqa: E402
import abkd_deploy.export.ell_adjacency  # noqa: E402
import abkd_deploy.export.embedded_adjacency  # noqa: E402, F401
