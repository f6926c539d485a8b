"""Export-form modules: a trained student wrapped so that its graph is plain tensors.

A :class:`~abkd_deploy.models.GNN` takes graph *operands*; exporters need a module whose
inputs are tensors only. Each wrapper below builds the operands inside ``forward`` from
its tensor inputs (or buffers), so tracing sees only tensor ops:

* :class:`EllStudent` (``ell``): ``x`` and per layer ``nbr_l`` / ``weight_l``
  (/ ``self_weight_l`` for ``gcn`` norm) -> logits, via
  :class:`~abkd_deploy.data.ell.EllBlock` (Gather + MatMul, no scatter).
* :class:`EmbeddedStudent` (``embedded``): ``node_ids`` -> ``(logits, embedding)``; the
  features and per-layer fanout tables are buffers, the L-hop receptive field is
  gathered as a tree and reduced with :class:`~abkd_deploy.data.ell.TreeBlock`.
* :class:`CooStudent` (``coo``): ``x``, ``edge_index`` -> logits; degrees and the
  normalisation are computed inside with ``scatter_add`` (ONNX ScatterElements with
  ``reduction="add"``, opset >= 18; never ``index_add``, see docs/ARCHITECTURE.md
  section 9.4).

The exact wire contract (names, shapes, dtypes) is docs/FORMATS.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.data.ell import EllBlock, FanoutTable, TreeBlock
from abkd_deploy.models.base import GNN


def embedding_of(student: GNN, logits: Tensor, hiddens: list[Tensor], last_op) -> Tensor:
    """The representation exported as ``embedding``: the last hidden layer's output.

    ``gcnii`` keeps it at the target rows already; other archs produce it one level
    down (the last operand's source rows), so the last operand selects the targets.
    A 1-layer model has no hidden layer: its embedding is the logits.

    Returns:
        [n_L, d] with d = hidden (or C for a 1-layer model).
    """
    if student.arch == "gcnii":
        return hiddens[-1]
    if len(hiddens) < 2:
        return logits
    return last_op.dst(hiddens[-2])


def uses_self_weight(student: GNN) -> bool:
    """Whether the student's operands carry a ``self_weight`` (``gcn`` norm)."""
    return student.norm == "gcn"


class EllStudent(nn.Module):
    """``ell`` form: features and padded per-layer neighbour tables are inputs.

    Args:
        student: Trained student (put in eval mode; dropout is off).
    """

    def __init__(self, student: GNN) -> None:
        super().__init__()
        self.student = student.eval()
        self.num_layers = student.num_layers
        self.with_self = uses_self_weight(student)

    def forward(self, x: Tensor, *graph: Tensor) -> Tensor:
        """Runs the student on ELL blocks.

        Args:
            x: [n0, F] input rows.
            *graph: Per layer ``l = 1..L``: ``nbr_l`` (int64 [n_l, K_l], rows of layer
                ``l - 1``), ``weight_l`` ([n_l, K_l], 0 on padding) and, for ``gcn``
                norm, ``self_weight_l`` ([n_l]). Layer ``l``'s destinations are the
                first ``n_l`` rows of its input.

        Returns:
            logits [n_L, C].
        """
        step = 3 if self.with_self else 2
        blocks = [
            EllBlock(graph[i], graph[i + 1], graph[i + 2] if self.with_self else None)
            for i in range(0, step * self.num_layers, step)
        ]
        return self.student(x, blocks)[0]


class TableBlock(EllBlock):
    """Layer-1 operand of the ``embedded`` form: the sources are a whole per-node table.

    ``nbr`` holds *global* ids (rows of the table), and the destinations are the rows
    ``dst_ids`` of the table (or of ``dst_table``, the ``x W_r^T`` table of a folded
    ``sage`` student). No receptive-field rows are materialised before the gather.

    Args:
        nbr: [n, K] int64 global neighbour ids.
        weight: [n, K] slot weights (0 on padding).
        self_weight: [n] (``gcn``) or ``None``.
        dst_ids: [n] int64 global ids of the destinations.
        dst_table: [N, F'] table read by :meth:`dst` instead of ``h``, or ``None``.
        src_table: [N, F'] table read instead of ``h`` by :meth:`gather` (and :meth:`dst`
            without ``dst_table``), or ``None``: an int8
            :class:`~abkd_deploy.export.quantize.QuantizedTable` that is dequantised
            only after the gather.
    """

    def __init__(
        self,
        nbr: Tensor,
        weight: Tensor,
        self_weight: Tensor | None,
        dst_ids: Tensor,
        dst_table: Tensor | None = None,
        src_table: Tensor | None = None,
    ) -> None:
        super().__init__(nbr, weight, self_weight)
        self.dst_ids, self.dst_table, self.src_table = dst_ids, dst_table, src_table

    def gather(self, h: Tensor) -> Tensor:
        return super().gather(h if self.src_table is None else self.src_table)

    def dst(self, h: Tensor) -> Tensor:
        table = self.dst_table if self.dst_table is not None else self.src_table
        return (h if table is None else table).index_select(0, self.dst_ids)


class FactoredTableBlock(TableBlock):
    """:class:`TableBlock` of a ``mean`` aggregation, with the slot weights factored.

    A ``mean`` slot weight is ``1 / count`` of the destination on valid slots and 0 on
    padding, so the weighted sum is a plain sum times one scale per destination when the
    padding slots read an all-zero row: the source table holds one extra zero row (id
    ``N``) and the padding slots point to it. No weight table is gathered, and the sum
    over the ``K`` rows is one 2-D MatMul of the flattened ``[n, K * F]`` rows with
    ``summing`` (``K`` stacked ``F x F`` identities) instead of a batched
    ``[n, 1, K] x [n, K, F]`` MatMul. (onnxruntime 1.32 on CPU, batch 1024, F = 5:
    ``ReduceSum`` over the middle axis took 231 us, this MatMul 34 us; docs/BENCHMARKS.md.)

    Args:
        nbr: [n, K] int64 global neighbour ids, padding = ``N`` (the zero row).
        scale: [n, 1] per-destination scale (``1 / max(count, 1)``).
        summing: [K * F, F] stacked identities (:func:`summing_matrix`), or ``None`` for a
            table wider than :data:`SUMMING_MAX_WIDTH` (a plain sum over the ``K`` rows:
            the MatMul's ``K * F^2`` multiply-adds per row would outgrow what it saves).
        dst_ids: [n] int64 global ids of the destinations.
        dst_table: see :class:`TableBlock`.
        src_table: see :class:`TableBlock` (its row ``N`` is zero as well).
    """

    def __init__(
        self,
        nbr: Tensor,
        scale: Tensor,
        summing: Tensor | None,
        dst_ids: Tensor,
        dst_table: Tensor | None = None,
        src_table: Tensor | None = None,
    ) -> None:
        super().__init__(nbr, scale, None, dst_ids, dst_table, src_table)
        self.scale, self.summing = scale, summing

    def neighbors(self, h: Tensor) -> Tensor:
        g = self.gather(h)  # [n, K, F]; padding slots are zero rows
        if self.summing is None:  # a wide table: ReduceSum (K F^2 MACs would cost more)
            return g.sum(1) * self.scale.to(g.dtype)
        flat = g.reshape(g.size(0), -1)  # [n, K * F]
        return (flat @ self.summing.to(g.dtype)) * self.scale.to(g.dtype)


#: Widest table summed by :func:`summing_matrix`'s MatMul (F is the number of classes of a
#: precomputed export: Cora 7, csbm 5); wider ones are summed with ``ReduceSum``.
SUMMING_MAX_WIDTH = 16


def summing_matrix(fanout: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[K * F, F] ``K`` stacked ``F x F`` identities: ``flat @ it`` sums the ``K`` rows."""
    return torch.eye(width, dtype=dtype).repeat(fanout, 1).contiguous()


def factored_table(table: FanoutTable) -> tuple[Tensor, Tensor]:
    """The layer-1 operands of :class:`FactoredTableBlock` for a ``mean`` table.

    Returns:
        ``(nbr, scale)``: [N, K] int64 ids with padding = ``N`` (the extra zero row of the
        source table) and [N, 1] float32 ``1 / max(count, 1)``.
    """
    n = table.nbr.size(0)
    nbr = torch.where(table.mask, table.nbr, torch.full_like(table.nbr, n))
    scale = 1.0 / table.count.clamp(min=1).to(torch.float32)
    return nbr, scale.unsqueeze(1)


#: Archs whose layer 1 gets :class:`FactoredTableBlock` (``mean`` aggregation read
#: through the operand alone) when it gathers straight from the stored table.
FACTORED_ARCHS = ("sage",)


#: Archs whose (folded) first layer reads its input only through the operand, so layer 1
#: can gather straight from the stored table (:class:`TableBlock`). Others (``gat``
#: computes attention scores on every input row, ``gcnii`` applies ReLU to them) get a
#: materialised level 0 and :class:`TreeBlock` s only.
TABLE_FIRST_ARCHS = ("gcn", "sage", "mlp")


class EmbeddedStudent(nn.Module):
    """``embedded`` form: node ids in, logits and embeddings out; graph baked in.

    Level ``L`` of the receptive-field tree is the batch; level ``l - 1`` lists, for
    every level-``l`` node, the node itself then its ``K_l`` table entries (layer
    ``l``'s table). Layer ``l >= 2`` reduces each group of ``1 + K_l`` rows of level
    ``l - 1`` to one (:class:`TreeBlock`, reshapes only). Layer 1 either gathers its
    neighbours straight from ``features`` (:class:`TableBlock`, archs in
    :data:`TABLE_FIRST_ARCHS`) or runs on the materialised level 0 (``features`` rows of
    every level-0 node). Shapes stay static per batch size. A table-first ``sage`` layer
    1 is factored (:class:`FactoredTableBlock`): ``features`` gets one extra zero row
    (id ``N``) that the padding slots of ``nbr_1`` point to, ``scale_1`` ([N, 1])
    replaces ``weight_1`` and ``sum_1`` ([K_1 * F', F']) sums the gathered rows.

    Args:
        student: Trained student, normally with its first map folded into ``features``
            (:mod:`abkd_deploy.export.fold`).
        features: [N, F'] per-node input rows.
        tables: One fanout table per layer (layer 1 first).
        index_dtype: dtype of the stored neighbour ids (``torch.int32`` halves the
            tables; ids are cast to int64 after each gather).
        dst_features: [N, F'] destination rows of layer 1 (folded ``sage``), or None.
        table_first: Use :class:`TableBlock` for layer 1 (requires a folded student of
            an arch in :data:`TABLE_FIRST_ARCHS`).
        factor: With ``table_first``, a :class:`FactoredTableBlock` for an arch in
            :data:`FACTORED_ARCHS` (``False``: the slot weights, the layout of older
            exports).
    """

    def __init__(
        self,
        student: GNN,
        features: Tensor,
        tables: Sequence[FanoutTable],
        index_dtype: torch.dtype = torch.int64,
        dst_features: Tensor | None = None,
        table_first: bool = False,
        factor: bool = True,
    ) -> None:
        super().__init__()
        self.student = student.eval()
        self.num_layers = student.num_layers
        self.with_self = uses_self_weight(student)
        self.table_first = table_first
        self.factored = (
            factor and table_first and student.arch in FACTORED_ARCHS and student.norm == "mean"
        )
        dtype = features.dtype
        if self.factored:  # the zero row that the padding slots of nbr_1 read
            features = torch.cat([features, features.new_zeros((1, features.size(1)))])
        self.register_buffer("features", features.contiguous())
        self.dst_features: Tensor | None
        if dst_features is not None:
            self.register_buffer("dst_features", dst_features.contiguous())
        else:
            self.dst_features = None
        for layer, table in enumerate(tables, start=1):
            if layer == 1 and self.factored:
                nbr, scale = factored_table(table)
                self.register_buffer("nbr_1", nbr.to(index_dtype).contiguous())
                self.register_buffer("scale_1", scale.to(dtype).contiguous())
                width = features.size(1)
                if width <= SUMMING_MAX_WIDTH:
                    self.register_buffer("sum_1", summing_matrix(table.fanout, width, dtype))
                else:
                    self.sum_1 = None
                continue
            w, sw = table.weights(student.norm)
            self.register_buffer(f"nbr_{layer}", table.nbr.to(index_dtype).contiguous())
            self.register_buffer(f"weight_{layer}", w.to(dtype).contiguous())
            if self.with_self:
                self.register_buffer(f"self_weight_{layer}", sw.to(dtype).contiguous())

    def levels(self, node_ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Global ids of every tree level and the gathered table rows of each layer.

        Args:
            node_ids: [B] int64.

        Returns:
            ``(levels, nbrs)``: ``levels[l]`` (level 0 first) has
            ``B * prod_{m > l}(1 + K_m)`` int64 ids; ``nbrs[l - 1]`` is layer ``l``'s
            table at level ``l`` ([n_l, K_l] int64).
        """
        ids = node_ids
        levels, nbrs = [ids], []
        for layer in range(self.num_layers, 0, -1):
            nb = getattr(self, f"nbr_{layer}").index_select(0, ids).to(torch.int64)
            nbrs.append(nb)
            ids = torch.cat([ids.unsqueeze(1), nb], 1).reshape(-1)
            levels.append(ids)
        return levels[::-1], nbrs[::-1]

    def forward(self, node_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Answers a batch of node ids.

        Args:
            node_ids: [B] int64, each in ``[0, N)`` (duplicates allowed).

        Returns:
            ``(logits [B, C], embedding [B, d])``.
        """
        levels, nbrs = self.levels(node_ids)
        blocks: list[EllBlock | TreeBlock] = []
        for layer in range(1, self.num_layers + 1):
            dst = levels[layer]
            if layer == 1 and self.factored:
                src = None if isinstance(self.features, Tensor) else self.features
                scale = self.scale_1.index_select(0, dst)
                blocks.append(
                    FactoredTableBlock(nbrs[0], scale, self.sum_1, dst, self.dst_features, src)
                )
                continue
            w = getattr(self, f"weight_{layer}").index_select(0, dst)
            sw = None
            if self.with_self:
                sw = getattr(self, f"self_weight_{layer}").index_select(0, dst)
            if layer == 1 and self.table_first:
                src = None if isinstance(self.features, Tensor) else self.features
                blocks.append(TableBlock(nbrs[0], w, sw, dst, self.dst_features, src))
            else:
                blocks.append(TreeBlock(w, sw))
        if not self.table_first:
            x = self.features.index_select(0, levels[0])
        elif isinstance(self.features, Tensor):
            x = self.features
        else:  # an int8 QuantizedTable: layer 1 reads it only through its TableBlock
            x = self.features.placeholder()
        logits, hiddens = self.student(x, blocks)
        return logits, embedding_of(self.student, logits, hiddens, blocks[-1])


class CooGraph:
    """Whole-graph operand from ``edge_index`` using only gathers and scatter-add.

    Args:
        edge_index: [2, E] int64, row 0 source, row 1 destination, no self loops.
        num_nodes: N (may be symbolic while tracing).
        norm: Aggregation normalisation of the student (see :mod:`abkd_deploy.data.csr`).
        dtype: Float dtype of the weights.
    """

    def __init__(self, edge_index: Tensor, num_nodes, norm: str, dtype: torch.dtype) -> None:
        self.src, self.dst_idx = edge_index[0], edge_index[1]
        self.num_nodes, self.norm = num_nodes, norm
        ones = torch.ones_like(self.dst_idx, dtype=dtype)
        deg = torch.zeros(num_nodes, dtype=dtype, device=ones.device)
        deg = deg.scatter_add(0, self.dst_idx, ones)  # [N] in-degree
        self.self_weight: Tensor | None = None
        if norm == "gcn":
            self.weight = torch.rsqrt((deg[self.dst_idx] + 1) * (deg[self.src] + 1))
            self.self_weight = (1.0 / (deg + 1)).unsqueeze(1)
        elif norm == "mean":
            self.weight = 1.0 / deg.clamp(min=1)[self.dst_idx]
        else:
            self.weight = ones

    def _scatter(self, base: Tensor, msg: Tensor) -> Tensor:
        index = self.dst_idx.reshape((-1,) + (1,) * (msg.dim() - 1)).expand_as(msg)
        return base.scatter_add(0, index, msg)

    def neighbors(self, h: Tensor) -> Tensor:
        """Normalised neighbour sum. ``h``: [N, F] -> [N, F]."""
        msg = h.index_select(0, self.src) * self.weight.to(h.dtype).unsqueeze(1)
        return self._scatter(torch.zeros_like(h), msg)

    def dst(self, h: Tensor) -> Tensor:
        return h

    def attend(self, z: Tensor, a_src: Tensor, a_dst: Tensor, negative_slope: float) -> Tensor:
        """GAT aggregation with self loops (segment softmax via scatter max / add).

        Args:
            z: [N, H, C]; a_src, a_dst: [N, H].

        Returns:
            [N, H, C].
        """
        e = F.leaky_relu(a_src[self.src] + a_dst[self.dst_idx], negative_slope)  # [E, H]
        e_self = F.leaky_relu(a_src + a_dst, negative_slope)  # [N, H]
        index = self.dst_idx.unsqueeze(1).expand_as(e)
        peak = e_self.scatter_reduce(0, index, e, reduce="amax", include_self=True)
        ex = torch.exp(e - peak[self.dst_idx])
        ex_self = torch.exp(e_self - peak)
        denom = self._scatter(ex_self, ex)  # [N, H]
        num = self._scatter(ex_self.unsqueeze(-1) * z, ex.unsqueeze(-1) * z[self.src])
        return num / denom.unsqueeze(-1)


class CooStudent(nn.Module):
    """``coo`` form: ``x`` and ``edge_index`` in, logits out (exact, full graph).

    Args:
        student: Trained student.
    """

    def __init__(self, student: GNN) -> None:
        super().__init__()
        self.student = student.eval()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Runs the student on a COO graph.

        Args:
            x: [N, F] node features.
            edge_index: [2, E] int64 (source, destination), no self loops.

        Returns:
            logits [N, C].
        """
        graph = CooGraph(edge_index, x.size(0), self.student.norm, x.dtype)
        return self.student(x, graph)[0]
