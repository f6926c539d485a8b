"""Which rows of an ``embedded`` export a graph delta can change (``refresh``).

Layer ``l``'s output for node ``w`` reads ``w``'s own input row, the input rows of the
valid slots of its table ``T_l[w]`` and the slots' weights (which, under ``gcn``
normalisation, depend on the neighbours' degrees). So with ``D_0`` the nodes whose
features changed, ``D_l`` is every node whose table row, weights or self weight changed
at layer ``l``, plus every node that is in ``D_{l-1}`` or has a valid slot in
``D_{l-1}``. Rows outside ``D_l`` keep their value exactly: recomputing only ``D_l``
equals a full recomputation (DESIGN.md section 9).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from abkd_deploy.data.csr import edge_weights
from abkd_deploy.data.ell import FanoutTable


def reads_source_degree(norm: str) -> bool:
    """Whether ``norm``'s slot weights depend on the neighbour's degree (``gcn``)."""
    one, two = torch.ones(1), torch.full((1,), 2.0)
    return not torch.equal(edge_weights(norm, one, one, one), edge_weights(norm, one, two, one))


def changed_rows(norm: str, old: FanoutTable, new: FanoutTable, changed: Tensor) -> Tensor:
    """[N] bool: rows of ``new`` whose slots, weights or self weight differ from ``old``
    (rows beyond ``old``'s, the new nodes, always).

    ``changed`` ([N] bool) marks the nodes whose neighbour list changed: only their rows,
    and under a norm that reads the neighbour's degree the rows that hold one of them,
    can differ, so only those are compared.
    """
    n_old = old.nbr.size(0)
    out = torch.zeros(new.nbr.size(0), dtype=torch.bool)
    out[n_old:] = True
    maybe = changed[:n_old]
    if reads_source_degree(norm):
        maybe = maybe | (changed[new.nbr[:n_old]] & new.mask[:n_old]).any(1)
    rows = torch.nonzero(maybe).flatten()
    w_old, sw_old = old.weights(norm, rows)
    w_new, sw_new = new.weights(norm, rows)
    same = (new.nbr[rows] == old.nbr[rows]).all(1) & (w_new == w_old).all(1)
    if sw_old is not None and sw_new is not None:
        same &= sw_new == sw_old
    out[rows] = ~same
    return out


def affected_rows(
    norm: str,
    old_tables: Sequence[FanoutTable],
    new_tables: Sequence[FanoutTable],
    updated: Tensor,
    changed: Tensor,
) -> list[Tensor]:
    """Per layer ``l = 1..L``, the sorted ids ``D_l`` of the rows to recompute.

    Args:
        norm: The student's aggregation normalisation.
        old_tables / new_tables: The fanout tables before / after the delta, layer 1 first.
        updated: [N] bool, nodes whose features changed (new nodes included).
        changed: [N] bool, nodes whose neighbour list changed (new nodes included).
    """
    dirty, rows = updated, []
    for old, new in zip(old_tables, new_tables, strict=True):
        reach = dirty | changed_rows(norm, old, new, changed) | (dirty[new.nbr] & new.mask).any(1)
        rows.append(torch.nonzero(reach).flatten())
        dirty = reach
    return rows
