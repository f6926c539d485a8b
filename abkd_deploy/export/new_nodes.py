"""The new-node graph of an ``embedded`` export: answers for nodes that are not in it.

A new node ``v`` comes with its features ``x_v`` and the ids ``S`` of existing nodes it
is joined to (``docs/FORMATS.md`` "New nodes", DESIGN.md section 9). Layer 1 aggregates
the stored features over ``S`` and ``x_v`` itself; layer ``l > 1`` aggregates the stored
states ``H^{l-1}`` of ``S`` and ``v``'s own ``H^{l-1}``, computed one layer below. That is
the student on the graph with ``v`` added through edges ``S -> v`` only: the stored nodes
do not see ``v`` (their tables and states are those of the export) until a refresh.

Layer ``l`` reads the first ``K_l`` ids of ``S`` (its fanout; requests list neighbours in
order of preference) and weighs them as the export's tables do, with ``v``'s in-degree
``|S|``. So re-describing an existing node whose table holds all its neighbours (degree
at most the fanout) gives exactly that node's answer, which the export validates.

The graph is gather-only: two inputs ``features`` [M, F] float and ``neighbors`` [M, K]
int64 (``K`` = the largest fanout, padded with -1), the stored tables ``state_0`` (the
raw features) .. ``state_{L-1}`` as initializers, and the outputs of the main graph
(``logits`` [M, C], ``embedding`` [M, d]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from abkd_deploy.data.csr import edge_weights, self_weights
from abkd_deploy.export.adjacency import ExportContext, ExportSpec, spec
from abkd_deploy.models.base import GNN, LayerStack

#: Archs whose new-node answers the export can compute (their states ``H^l`` are
#: per-node and their layers read neighbours through the operand alone).
NEW_NODE_ARCHS = ("gcn", "sage")
#: File name of the new-node graph next to ``model.onnx``.
NEW_NODES_FILE = "new_nodes.onnx"
#: Input names of the new-node graph.
INPUT_NAMES = ["features", "neighbors"]
#: Padding of ``neighbors``.
PAD = -1


def refuse_new_nodes(student: GNN) -> str | None:
    """Why ``student`` gets no new-node graph (``None``: it gets one)."""
    if not isinstance(student, LayerStack) or student.arch not in NEW_NODE_ARCHS:
        return (
            f"{student.arch} students cannot answer for new nodes (their layer states are not "
            f"per-node); supported: {', '.join(NEW_NODE_ARCHS)}"
        )
    return None


class NewNodeStudent(nn.Module):
    """Answers for new nodes from the stored states (see the module docstring).

    Args:
        student: Trained student (eval mode), an arch in :data:`NEW_NODE_ARCHS`.
        states: ``L`` tables: the [N, F] features, then ``H^1..H^{L-1}`` [N, hidden].
        degree: [N] full-graph in-degree of every stored node (``gcn`` weights).
        fanouts: ``K_l`` per layer.
    """

    def __init__(
        self,
        student: LayerStack,
        states: Sequence[Tensor],
        degree: Tensor,
        fanouts: Sequence[int],
    ) -> None:
        super().__init__()
        if len(states) != student.num_layers or len(fanouts) != student.num_layers:
            raise ValueError(
                f"a {student.num_layers}-layer student needs {student.num_layers} states and "
                f"fanouts; got {len(states)} and {len(fanouts)}"
            )
        self.student = student.eval()
        self.fanouts = [int(k) for k in fanouts]
        self.norm = student.norm
        for index, state in enumerate(states):
            self.register_buffer(f"state_{index}", state.contiguous())
        self.register_buffer("degree", degree.to(torch.float32).contiguous())

    @property
    def max_neighbors(self) -> int:
        return max(self.fanouts)

    def forward(self, features: Tensor, neighbors: Tensor) -> tuple[Tensor, Tensor]:
        """Answers ``M`` new nodes.

        Args:
            features: [M, F] their features.
            neighbors: [M, K] int64 ids of their neighbours, padded with -1
                (``K`` = :attr:`max_neighbors`).

        Returns:
            ``(logits [M, C], embedding [M, d])``.
        """
        dtype = features.dtype
        valid = (neighbors >= 0).to(dtype)  # [M, K]
        safe = neighbors.clamp(min=0)
        in_degree = valid.sum(1, keepdim=True)  # [M, 1]: |S|, edges S -> v
        width = neighbors.size(1)
        # per fanout k: (flat ids [M * k], weights [M, 1, k]); layers of one fanout share them
        slots: dict[int, tuple[Tensor, Tensor]] = {}
        act = getattr(F, self.student.activation)
        h, embedding = features, features
        for index, layer in enumerate(self.student.layers):
            k = min(self.fanouts[index], width)
            if k not in slots:
                slots[k] = self._slots(safe, valid, in_degree, k)
            flat, w = slots[k]
            state = getattr(self, f"state_{index}")
            rows = state.index_select(0, flat).reshape(h.size(0), k, -1).to(dtype)
            # gcn/sage aggregate linearly: one weighted sum of the neighbour rows, then the
            # layer's maps on [M, F_l] rows (two Gemms) instead of on 1 + k rows per node
            summed = torch.matmul(w, rows).squeeze(1)  # [M, F_l]
            out = self._combine(layer, summed, h, in_degree)
            if index < self.student.num_layers - 1:
                embedding = h = act(out)
            else:
                h = out
        return h, embedding if self.student.num_layers > 1 else h

    def _slots(
        self, safe: Tensor, valid: Tensor, in_degree: Tensor, k: int
    ) -> tuple[Tensor, Tensor]:
        """``(ids [M * k], weights [M, 1, k])`` of the first ``k`` slots, weighed as the
        export's tables are (:func:`~abkd_deploy.data.csr.edge_weights`; 0 on padding)."""
        count = in_degree
        if k < safe.size(1):
            safe, valid = safe[:, :k], valid[:, :k]
            count = valid.sum(1, keepdim=True)
        if self.norm == "mean":  # the same as edge_weights, without its ones
            w = valid / count.clamp(min=1)
        else:
            deg = self.degree.index_select(0, safe.reshape(-1)).reshape(safe.shape)
            w = edge_weights(self.norm, in_degree, deg, count).to(valid.dtype) * valid
        return safe.reshape(-1), w.unsqueeze(1)

    def _combine(self, layer: nn.Module, summed: Tensor, h: Tensor, in_degree: Tensor) -> Tensor:
        """Layer output from the weighted neighbour sum [M, F_l] and the node's own row."""
        if self.student.arch == "sage":  # lin_l(sum) + lin_r(h)
            return F.linear(summed, layer.lin_l.weight, layer.lin_l.bias) + F.linear(
                h, layer.lin_r.weight
            )
        sw = self_weights(self.norm, in_degree).to(h.dtype)  # gcn: (sum + sw h) W + b
        return F.linear(summed + sw * h, layer.lin.weight) + layer.bias


