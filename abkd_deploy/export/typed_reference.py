"""Reference logits of a typed student, layer by layer over the scored targets' receptive field.

The typed export scores the PyTorch student twice: on the export's fanout tables (what the
artifact sees) and on the exact graph. Both run here the same way, so neither holds a
whole-graph batch at once (ogbn-mag's size: a 3 x 512 teacher's whole-graph forward, or
its sampled 3-hop blocks, are tens of GB):

1. the rows each layer must output (:func:`needed_rows`): level ``L`` is the scored
   targets, level ``l - 1`` the level-``l`` rows themselves plus their in-neighbours over
   every relation (the k-hop in-neighbourhood, deduplicated; for tables, the table's
   entries, padding slots included, as the sampled blocks gather them);
2. layer ``l`` for those rows only, in destination-row chunks (:func:`layer_chunks`):
   each chunk is a :class:`~abkd_deploy.data.typed_blocks.TypedBlock` over the chunk's
   own rows and their neighbours (prefix convention), run through the student's own
   layer, so its temporaries stay under :data:`CHUNK_ELEMENTS` values.

Peak memory is the states of two adjacent levels (at most every node's ``hidden`` row
twice) plus one chunk, whatever the number of scored targets. Every row is computed
once (sampled batches recompute shared neighbours), and the result does not depend on
the chunking: a row's output depends only on its own neighbour list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import EllBlock, FanoutTable
from abkd_deploy.data.typed_blocks import (
    RelationFull,
    TypedBlock,
    relation_csr,
    relation_weights,
)
from abkd_deploy.data.typed_graph import Relation, TypedGraph
from abkd_deploy.export.typed_modules import CHUNK_ELEMENTS
from abkd_deploy.models.typed import TypedGNN


@dataclass
class TableNeighbours:
    """In-neighbours of one relation at one layer from a fanout table (sampled reference).

    Attributes:
        table: ``nbr`` [N_tail, K] global head ids (padding slots point at head 0).
        weight: [N_tail, K] slot weights (0 on padding).
    """

    table: FanoutTable
    weight: Tensor

    def slots(self, rows: Tensor) -> Tensor:
        """[n] neighbour slots of each of ``rows`` (K each)."""
        return torch.full((rows.numel(),), self.table.nbr.size(1), dtype=torch.long)

    def heads(self, rows: Tensor) -> Tensor:
        """Global head ids the rows read (flat, with repeats)."""
        return self.table.nbr[rows].reshape(-1)

    def operand(self, rows: Tensor, loc: Tensor, num_src: int) -> EllBlock:
        """The rows' operand over local head ids ``loc[global id]``."""
        del num_src
        return EllBlock(loc[self.table.nbr[rows]], self.weight[rows], None)


