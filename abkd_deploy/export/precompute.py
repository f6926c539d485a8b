"""Precompute the first ``L - 1`` layers of an ``embedded`` student at export time.

In the ``embedded`` form the node features and the fanout tables are constants, so the
output of layers ``1..L-1`` for node ``v`` depends on ``v`` alone: it is the same for
every request. Exporting it as a table ``H`` ([N, hidden], the input of the last layer)
leaves one layer per request: gather the ``K_L`` table rows of each target instead of
its whole ``prod(1 + K_l)``-row receptive-field tree. The last layer's own linear map is
folded into ``H`` as well (:mod:`abkd_deploy.export.fold`), so a request is two gathers
of ``C``-wide rows and a weighted sum. Outputs equal the tree form's up to float rounding
(validation compares them, see :func:`abkd_deploy.export.embedded_adjacency.build_embedded`).

Only for :class:`~abkd_deploy.models.base.LayerStack` students whose layers read their
input through the operand alone (``gcn``, ``sage``); ``gat`` and ``gcnii`` keep the tree.

``--precompute all`` goes one step further, for every architecture: the whole model's
outputs are constants too, so :func:`output_tables` stores them and the artifact is a
lookup (:class:`OutputTables`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.data.ell import FanoutTable
from abkd_deploy.errors import ConfigError
from abkd_deploy.export.fold import fold_input_transform
from abkd_deploy.export.modules import EmbeddedStudent, TableBlock
from abkd_deploy.export.quantize import lookup
from abkd_deploy.models.base import GNN, LayerStack

#: Archs whose hidden layers can be precomputed.
PRECOMPUTE_ARCHS = ("gcn", "sage")
#: Gathered elements per chunk of destination rows (bounds the temporary memory).
CHUNK_ELEMENTS = 1 << 26


def can_precompute(student: GNN) -> bool:
    """Whether :func:`precompute_student` supports ``student`` (and it has >= 2 layers)."""
    return (
        isinstance(student, LayerStack)
        and student.arch in PRECOMPUTE_ARCHS
        and student.num_layers >= 2
    )


def single_layer(student: LayerStack, index: int, in_channels: int) -> LayerStack:
    """A copy of ``student`` reduced to its layer ``index`` (a one-layer model)."""
    model = copy.deepcopy(student).eval()
    model.layers = nn.ModuleList([model.layers[index]])
    model.num_layers, model.in_channels = 1, in_channels
    return model


@torch.no_grad()
def layer_states(
    student: LayerStack,
    x: Tensor,
    tables: Sequence[FanoutTable],
    rows: Sequence[Tensor] | None = None,
    previous: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Outputs ``H^1..H^{L-1}`` of layers ``1..L-1`` (after the activation) for every node.

    Layer ``l`` aggregates over table ``l``, exactly as the tree form does for any node
    at any level, so each row is what a request would compute for that node. Each
    layer's per-node linear map is applied once to all rows (folded, as in the
    artifact); only the gathering is chunked.

    Incremental mode (``refresh``): with ``rows`` and ``previous``, only the rows
    ``rows[l]`` of ``H^{l+1}`` are computed; the others are copied from ``previous[l]``
    (which may have fewer rows than ``x``: the nodes added since must be in ``rows``).

    Args:
        student: Trained student in eval mode.
        x: [N, F] node features.
        tables: Fanout tables, layer 1 first (``L`` of them; the last is not used here).
        rows: Per hidden layer, [r_l] int64 ids of the rows to compute.
        previous: Per hidden layer, [N', hidden] states to copy the other rows from.

    Returns:
        ``L - 1`` tensors, ``H^l`` [N, hidden] each; the last is the input of the last layer.
    """
    if (rows is None) != (previous is None):
        raise ValueError("layer_states: give rows and previous together")
    act = getattr(F, student.activation)
    n = x.size(0)
    h, states = x, []
    for index, table in enumerate(tables[:-1]):
        folded = fold_input_transform(single_layer(student, index, h.size(1)), h)
        assert folded is not None  # every PRECOMPUTE_ARCHS arch has a folder
        layer = folded.model.layers[0]
        w, sw = table.weights(student.norm)
        todo = torch.arange(n) if rows is None else rows[index]
        step = max(1, CHUNK_ELEMENTS // (table.fanout * folded.features.size(1)))
        parts = []
        for i in range(0, todo.numel(), step):
            ids = todo[i : i + step]
            op = TableBlock(
                table.nbr[ids], w[ids], None if sw is None else sw[ids], ids, folded.dst_features
            )
            parts.append(act(layer(folded.features, op)))
        if rows is None:
            h = torch.cat(parts).contiguous()
        else:
            old = previous[index]  # type: ignore[index]
            h = torch.empty((n, old.size(1)), dtype=old.dtype)
            h[: old.size(0)] = old[:n]
            if parts:
                h[todo] = torch.cat(parts).to(h.dtype)
        states.append(h)
    return states


def hidden_table(student: LayerStack, x: Tensor, tables: Sequence[FanoutTable]) -> Tensor:
    """[N, hidden] outputs of layer ``L - 1``: the last of :func:`layer_states`."""
    return layer_states(student, x, tables)[-1]


class PrecomputedStudent(nn.Module):
    """``embedded`` module with layers ``1..L-1`` precomputed.

    Args:
        last: The folded one-layer model of the student's last layer, as an
            :class:`~abkd_deploy.export.modules.EmbeddedStudent` reading its table.
        hidden: [N, hidden] outputs of layer ``L - 1`` (the ``embedding`` output).
    """

    def __init__(self, last: EmbeddedStudent, hidden: Tensor) -> None:
        super().__init__()
        self.last = last
        self.register_buffer("hidden", hidden.contiguous())

    @property
    def dst_features(self) -> Tensor | None:
        return self.last.dst_features

    def forward(self, node_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``node_ids`` [B] int64 -> ``(logits [B, C], embedding [B, hidden])``."""
        logits, _ = self.last(node_ids)
        return logits, self.hidden.index_select(0, node_ids)


def precompute_student(
    student: LayerStack,
    x: Tensor,
    tables: Sequence[FanoutTable],
    index_dtype: torch.dtype = torch.int64,
    hidden: Tensor | None = None,
    factor: bool = True,
) -> PrecomputedStudent:
    """Builds the precomputed ``embedded`` module (see the module docstring).

    ``hidden``: the [N, hidden] ``H^{L-1}`` table when the caller already has it
    (:meth:`~.adjacency.ExportContext.layer_states`); computed here otherwise.
    ``factor``: see :class:`~abkd_deploy.export.modules.EmbeddedStudent`.

    Raises:
        ValueError: ``student`` is not supported (check :func:`can_precompute` first).
    """
    if not can_precompute(student):
        raise ValueError(f"cannot precompute the hidden layers of a {student.arch} student")
    if hidden is None:
        hidden = hidden_table(student, x, tables)
    folded = fold_input_transform(single_layer(student, -1, student.hidden), hidden)
    assert folded is not None  # every PRECOMPUTE_ARCHS arch has a folder
    module = EmbeddedStudent(
        folded.model,
        folded.features,
        [tables[-1]],
        index_dtype=index_dtype,
        dst_features=folded.dst_features,
        table_first=True,
        factor=factor,
    )
    return PrecomputedStudent(module, hidden)


#: ``precompute`` values: ``True`` / ``"hidden"`` (layers ``1..L-1``, the default),
#: ``False`` / ``"none"``, and ``"all"`` (every output, :class:`OutputTables`).
PRECOMPUTE_MODES = ("hidden", "none", "all")
#: Target nodes per chunk when the output tables are computed.
OUTPUT_CHUNK = 16384


def precompute_mode(value: bool | str, adjacency: str) -> str:
    """Normalises ``export(precompute=...)`` to one of :data:`PRECOMPUTE_MODES`.

    Args:
        value: ``True``, ``False`` or a mode name.
        adjacency: the adjacency format's name (``all`` needs ``embedded``: node ids in).

    Raises:
        ConfigError: an unknown value, or ``all`` for a format that takes its graph as input.
    """
    mode = ("hidden" if value else "none") if isinstance(value, bool) else value
    if mode not in PRECOMPUTE_MODES:
        raise ConfigError(f"unknown precompute mode {value!r}; expected one of {PRECOMPUTE_MODES}")
    if mode == "all" and adjacency != "embedded":
        raise ConfigError(
            f"--precompute all stores every node's outputs and needs --adjacency embedded; "
            f"{adjacency!r} takes its graph as input (use --precompute hidden or none)"
        )
    return mode


class OutputTables(nn.Module):
    """``embedded`` module reduced to a lookup (``--precompute all``).

    With the features and fanout tables baked in, every output of node ``v`` is a
    constant: this stores them (``logits_table`` [N, C], ``embedding_table`` [N, d]) and a
    request is one ONNX ``Gather`` of ``node_ids`` per output, exact for the embedded
    snapshot (the tables are the export-form module's own outputs).

    Args:
        logits: [N, C] logits of every node.
        embedding: [N, d] embedding of every node.
    """

    dst_features = None  # what build_embedded reports for the layer-1 destination table

    def __init__(self, logits: Tensor, embedding: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits_table", logits.contiguous())
        self.register_buffer("embedding_table", embedding.contiguous())

    def forward(self, node_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``node_ids`` [B] int64 -> ``(logits [B, C], embedding [B, d])`` (plain Gathers, or
        int8 Gathers dequantised after them: :class:`~.quantize.QuantizedTable`)."""
        return lookup(self.logits_table, node_ids), lookup(self.embedding_table, node_ids)


@torch.no_grad()
def output_tables(module: nn.Module, num_nodes: int, chunk: int = OUTPUT_CHUNK) -> OutputTables:
    """Runs an ``embedded`` module on every node id (in chunks) and stores its outputs.

    Args:
        module: ``node_ids -> (logits, embedding)`` (tree or precomputed form), eval mode.
        num_nodes: N.
        chunk: node ids per call (bounds the temporary memory).

    Returns:
        The lookup module; row ``v`` of each table is ``module([v])``.
    """
    logits, embedding = [], []
    for start in range(0, num_nodes, max(1, int(chunk))):
        out = module(torch.arange(start, min(num_nodes, start + chunk)))
        logits.append(out[0])
        embedding.append(out[1])
    return OutputTables(torch.cat(logits), torch.cat(embedding))