def new_node_module(ctx: ExportContext) -> NewNodeStudent:
    """The :class:`NewNodeStudent` of an export (states over the export's tables)."""
    student = ctx.student
    assert isinstance(student, LayerStack)
    states = [ctx.data.x, *ctx.layer_states()]
    return NewNodeStudent(student, states, ctx.tables[0].degree, ctx.fanouts)


def describe_existing(ctx: ExportContext, node_ids: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``(features [n, F], neighbors [n, width])`` re-describing stored nodes as new ones:
    their features and the valid slots of their layer-1 table (their exact neighbour list
    when their degree is at most the fanouts)."""
    table = ctx.tables[0]
    nbr = table.nbr[node_ids]
    mask = table.mask[node_ids]
    nbr = torch.where(mask, nbr, torch.full_like(nbr, PAD))
    pad = torch.full((nbr.size(0), max(0, width - nbr.size(1))), PAD, dtype=torch.int64)
    return ctx.data.x[node_ids].contiguous(), torch.cat([nbr, pad], 1)[:, :width].contiguous()


def exact_nodes(ctx: ExportContext) -> Tensor:
    """Ids of stored nodes whose every table holds all their neighbours (degree <= each
    fanout): re-describing them as new nodes must give their own answers."""
    degree = ctx.tables[0].degree
    return torch.nonzero(degree <= min(ctx.fanouts)).flatten()


def random_new_nodes(
    ctx: ExportContext, n: int, width: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` made-up new nodes: real feature rows plus noise, 0..``width`` random
    neighbours each (the first has none, the second is full)."""
    num = ctx.data.num_nodes
    x = ctx.data.x[torch.randint(0, num, (n,), generator=gen)]
    x = x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    counts = torch.randint(0, width + 1, (n,), generator=gen)
    counts[0] = 0
    if n > 1:
        counts[1] = width
    if n * width <= num:  # distinct ids within each node (one permutation for all)
        ids = torch.randperm(num, generator=gen)[: n * width].reshape(n, width)
    else:
        ids = torch.stack([torch.randperm(num, generator=gen)[:width] for _ in range(n)])
    slots = torch.arange(width).unsqueeze(0)
    nbr = torch.where(slots < counts.unsqueeze(1), ids, torch.full_like(ids, PAD))
    return x.contiguous(), nbr.contiguous()


def new_node_spec(ctx: ExportContext, module: NewNodeStudent, emb_dim: int) -> ExportSpec:
    """How to trace, describe and validate the new-node graph (no ``logits`` scoring:
    the export scores the main graph)."""
    width = min(module.max_neighbors, max(1, ctx.data.num_nodes))
    gen = ctx.generator(offset=77)
    nodes = Dim("nodes", min=1)
    validation = [
        ("1 new node", random_new_nodes(ctx, 1, width, gen)),
        ("9 new nodes, 0..K neighbours", random_new_nodes(ctx, 9, width, gen)),
    ]
    exact = exact_nodes(ctx)
    if exact.numel():
        pick = exact[torch.randint(0, exact.numel(), (min(64, exact.numel()),), generator=gen)]
        validation.append(("stored nodes re-described", describe_existing(ctx, pick, width)))
    student = ctx.student
    return ExportSpec(
        module=module,
        example=random_new_nodes(ctx, 5, width, gen),
        input_names=list(INPUT_NAMES),
        output_names=["logits", "embedding"],
        inputs=[
            spec("features", ctx.dtype, ["nodes", ctx.data.num_features]),
            spec("neighbors", "int64", ["nodes", width]),
        ],
        outputs=[
            spec("logits", ctx.dtype, ["nodes", student.out_channels]),
            spec("embedding", ctx.dtype, ["nodes", emb_dim]),
        ],
        dynamic_shapes=({0: nodes}, {0: nodes}),
        validation=validation,
        logits=lambda runner: runner(validation[0][1])[0],
    )
