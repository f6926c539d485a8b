"""What training and distillation need from a dataset, homogeneous or typed.

A :class:`GraphView` hides the difference between a homogeneous ``Data`` and a
:class:`~abkd_deploy.data.typed_graph.TypedGraph` from the trainer. Rows are always the
*target* nodes (every node of a homogeneous graph; the labelled type of a typed one), so
``data.y``, the split masks and every KD term see the same ``[n, ...]`` layout:

* :meth:`GraphView.full` -- model inputs and the whole-graph operand (a ``FullGraph``, or
  a :class:`~abkd_deploy.data.typed_blocks.TypedBlock` with one sparse operand per
  relation);
* :meth:`GraphView.target_edges` -- ``[2, E]`` edges among the target rows, what ``lsp``
  compares. For a typed graph these are the relations whose head and tail are both the
  target type (ogbn-mag: paper-cites-paper, symmetrised by the loader), i.e. LSP runs on
  the target type's homogeneous view; other terms only read target-type representations;
* :meth:`GraphView.sampler` / :meth:`GraphView.batch` -- fixed-fanout mini-batches
  (``NeighborSampler`` or ``TypedNeighborSampler``): inputs, per-layer blocks, the global
  ids of the batch's targets and the edges among them (from the last layer's sampled
  tables, as the homogeneous sampler does).

:func:`build_for_data` builds an architecture for a dataset and refuses a typed dataset
given to a homogeneous architecture (and vice versa) with one line.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.data.typed_blocks import TypedBlock
from abkd_deploy.data.typed_graph import is_typed
from abkd_deploy.data.typed_sampler import TypedNeighborSampler
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.models import GNN, MODELS, build_model

#: Schema entries a typed teacher checkpoint must share with the dataset.
SCHEMA_KEYS = ("node_types", "target", "relations", "num_nodes", "num_features")


def arch_is_typed(arch: str) -> bool:
    """Whether the registered architecture ``arch`` runs on typed graphs."""
    return bool(getattr(MODELS.get(arch), "typed", False))


def check_arch_for_data(arch: str, data: Any, dataset: str, role: str = "model") -> None:
    """Raises a one-line :class:`ConfigError` when ``arch`` cannot run on ``data``.

    Args:
        arch: Architecture name.
        data: What :func:`abkd_deploy.data.load_dataset` returned.
        dataset: The dataset name, for the message.
        role: ``teacher``, ``student`` or ``model``, for the message.
    """
    typed_arch, typed_data = arch_is_typed(arch), is_typed(data)
    if typed_arch and not typed_data:
        raise ConfigError(
            f"{role} architecture {arch!r} is for typed graphs, but dataset {dataset!r} is "
            "homogeneous; use gcn, sage, gat, gcnii or mlp, or a typed dataset (csbm-mag, "
            "ogbn-mag, ogb-hetero:DIR)"
        )
    if typed_data and not typed_arch:
        view = getattr(data, "homogeneous_view", None)
        hint = f", or --dataset {view} for its {data.target}-only view" if view else ""
        raise ConfigError(
            f"{role} architecture {arch!r} is homogeneous, but dataset {dataset!r} is a typed "
            f"graph (target {data.target}); use a typed architecture (rgcn, rsage, res-rgcn){hint}"
        )


def build_for_data(
    arch: str,
    data: Any,
    dataset: str,
    *,
    hidden: int,
    num_layers: int,
    dropout: float,
    role: str = "model",
) -> GNN:
    """Builds ``arch`` for ``data`` (feature width or typed schema, classes).

    Raises:
        ConfigError: ``arch`` and ``data`` do not fit (:func:`check_arch_for_data`).
    """
    check_arch_for_data(arch, data, dataset, role)
    shape: dict[str, Any] = (
        {"schema": data.schema()} if is_typed(data) else {"in_channels": data.num_features}
    )
    return build_model(
        arch,
        hidden=hidden,
        out_channels=data.num_classes,
        num_layers=num_layers,
        dropout=dropout,
        **shape,
    )


def check_model_for_data(model: GNN, data: Any, dataset: str, source: str) -> None:
    """Checks a loaded checkpoint against ``data``.

    Args:
        source: What the model is, for the message (``"teacher in '/runs/t'"``).

    Raises:
        CheckpointError: The model was trained on a dataset of another shape.
    """
    typed_model = bool(getattr(model, "typed", False))
    if typed_model != is_typed(data):
        kinds = ("typed", "homogeneous") if typed_model else ("homogeneous", "typed")
        raise CheckpointError(
            f"{source} is a {kinds[0]} {model.arch} model, but dataset {dataset!r} is {kinds[1]}"
        )
    if typed_model:
        want = data.schema()
        diff = [k for k in SCHEMA_KEYS if model.schema[k] != want[k]]
        if diff or model.out_channels != data.num_classes:
            what = ", ".join(diff) if diff else "num_classes"
            raise CheckpointError(
                f"{source} ({model.arch}) was built for another typed graph than "
                f"dataset {dataset!r} (different {what})"
            )
        return
    if model.in_channels != data.num_features or model.out_channels != data.num_classes:
        raise CheckpointError(
            f"{source} expects {model.in_channels} features and "
            f"{model.out_channels} classes, but dataset {dataset!r} has "
            f"{data.num_features} features and {data.num_classes} classes"
        )


class GraphView:
    """Target-row view of a dataset on a device (module docstring).

    Args:
        data: A homogeneous ``Data`` or a ``TypedGraph``.
        device: Where inputs and operands live.
    """

    def __init__(self, data: Any, device: torch.device) -> None:
        self.data, self.device, self.typed = data, device, is_typed(data)
        self._operands: dict[str, Any] = {}
        if self.typed:
            self.num_targets = data.num_target_nodes
            self._features = SimpleNamespace(
                x_dict={t: None if x is None else x.to(device) for t, x in data.x_dict.items()}
            )
            self._inputs: dict[str, Tensor] | None = None
            self.csr = None
        else:
            self.num_targets = int(data.num_nodes)
            self.x = data.x.to(device)
            self.csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
        self._edges: Tensor | None = None

    def full(self, model: GNN) -> tuple[Any, Any]:
        """``(inputs, operand)`` for a whole-graph forward pass of ``model``."""
        if model.norm not in self._operands:
            if self.typed:
                op = TypedBlock.full_graph(self.data, model.norm).to(self.device)
            else:
                op = FullGraph(self.csr, model.norm).to(self.device)
            self._operands[model.norm] = op
        if not self.typed:
            return self.x, self._operands[model.norm]
        if self._inputs is None:  # identical for every model of the same schema
            self._inputs = model.inputs(self._features, device=self.device)
        return self._inputs, self._operands[model.norm]

    def target_edges(self) -> Tensor:
        """``[2, E]`` int64 edges ``src -> dst`` among the target rows, on the device."""
        if self._edges is None:
            if self.typed:
                t = self.data.target
                parts = [
                    ei for (h, _, tail), ei in self.data.edge_index_dict.items() if h == tail == t
                ]
                ei = torch.cat(parts, 1) if parts else torch.zeros(2, 0, dtype=torch.long)
                if len(parts) > 1:
                    ei = torch.unique(ei, dim=1)
                self._edges = ei.to(self.device)
            else:
                self._edges = self.data.edge_index.to(self.device)
        return self._edges

    def has_target_edges(self) -> bool:
        """Whether any relation joins two target nodes (what ``lsp`` needs)."""
        if not self.typed:
            return True
        t = self.data.target
        return any(h == tail == t for h, _, tail in self.data.edge_index_dict)

    def sampler(self, fanouts: list[int], norm: str, seed: int) -> Any:
        """A fixed-fanout sampler over the graph (one table per layer, and relation)."""
        if self.typed:
            return TypedNeighborSampler(self.data, fanouts, norm=norm, seed=seed)
        return NeighborSampler(self.csr, fanouts, norm, seed=seed)

    def batch(self, batch: Any, model: GNN) -> tuple[Any, list[Any], Tensor, Tensor]:
        """One sampled batch on the device.

        Returns:
            ``(inputs, blocks, targets [B] global target ids, edges [2, E'] among the B
            targets, local ids)``.
        """
        if not self.typed:
            n_id = batch.n_id.to(self.device)
            blocks = [b.to(self.device) for b in batch.blocks]
            return (
                self.x[n_id],
                blocks,
                n_id[: batch.batch_size],
                batch.target_edges().to(self.device),
            )
        batch.to(self.device)
        inputs = model.inputs(self._features, batch.n_id, device=self.device)
        targets = batch.n_id[self.data.target][: batch.batch_size]
        return inputs, batch.blocks, targets, typed_target_edges(batch)


def typed_target_edges(batch: Any) -> Tensor:
    """``[2, E']`` edges among a typed batch's targets (local ids ``< batch_size``), read
    from the last layer's sampled target-to-target relation tables (self loops and padding
    dropped; the union over such relations, duplicates kept)."""
    t, b = batch.target, batch.batch_size
    last = batch.blocks[-1]
    parts = []
    for (h, _, tail), op in last.rel_ops.items():
        if h == tail == t:
            nbr, w = op.nbr[:b], op.weight[:b]
            dst = torch.arange(nbr.size(0), device=nbr.device).unsqueeze(1).expand_as(nbr)
            keep = (nbr < b) & (w > 0) & (nbr != dst)
            parts.append(torch.stack([nbr[keep], dst[keep]]))
    if not parts:
        return torch.zeros(2, 0, dtype=torch.long, device=batch.n_id[t].device)
    return torch.cat(parts, 1)
