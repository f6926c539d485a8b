"""``embedded`` export-form modules of typed students (``rgcn``, ``rsage``).

The typed counterpart of :class:`~abkd_deploy.export.modules.EmbeddedStudent`: target-type
node ids in, ``(logits, embedding)`` out, with one feature table per node type (the
features, or the learned embedding table of a featureless type) and one fixed-fanout
neighbour table per layer and relation baked in as buffers.

Tree layout (static per batch size, gather + slice + matmul only, no Scatter): level ``L``
is ``{target: node_ids}``; level ``l - 1`` of type ``s`` lists the level-``l`` rows of
``s`` itself (if ``s`` is a level-``l`` type), then, for every relation ``r = (s, ., t)``
into a level-``l`` type ``t`` (sorted), the ``K_r`` table entries of each level-``l`` row
of ``t``. Layer ``l`` gets a :class:`~abkd_deploy.data.typed_blocks.TypedBlock` whose
destinations are the self-row prefix of each type and whose relation operands
(:class:`SegmentOperand`) read their segment of the head type's rows as ``[n_t, K_r, F]``.
So the student's own layer code runs unchanged on it.

:func:`typed_layer_states` computes layers ``1..L-1`` for every node over the same tables
(the precomputed form, :func:`precomputed_typed_student`: a request then runs only the
last layer on the stored states).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.data.ell import EllBlock, FanoutTable
from abkd_deploy.data.typed_blocks import TypedBlock, relation_weights
from abkd_deploy.data.typed_graph import Relation, relation_key
from abkd_deploy.models.typed import TypedGNN, receptive_types

#: Most gathered values (``rows * K * F``) one chunk of :class:`ChunkedEllBlock` holds.
CHUNK_ELEMENTS = 1 << 26


class SegmentOperand:
    """Relation operand over a contiguous segment of the head type's tree rows.

    Args:
        weight: [n, K] slot weights (0 on padding).
        start: First row of the segment in the head type's rows.
    """

    def __init__(self, weight: Tensor, start) -> None:
        self.weight, self.start = weight, start

    def neighbors(self, h: Tensor) -> Tensor:
        """``h``: [n_src, F] head rows -> [n, F] weighted sums over each row's K slots."""
        n, k = self.weight.shape
        g = h[self.start : self.start + n * k].reshape((n, k, *h.shape[1:]))
        return torch.matmul(self.weight.unsqueeze(1).to(g.dtype), g).squeeze(1)


