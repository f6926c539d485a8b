"""``graph.npz``: the graph a live export was built on, kept for ``refresh``.

An ``embedded`` ONNX export that answers new nodes (``gcn``/``sage``) also stores the
graph it embeds, so that :mod:`abkd_deploy.export.refresh` can apply a delta without the
original dataset: the in-neighbour lists (``rowptr``, ``col``), the fanout tables
(``nbr_0`` .. ``nbr_{L-1}``, the rows the artifacts' tables were built from), the seed
of each table, whether the edges are symmetric, and the scored test nodes with their
labels (so a refreshed export reports its accuracy too). The features and the layer
states live in ``new_nodes.onnx`` (``state_0`` .. ``state_{L-1}``) and are not
duplicated. Read with ``allow_pickle=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.utils import is_undirected

from abkd_deploy.data.csr import CSR
from abkd_deploy.errors import ExportError
from abkd_deploy.export.adjacency import ExportContext
from abkd_deploy.export.onnx_tables import initializer_tables

#: File name inside the export directory.
LIVE_GRAPH_FILE = "graph.npz"


@dataclass
class LiveGraph:
    """What ``graph.npz`` holds (see the module docstring).

    Attributes:
        csr: In-neighbour lists.
        tables: Per layer, [N, K_l] int64 neighbour ids of the fanout table.
        table_seeds: Per layer, the seed the table was drawn with.
        undirected: Whether the edges are symmetric (a delta is symmetrised then).
        eval_ids: [n] int64 scored test nodes.
        eval_labels: [n] their labels.
    """

    csr: CSR
    tables: list[Tensor]
    table_seeds: list[int]
    undirected: bool
    eval_ids: Tensor
    eval_labels: np.ndarray

    @classmethod
    def from_context(cls, ctx: ExportContext) -> LiveGraph:
        """The graph of an export being written."""
        data = ctx.data
        return cls(
            csr=ctx.csr,
            tables=[t.nbr for t in ctx.tables],
            table_seeds=[ctx.sampler.layer_seed(layer) for layer in range(len(ctx.tables))],
            undirected=bool(is_undirected(data.edge_index, num_nodes=data.num_nodes)),
            eval_ids=ctx.eval_ids,
            eval_labels=data.y[ctx.eval_ids].numpy(),
        )

    def save(self, path: Path) -> None:
        """Writes ``graph.npz`` (ids as int32 when they fit)."""
        small = self.csr.num_nodes < 2**31 - 1
        ids = np.int32 if small else np.int64
        arrays = {
            "rowptr": self.csr.rowptr.numpy(),
            "col": self.csr.col.numpy().astype(ids),
            "table_seeds": np.asarray(self.table_seeds, dtype=np.int64),
            "undirected": np.asarray(self.undirected),
            "eval_ids": self.eval_ids.numpy(),
            "eval_labels": np.asarray(self.eval_labels),
        }
        for layer, nbr in enumerate(self.tables):
            arrays[f"nbr_{layer}"] = nbr.numpy().astype(ids)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path, num_layers: int) -> LiveGraph:
        """Reads ``graph.npz``.

        Raises:
            ExportError: the file is missing or lacks an array.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                rowptr = torch.from_numpy(z["rowptr"].astype(np.int64))
                col = torch.from_numpy(z["col"].astype(np.int64))
                tables = [
                    torch.from_numpy(z[f"nbr_{i}"].astype(np.int64)) for i in range(num_layers)
                ]
                seeds = [int(s) for s in z["table_seeds"]]
                undirected = bool(z["undirected"])
                ids = torch.from_numpy(z["eval_ids"].astype(np.int64))
                labels = z["eval_labels"]
        except FileNotFoundError:
            raise ExportError(
                f"{path} is missing: the export keeps no graph to refresh (exports written "
                "before refresh existed, or not an embedded gcn/sage ONNX export); re-export"
            ) from None
        except (KeyError, OSError, ValueError) as exc:
            raise ExportError(f"{path} is not a readable live graph: {exc}") from None
        csr = CSR(rowptr, col, rowptr.numel() - 1)
        return cls(csr, tables, seeds, undirected, ids, labels)


def write_live_graph(
    ctx: ExportContext, tmp: Path, model: Path, module: nn.Module
) -> tuple[dict[str, object], list[str]]:
    """Writes ``graph.npz`` into the staging folder; returns the manifest entry and files.

    ``model`` / ``module``: the main ONNX file and the module it was exported from; the
    entry records which of its initializers hold which per-node table
    (:func:`~.onnx_tables.initializer_tables`).
    """
    graph = LiveGraph.from_context(ctx)
    graph.save(tmp / LIVE_GRAPH_FILE)
    entry = {
        "file": LIVE_GRAPH_FILE,
        "undirected": graph.undirected,
        "table_seeds": graph.table_seeds,
        "tables": initializer_tables(model, module, ctx.data.num_nodes),
    }
    return entry, [LIVE_GRAPH_FILE]