@dataclass
class CsrNeighbours:
    """Every in-neighbour of one relation (exact reference), ``mean``/``sum`` normalised."""

    csr: CSR
    norm: str

    def slots(self, rows: Tensor) -> Tensor:
        return self.csr.degree[rows]

    def _edges(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(edge positions in csr.col, local tail row of each)`` of ``rows``' in-edges."""
        counts = self.csr.degree[rows]
        tail = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = self.csr.rowptr[rows][tail] + torch.arange(tail.numel()) - first[tail]
        return pos, tail

    def heads(self, rows: Tensor) -> Tensor:
        return self.csr.col[self._edges(rows)[0]]

    def operand(self, rows: Tensor, loc: Tensor, num_src: int) -> RelationFull:
        pos, tail = self._edges(rows)
        edges = torch.stack([loc[self.csr.col[pos]], tail])
        return RelationFull(edges, num_src, rows.numel(), self.norm)


#: One ``{relation: neighbours}`` per layer (layer 1 first).
Sources = Sequence[Mapping[Relation, "TableNeighbours | CsrNeighbours"]]


def table_sources(tables: Sequence[Mapping[Relation, FanoutTable]], norm: str) -> Sources:
    """The export's fanout tables as per-layer neighbour sources."""
    return [
        {r: TableNeighbours(t, relation_weights(t, norm)) for r, t in ks.items()} for ks in tables
    ]


def exact_sources(data: TypedGraph, norm: str, num_layers: int) -> Sources:
    """Every relation's full in-neighbour lists, the same for every layer."""
    layer = {
        r: CsrNeighbours(relation_csr(ei, data.num_nodes_dict[r[2]]), norm)
        for r, ei in sorted(data.edge_index_dict.items())
    }
    return [layer] * num_layers


def needed_rows(sources: Sources, target: str, ids: Tensor) -> list[dict[str, Tensor]]:
    """Sorted global ids each level needs, level 0 (inputs) first, level ``L`` = ``ids``."""
    levels = [{target: torch.unique(ids)}]
    for layer in reversed(sources):
        cur = levels[0]
        parts: dict[str, list[Tensor]] = {t: [v] for t, v in cur.items()}
        for r, src in sorted(layer.items()):
            if r[2] in cur:
                parts.setdefault(r[0], []).append(src.heads(cur[r[2]]))
        levels.insert(0, {t: torch.unique(torch.cat(v)) for t, v in sorted(parts.items())})
    return levels


def positions(rows: Mapping[str, Tensor], num_nodes: Mapping[str, int]) -> dict[str, Tensor]:
    """``{type: [N_t] position of each global id in rows[type], -1 if absent}``."""
    out = {}
    for t, ids in rows.items():
        pos = torch.full((num_nodes[t],), -1, dtype=torch.long)
        pos[ids] = torch.arange(ids.numel())
        out[t] = pos
    return out


def layer_chunks(slots: Tensor, budget: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of rows whose ``slots`` (each row's gathered rows) sum to
    at most ``budget`` (a row above it gets a chunk of its own)."""
    ends = torch.cumsum(slots, 0)
    out, start = [], 0
    while start < slots.numel():
        base = int(ends[start - 1]) if start else 0
        end = max(start + 1, int(torch.searchsorted(ends, base + budget, right=True)))
        out.append((start, end))
        start = end
    return out


def chunk_inputs(
    layer: Mapping[Relation, TableNeighbours | CsrNeighbours],
    tail: str,
    rows: Tensor,
    states: Mapping[str, Tensor],
    pos: Mapping[str, Tensor],
    scratch: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], TypedBlock]:
    """One chunk's source rows per type and its block (destinations ``rows`` of ``tail``).

    Returns:
        ``(h, block)``: ``h[s]`` [n_s, F] state rows of the chunk's sources of type ``s``
        (for ``s == tail``, ``rows`` first); ``block`` with ``num_dst = {tail: len(rows)}``.
    """
    rels = [r for r in sorted(layer) if r[2] == tail]
    block = TypedBlock(num_dst={tail: int(rows.numel())})
    h: dict[str, Tensor] = {}
    for head in sorted({r[0] for r in rels} | {tail}):
        loc = scratch[head]
        cur = rows if head == tail else rows.new_zeros(0)
        loc[cur] = torch.arange(cur.numel())
        mine = [r for r in rels if r[0] == head]
        cand = torch.cat([layer[r].heads(rows) for r in mine]) if mine else cur
        new = torch.unique(cand[loc[cand] < 0])
        loc[new] = torch.arange(cur.numel(), cur.numel() + new.numel())
        ids = torch.cat([cur, new])
        for r in mine:
            block.rel_ops[r] = layer[r].operand(rows, loc, int(ids.numel()))
        h[head] = states[head][pos[head][ids]]
        loc[ids] = -1
    return h, block


@torch.no_grad()
def layerwise_logits(student: TypedGNN, data: TypedGraph, sources: Sources, ids: Tensor) -> Tensor:
    """[len(ids), C] logits of ``student`` at target ids ``ids`` (module docstring).

    Args:
        student: Typed student (eval mode).
        data: The typed graph (features of featured types).
        sources: One ``{relation: neighbours}`` per layer (:func:`table_sources`,
            :func:`exact_sources`).
        ids: [n] target-type global ids (any order, repeats allowed).
    """
    levels = needed_rows(sources, student.target, ids)
    num_nodes = {t: int(n) for t, n in student.schema["num_nodes"].items()}
    scratch = {t: torch.full((n,), -1, dtype=torch.long) for t, n in num_nodes.items()}
    states = student.embed(student.inputs(data, levels[0]))
    for index, layer in enumerate(sources):
        pos = positions(levels[index], num_nodes)
        module = student.layers[index]
        out: dict[str, Tensor] = {}
        for tail, rows in levels[index + 1].items():
            rels = [r for r in layer if r[2] == tail]
            slots = 1 + sum((layer[r].slots(rows) for r in rels), torch.zeros_like(rows))
            width = max(states[r[0]].size(1) for r in rels) if rels else states[tail].size(1)
            for a, b in layer_chunks(slots, max(1, CHUNK_ELEMENTS // width)):
                h, block = chunk_inputs(layer, tail, rows[a:b], states, pos, scratch)
                part = module(h, block, [tail])[tail]
                if tail not in out:  # written in place: no second copy of the level
                    out[tail] = part.new_empty((rows.numel(), part.size(1)))
                out[tail][a:b] = F.relu(part) if index < student.num_layers - 1 else part
        states = out
    final = levels[-1][student.target]
    return states[student.target][torch.searchsorted(final, ids)].float()
