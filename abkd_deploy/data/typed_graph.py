"""Typed (heterogeneous) graphs: node types, relations and one labelled target type.

A :class:`TypedGraph` is what typed loaders (``ogbn-mag``, ``ogb-hetero:<dir>``,
``csbm-mag``) return from :func:`abkd_deploy.data.load_dataset`. Conventions:

* node types are names (``paper``); a relation is a triple ``(head, rel, tail)`` whose
  ``edge_index`` ([2, E] int64) holds head ids in row 0 and tail ids in row 1: messages
  flow head -> tail, so a tail node aggregates over its head neighbours;
* ``x_dict[t]`` is a float32 [N_t, F_t] feature matrix, or ``None`` for a featureless type
  (models give those a learned embedding table);
* labels and splits live on the target type only: ``y`` ([N_target] int64, ``-1`` for
  unlabelled nodes) and boolean ``train_mask`` / ``val_mask`` / ``test_mask``
  ([N_target]); ``num_classes``, ``metric`` and ``name`` as for homogeneous datasets;
* loaders add reverse relations (``(tail, "rev_" + rel, head)``) and symmetrise relations
  whose head and tail types are equal (paper-cites-paper), as OGB's and G-CRD's ogbn-mag
  code does; :attr:`TypedGraph.reverse_of` remembers which relations were added.

Names must be non-empty, use only letters, digits, ``_`` and ``-``, and not contain
``__``: flat export names join them with ``__`` (``nbr__paper__cites__paper__l0``).

A typed graph refuses the homogeneous attributes (``x``, ``edge_index``, ``num_nodes``,
``num_features``) with a one-line :class:`ConfigError`, so feeding it to a homogeneous
architecture fails clearly instead of deep inside torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from abkd_deploy.errors import ConfigError, DatasetError

Relation = tuple[str, str, str]

#: Attributes of a homogeneous ``Data`` that a typed graph does not have.
HOMOGENEOUS_ATTRIBUTES = frozenset(
    {"x", "edge_index", "edge_weight", "num_nodes", "num_edges", "num_features"}
)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def relation_key(rel: Relation) -> str:
    """``("author", "writes", "paper")`` -> ``"author__writes__paper"`` (module / input names)."""
    return "__".join(rel)


def reverse_name(rel: str) -> str:
    """Name of the relation added in the reverse direction (``writes`` -> ``rev_writes``)."""
    return f"rev_{rel}"


def check_name(name: str, what: str) -> str:
    """Returns ``name`` or raises :class:`DatasetError` when it cannot be used in export names."""
    if not isinstance(name, str) or not _NAME.match(name) or "__" in name:
        raise DatasetError(
            f"{what} name {name!r} is not usable; expected letters, digits, '_' or '-' without '__'"
        )
    return name


@dataclass(eq=False)
class TypedGraph:
    """A typed graph with one labelled target node type (see module docstring).

    Attributes:
        num_nodes_dict: N_t per node type.
        x_dict: [N_t, F_t] float32 features, or ``None`` (featureless) per node type.
        edge_index_dict: [2, E_r] int64 (head ids, tail ids) per relation.
        target: The labelled node type.
        y: [N_target] int64 labels, -1 where unknown.
        train_mask, val_mask, test_mask: [N_target] bool.
        num_classes: C.
        metric: ``accuracy`` or ``roc_auc``.
        name: Dataset name as given to ``load_dataset``.
        reverse_of: Added reverse relation -> the relation it reverses.
        homogeneous_view: Name of a dataset holding this graph's homogeneous target-type
            view (``ogbn-mag-papers``), quoted in the error for homogeneous models.
        ogb_name: OGB dataset name, for :func:`abkd_deploy.data.ogb.ogb_evaluate`.
    """

    num_nodes_dict: dict[str, int]
    x_dict: dict[str, Tensor | None]
    edge_index_dict: dict[Relation, Tensor]
    target: str
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    metric: str = "accuracy"
    name: str = ""
    reverse_of: dict[Relation, Relation] = field(default_factory=dict)
    homogeneous_view: str | None = None
    ogb_name: str | None = None

    #: Marks typed datasets without importing this module (``getattr(d, "is_typed", False)``).
    is_typed: ClassVar[bool] = True

    def __getattr__(self, key: str) -> Any:
        # Only called for attributes a dataclass instance does not have.
        if key in HOMOGENEOUS_ATTRIBUTES:
            hint = (
                f", or --dataset {self.homogeneous_view} for the homogeneous "
                f"{self.target}-only view"
                if self.homogeneous_view
                else ""
            )
            raise ConfigError(
                f"{self.name or 'this dataset'} is a typed graph (node types "
                f"{', '.join(self.node_types)}; target {self.target}): homogeneous "
                "architectures cannot use it; use a typed architecture (rgcn, rsage, "
                f"res-rgcn){hint}"
            )
        raise AttributeError(key)

    # -- schema ---------------------------------------------------------------------
    @property
    def node_types(self) -> list[str]:
        """Node types, sorted."""
        return sorted(self.num_nodes_dict)

    @property
    def relations(self) -> list[Relation]:
        """Relations, sorted."""
        return sorted(self.edge_index_dict)

    @property
    def num_features_dict(self) -> dict[str, int]:
        """F_t per node type (0 for featureless types)."""
        return {
            t: 0 if self.x_dict.get(t) is None else int(self.x_dict[t].size(1))
            for t in self.node_types
        }

    @property
    def featureless_types(self) -> list[str]:
        return [t for t in self.node_types if self.x_dict.get(t) is None]

    @property
    def num_target_nodes(self) -> int:
        return int(self.num_nodes_dict[self.target])

    @property
    def total_nodes(self) -> int:
        return sum(int(n) for n in self.num_nodes_dict.values())

    @property
    def total_edges(self) -> int:
        return sum(int(e.size(1)) for e in self.edge_index_dict.values())

    def schema(self) -> dict[str, Any]:
        """JSON-able schema: what typed models are built from and manifests record.

        Returns:
            ``{"node_types": [...], "target": str, "relations": [[h, r, t], ...],
            "num_nodes": {t: N_t}, "num_features": {t: F_t or 0},
            "reverse_of": {"h__r__t": [h, r, t]}}``.
        """
        return {
            "node_types": self.node_types,
            "target": self.target,
            "relations": [list(r) for r in self.relations],
            "num_nodes": {t: int(self.num_nodes_dict[t]) for t in self.node_types},
            "num_features": self.num_features_dict,
            "reverse_of": {relation_key(r): list(o) for r, o in sorted(self.reverse_of.items())},
        }

    def __repr__(self) -> str:
        nodes = ", ".join(f"{t}={self.num_nodes_dict[t]}" for t in self.node_types)
        rels = ", ".join(
            f"{relation_key(r)}={e.size(1)}" for r, e in sorted(self.edge_index_dict.items())
        )
        return (
            f"TypedGraph(name={self.name!r}, target={self.target!r}, nodes[{nodes}], edges[{rels}])"
        )

    # -- validation -----------------------------------------------------------------
    def check(self) -> None:
        """Checks the contract of the module docstring; converts features to float32.

        Raises:
            DatasetError: naming the first violation.
        """
        if not self.num_nodes_dict:
            raise DatasetError("a typed graph needs at least one node type")
        for t, n in self.num_nodes_dict.items():
            check_name(t, "node type")
            if int(n) < 1:
                raise DatasetError(f"node type {t!r} has {n} nodes; expected >= 1")
            x = self.x_dict.get(t)
            if x is not None:
                if not isinstance(x, Tensor) or x.dim() != 2 or x.size(0) != n:
                    raise DatasetError(f"features of {t!r} must be a [{n}, F] tensor")
                if x.dtype != torch.float32:
                    self.x_dict[t] = x.float()
        for t in self.x_dict:
            if t not in self.num_nodes_dict:
                raise DatasetError(f"features given for unknown node type {t!r}")
        for rel, ei in self.edge_index_dict.items():
            self._check_relation(rel, ei)
        if self.target not in self.num_nodes_dict:
            raise DatasetError(
                f"target type {self.target!r} is not a node type ({', '.join(self.node_types)})"
            )
        n = self.num_target_nodes
        if int(self.num_classes or 0) < 2:
            raise DatasetError("num_classes must be >= 2")
        if self.y.dim() != 1 or self.y.size(0) != n:
            raise DatasetError(f"y must be a [{n}] tensor (target {self.target!r})")
        if self.y.dtype != torch.long:
            self.y = self.y.long()
        if n and (int(self.y.min()) < -1 or int(self.y.max()) >= self.num_classes):
            raise DatasetError(f"labels must lie in [-1, {self.num_classes}) (-1 = unlabelled)")
        for key in ("train_mask", "val_mask", "test_mask"):
            mask = getattr(self, key)
            if (
                not isinstance(mask, Tensor)
                or mask.dtype != torch.bool
                or tuple(mask.shape) != (n,)
            ):
                raise DatasetError(f"{key} must be a boolean [{n}] tensor")
            if not bool(mask.any()):
                raise DatasetError(f"{key} selects no {self.target} node")
            if bool((self.y[mask] < 0).any()):
                raise DatasetError(f"{key} selects {self.target} nodes without a label (-1)")
        if self.metric not in ("accuracy", "roc_auc"):
            raise DatasetError(f"metric must be accuracy or roc_auc, got {self.metric!r}")

    def _check_relation(self, rel: Relation, ei: Tensor) -> None:
        if not (isinstance(rel, tuple) and len(rel) == 3):
            raise DatasetError(f"relation {rel!r} must be a (head, rel, tail) triple")
        head, name, tail = rel
        check_name(name, "relation")
        for t in (head, tail):
            if t not in self.num_nodes_dict:
                raise DatasetError(f"relation {relation_key(rel)} uses unknown node type {t!r}")
        if not isinstance(ei, Tensor) or ei.dim() != 2 or ei.size(0) != 2 or ei.dtype != torch.long:
            raise DatasetError(f"edge_index of {relation_key(rel)} must be int64 [2, E]")
        for row, t in ((0, head), (1, tail)):
            if ei.size(1) and (
                int(ei[row].min()) < 0 or int(ei[row].max()) >= self.num_nodes_dict[t]
            ):
                n = self.num_nodes_dict[t]
                raise DatasetError(f"relation {relation_key(rel)} holds {t} ids outside [0, {n})")

    # -- transforms -----------------------------------------------------------------
    def with_reverse_relations(self) -> TypedGraph:
        """Adds ``(t, rev_r, h)`` for every ``(h, r, t)`` with ``h != t`` and symmetrises
        (and de-duplicates) relations with ``h == t``. Idempotent.

        Returns:
            A new graph sharing the feature and label tensors.
        """
        edges: dict[Relation, Tensor] = {}
        reverse_of = dict(self.reverse_of)
        for rel, ei in self.edge_index_dict.items():
            head, name, tail = rel
            if head == tail:
                edges[rel] = unique_edges(torch.cat([ei, ei.flip(0)], 1))
            else:
                edges[rel] = ei
        for rel, ei in self.edge_index_dict.items():
            head, name, tail = rel
            rev = (tail, reverse_name(name), head)
            if head == tail or rel in reverse_of or rev in self.edge_index_dict:
                continue
            edges[rev] = ei.flip(0).contiguous()
            reverse_of[rev] = rel
        return replace(self, edge_index_dict=edges, reverse_of=reverse_of)

    def base_relations(self) -> list[Relation]:
        """Relations that were not added as a reverse (what a writer stores)."""
        return [r for r in self.relations if r not in self.reverse_of]

    def target_view(self) -> Any:
        """The homogeneous view of the target type: its features and the relations whose
        head and tail are both the target type (symmetrised, no self loops).

        Returns:
            A contract ``torch_geometric.data.Data`` (see ``load_dataset``).

        Raises:
            ConfigError: the target type is featureless.
        """
        from torch_geometric.data import Data

        from abkd_deploy.data.pyg_datasets import clean_edges

        x = self.x_dict.get(self.target)
        if x is None:
            raise ConfigError(f"target type {self.target!r} is featureless: no homogeneous view")
        n = self.num_target_nodes
        parts = [e for (h, _, t), e in self.edge_index_dict.items() if h == t == self.target]
        ei = torch.cat(parts, 1) if parts else torch.zeros(2, 0, dtype=torch.long)
        data = Data(x=x, edge_index=clean_edges(ei, n), y=self.y.clone())
        data.train_mask, data.val_mask, data.test_mask = (
            self.train_mask,
            self.val_mask,
            self.test_mask,
        )
        data.num_classes, data.metric = int(self.num_classes), self.metric
        if self.ogb_name:
            data.ogb_name = self.ogb_name
        return data

    def to_hetero_data(self) -> Any:
        """PyG ``HeteroData`` with the same tensors (target labels/masks on the target type)."""
        from torch_geometric.data import HeteroData

        data = HeteroData()
        for t in self.node_types:
            data[t].num_nodes = int(self.num_nodes_dict[t])
            if self.x_dict.get(t) is not None:
                data[t].x = self.x_dict[t]
        for rel in self.relations:
            data[rel].edge_index = self.edge_index_dict[rel]
        tgt = data[self.target]
        tgt.y, tgt.train_mask, tgt.val_mask, tgt.test_mask = (
            self.y,
            self.train_mask,
            self.val_mask,
            self.test_mask,
        )
        return data


def unique_edges(edge_index: Tensor) -> Tensor:
    """Sorts [2, E] edges by (tail, head) and drops duplicates."""
    if edge_index.size(1) == 0:
        return edge_index
    width = int(edge_index[0].max()) + 1
    key = torch.unique(edge_index[1] * width + edge_index[0])
    return torch.stack([key % width, key // width])


def is_typed(data: Any) -> bool:
    """Whether ``data`` is a typed graph (without importing anything)."""
    return bool(getattr(data, "is_typed", False))