class ChunkedEllBlock(EllBlock):
    """Whole-relation :class:`EllBlock` that gathers at most :data:`CHUNK_ELEMENTS`
    values at a time (bounded temporary memory for :func:`typed_layer_states`)."""

    def neighbors(self, h: Tensor) -> Tensor:
        """``h``: [n_src, F] -> [n_dst, F], as :meth:`EllBlock.neighbors`, row chunk by chunk."""
        n, k = self.nbr.shape
        step = max(1, CHUNK_ELEMENTS // max(1, k * math.prod(h.shape[1:])))
        if step >= n:
            return super().neighbors(h)
        out = h.new_empty((n, *h.shape[1:]))
        for i in range(0, n, step):
            part = EllBlock(self.nbr[i : i + step], self.weight[i : i + step], None)
            out[i : i + step] = part.neighbors(h)
        return out


def level_types(relations: Sequence[Relation], target: str, num_layers: int) -> list[list[str]]:
    """Node types of each tree level, level 0 first (level ``L`` is ``[target]``)."""
    out = [sorted(t) for t in receptive_types(list(relations), target, num_layers)]
    first = set(out[0]) | {r[0] for r in relations if r[2] in out[0]}
    return [sorted(first), *out]


def without_embeddings(student: TypedGNN) -> TypedGNN:
    """A copy of ``student`` that reads float rows for every type (its embedding tables
    become feature tables, :func:`feature_tables`; an ``nn.Embedding`` would also name an
    ONNX value ``embedding``, the name of an output)."""
    model = copy.deepcopy(student).eval()
    model.embeddings = nn.ModuleDict()
    return model


def one_layer(student: TypedGNN, index: int) -> TypedGNN:
    """A copy of ``student`` reduced to its layer ``index``, reading float rows only."""
    model = without_embeddings(student)
    model.layers = nn.ModuleList([model.layers[index]])
    model.num_layers = 1
    model._needed = receptive_types(model.relations, model.target, 1)
    return model


class TypedEmbeddedStudent(nn.Module):
    """``embedded`` form of a typed student (module docstring).

    Args:
        student: Trained typed student (eval mode); its embedding tables, if any, are
            not used (:func:`without_embeddings`).
        features: ``{type: [N_t, F_t]}`` float rows of every level-0 type (features, or
            embedding tables for featureless types: :func:`feature_tables`).
        tables: One ``{relation: FanoutTable}`` per layer (layer 1 first); padding slots
            have weight 0.
        index_dtype: dtype of the stored neighbour ids (ids are cast to int64 after each
            gather).
        stored_embedding: Return the target's row of ``features`` as ``embedding``
            instead of the computed one (the precomputed form: ``features`` are the
            stored ``H^{L-1}``).
        first_layer: The student's layer number of ``tables[0]`` (buffer names are
            ``nbr__<h>__<r>__<t>__l<layer - 1>`` after the original layer).
    """

    def __init__(
        self,
        student: TypedGNN,
        features: Mapping[str, Tensor],
        tables: Sequence[Mapping[Relation, FanoutTable]],
        index_dtype: torch.dtype = torch.int64,
        stored_embedding: bool = False,
        first_layer: int = 1,
    ) -> None:
        super().__init__()
        self.student = without_embeddings(student) if len(student.embeddings) else student.eval()
        self.num_layers, self.target = student.num_layers, student.target
        self.levels_types = level_types(student.relations, self.target, self.num_layers)
        self.layer_relations: list[list[Relation]] = []
        self.first_layer = int(first_layer)
        for t in self.levels_types[0]:
            self.register_buffer(f"x__{t}", features[t].contiguous())
        dtype = next(iter(features.values())).dtype if features else torch.float32
        for layer, by_rel in enumerate(tables, start=1):
            dst = set(self.levels_types[layer])
            rels = sorted(r for r in by_rel if r[2] in dst and r[0] in self.levels_types[layer - 1])
            self.layer_relations.append(rels)
            for r in rels:
                table, name = by_rel[r], f"{relation_key(r)}__l{layer + self.first_layer - 2}"
                self.register_buffer(f"nbr__{name}", table.nbr.to(index_dtype).contiguous())
                w = relation_weights(table, student.norm).to(dtype)
                self.register_buffer(f"weight__{name}", w.contiguous())
        self.stored_embedding = stored_embedding

    def _table(self, kind: str, rel: Relation, layer: int) -> Tensor:
        return getattr(self, f"{kind}__{relation_key(rel)}__l{layer + self.first_layer - 2}")

    def forward(self, node_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Answers a batch of target-type node ids.

        Args:
            node_ids: [B] int64, each in ``[0, N_target)`` (duplicates allowed).

        Returns:
            ``(logits [B, C], embedding [B, d])``: ``d`` = hidden (the target's layer
            ``L - 1`` output), or C for a one-layer student.
        """
        ids: dict[str, Tensor] = {self.target: node_ids}
        blocks: list[TypedBlock] = []
        for layer in range(self.num_layers, 0, -1):
            block = TypedBlock(num_dst={t: ids[t].size(0) for t in ids})
            src: dict[str, Tensor] = {}
            for s in self.levels_types[layer - 1]:
                parts = [ids[s]] if s in ids else []
                start = ids[s].size(0) if s in ids else 0
                for r in self.layer_relations[layer - 1]:
                    if r[0] != s:
                        continue
                    dst = ids[r[2]]
                    nb = self._table("nbr", r, layer).index_select(0, dst).to(torch.int64)
                    w = self._table("weight", r, layer).index_select(0, dst)
                    block.rel_ops[r] = SegmentOperand(w, start)
                    parts.append(nb.reshape(-1))
                    start = start + nb.size(0) * nb.size(1)
                src[s] = parts[0] if len(parts) == 1 else torch.cat(parts)
            blocks.append(block)
            ids = src
        inputs = {t: getattr(self, f"x__{t}").index_select(0, v) for t, v in ids.items()}
        logits, hiddens = self.student(inputs, blocks[::-1])
        if self.stored_embedding:
            return logits, getattr(self, f"x__{self.target}").index_select(0, node_ids)
        if len(hiddens) < 2:
            return logits, logits
        return logits, hiddens[-2][: node_ids.size(0)]


def feature_tables(student: TypedGNN, x_dict: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """``{type: [N_t, F_t]}``: the features, or the learned embedding table of a
    featureless type (``[N_t, emb_dim]``)."""
    out = {t: x for t, x in x_dict.items() if x is not None and t not in student.embeddings}
    out.update({t: emb.weight.detach() for t, emb in student.embeddings.items()})
    return out


@torch.no_grad()
def typed_layer_states(
    student: TypedGNN,
    x_dict: Mapping[str, Tensor | None],
    tables: Sequence[Mapping[Relation, FanoutTable]],
) -> list[dict[str, Tensor]]:
    """Outputs of layers ``1..L-1`` (after ReLU) for every node of the types they feed.

    Layer ``l`` aggregates over the layer-``l`` tables, as the tree form does for any row
    at any level, so each row is what a request would compute for that node. Whole
    relations are gathered in row chunks (:class:`ChunkedEllBlock`), so the temporary
    memory is bounded (``[N, K, F]`` at ogbn-mag's size is tens of GB).

    Returns:
        ``L - 1`` dicts ``{type: [N_t, hidden]}`` (the types layer ``l`` must output).
    """
    full = {t: int(n) for t, n in student.schema["num_nodes"].items()}
    inputs = {
        t: torch.arange(full[t]) if t in student.embeddings else x_dict[t]
        for t in student.node_types
        if t in student.embeddings or x_dict.get(t) is not None
    }
    h = student.embed(inputs)
    needed = receptive_types(student.relations, student.target, student.num_layers)
    states = []
    for index in range(student.num_layers - 1):
        block = TypedBlock(
            num_dst=dict(full),
            rel_ops={
                r: ChunkedEllBlock(t.nbr, relation_weights(t, student.norm), None)
                for r, t in sorted(tables[index].items())
            },
        )
        dst = [t for t in student.node_types if t in needed[index]]
        h = {t: F.relu(v).contiguous() for t, v in student.layers[index](h, block, dst).items()}
        states.append(h)
    return states


def precomputed_typed_student(
    student: TypedGNN,
    states: Sequence[Mapping[str, Tensor]],
    tables: Sequence[Mapping[Relation, FanoutTable]],
    index_dtype: torch.dtype = torch.int64,
) -> TypedEmbeddedStudent:
    """The ``embedded`` module that runs only the last layer on the stored ``H^{L-1}``.

    Args:
        student: Trained typed student with ``L >= 2`` layers.
        states: :func:`typed_layer_states` over ``tables``.
        tables: The export's per-layer tables (only the last is stored).
    """
    hidden = states[-1]
    return TypedEmbeddedStudent(
        one_layer(student, -1),
        hidden,
        [tables[-1]],
        index_dtype=index_dtype,
        stored_embedding=True,
        first_layer=student.num_layers,
    )
