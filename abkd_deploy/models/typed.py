"""Base class of typed-graph GNNs (``rgcn``, ``rsage``) and parameter-count helpers.

A typed model is built from a typed graph's schema (:meth:`TypedGraph.schema`): node
types, relations, target type, feature width per type (0 = featureless) and node counts.
Featureless types get a learned embedding table (``emb_dim`` wide, default 128, as in
OGB's / G-CRD's ogbn-mag R-GCN). Inputs are a dict per node type: float features
``[n_t, F_t]`` for featured types, int64 node ids ``[n_t]`` (rows of the embedding table)
for featureless ones; :meth:`TypedGNN.inputs` builds it from a graph and, for a sampled
batch, its ``n_id``. The graph operand is a
:class:`~abkd_deploy.data.typed_blocks.TypedBlock` (reused by every layer) or a list of
them, one per layer (sampled batches). ``forward`` returns the target type's logits and
its per-layer representations, like every :class:`~abkd_deploy.models.base.GNN`.

Every layer has maps for every node type and relation (the last layer too, as OGB's
code does; the ABKD paper's 5.5M / 170K parameter counts include them), but only
computes the node types the target's receptive field needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_deploy.data.typed_graph import Relation, relation_key
from abkd_deploy.errors import ConfigError
from abkd_deploy.models.base import GNN


def normalise_schema(schema: Mapping[str, Any] | None, arch: str) -> dict[str, Any]:
    """Checks a schema dict and returns a copy with sorted lists (JSON-able)."""
    if schema is None:
        raise ConfigError(
            f"{arch} is a typed-graph architecture: it needs a typed dataset (ogbn-mag, "
            "csbm-mag, ogb-hetero:DIR); from Python, pass schema=graph.schema()"
        )
    try:
        types = sorted(str(t) for t in schema["node_types"])
        rels = sorted(tuple(str(p) for p in r) for r in schema["relations"])
        target = str(schema["target"])
        feats = {t: int(schema["num_features"].get(t, 0)) for t in types}
        nodes = {t: int(schema["num_nodes"][t]) for t in types}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{arch}: malformed schema ({type(e).__name__}: {e})") from None
    if target not in types:
        raise ConfigError(f"{arch}: target {target!r} is not a node type ({', '.join(types)})")
    for r in rels:
        if len(r) != 3 or r[0] not in types or r[2] not in types:
            raise ConfigError(f"{arch}: relation {r!r} does not join known node types")
    return {
        "node_types": types,
        "target": target,
        "relations": [list(r) for r in rels],
        "num_nodes": nodes,
        "num_features": feats,
        "reverse_of": dict(schema.get("reverse_of", {})),
    }


def receptive_types(relations: list[Relation], target: str, num_layers: int) -> list[set[str]]:
    """Node types each layer must output so that the last layer can output ``target``."""
    needed = [{target}]
    for _ in range(num_layers - 1):
        cur = needed[0]
        needed.insert(0, cur | {r[0] for r in relations if r[2] in cur})
    return needed


class TypedGNN(GNN):
    """A GNN over a typed graph (module docstring).

    Args:
        in_channels: Ignored (derived from ``schema``; accepted so ``config`` round-trips).
        hidden: Hidden width of every node type.
        out_channels: Number of classes C.
        num_layers: L >= 1.
        dropout: Dropout on each layer's input.
        schema: :meth:`TypedGraph.schema` of the graph the model runs on.
        emb_dim: Width of the embedding tables of featureless types.
    """

    typed: ClassVar[bool] = True
    norm: ClassVar[str] = "mean"

    def __init__(
        self,
        in_channels: int | None = None,
        hidden: int = 64,
        out_channels: int = 2,
        num_layers: int = 2,
        dropout: float = 0.5,
        *,
        schema: Mapping[str, Any] | None = None,
        emb_dim: int = 128,
    ) -> None:
        schema = normalise_schema(schema, self.arch)
        if int(emb_dim) < 1:
            raise ConfigError(f"{self.arch}: emb_dim={emb_dim}; expected >= 1")
        widths = {t: f or int(emb_dim) for t, f in schema["num_features"].items()}
        super().__init__(max(widths.values()), hidden, out_channels, num_layers, dropout)
        self.schema, self.emb_dim = schema, int(emb_dim)
        self.target: str = schema["target"]
        self.node_types: list[str] = schema["node_types"]
        self.relations: list[Relation] = [tuple(r) for r in schema["relations"]]  # type: ignore[misc]
        self.embeddings = nn.ModuleDict(
            {
                t: nn.Embedding(schema["num_nodes"][t], self.emb_dim)
                for t in self.node_types
                if schema["num_features"][t] == 0
            }
        )
        for emb in self.embeddings.values():
            nn.init.xavier_uniform_(emb.weight)
        self._needed = receptive_types(self.relations, self.target, self.num_layers)
        dims = [widths] + [{t: self.hidden for t in self.node_types}] * (self.num_layers - 1)
        self.layers = nn.ModuleList(
            self.build_layer(i, d, self.out_channels if i == self.num_layers - 1 else self.hidden)
            for i, d in enumerate(dims)
        )

    def build_layer(self, index: int, in_dims: dict[str, int], out_channels: int) -> nn.Module:
        raise NotImplementedError

    def extra_config(self) -> dict[str, Any]:
        return {"schema": self.schema, "emb_dim": self.emb_dim}

    def inputs(
        self, graph: Any, n_id: Mapping[str, Tensor] | None = None, device: Any = None
    ) -> dict[str, Tensor]:
        """Model inputs for ``graph`` (a TypedGraph): all nodes, or the rows ``n_id``.

        Returns:
            ``{type: [n_t, F_t] float features | [n_t] int64 ids (featureless types)}``.
        """
        out: dict[str, Tensor] = {}
        for t in self.node_types:
            if n_id is not None and t not in n_id:
                continue
            ids = None if n_id is None else n_id[t]
            if t in self.embeddings:
                n = self.schema["num_nodes"][t]
                out[t] = torch.arange(n) if ids is None else ids
            else:
                x = graph.x_dict[t]
                out[t] = x if ids is None else x[ids.to(x.device)]
        if device is not None:
            out = {t: v.to(device) for t, v in out.items()}
        return out

    def embed(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Layer-1 input rows: features as given, embedding rows for featureless types."""
        return {t: self.embeddings[t](v) if t in self.embeddings else v for t, v in inputs.items()}

    def forward(self, inputs: Mapping[str, Tensor], graph: Any) -> tuple[Tensor, list[Tensor]]:
        """Runs the model.

        Args:
            inputs: See :meth:`inputs`.
            graph: A ``TypedBlock`` for every layer, or a list of ``num_layers`` blocks.

        Returns:
            ``(logits [n_L, C], hiddens)``: ``hiddens[l]`` is layer ``l``'s target-type
            output ([n_l, d_l], after the activation; the last is the logits).
        """
        h = self.embed(inputs)
        hiddens: list[Tensor] = []
        first: dict[str, Tensor] = {}
        for i, (layer, block) in enumerate(zip(self.layers, self.operands(graph), strict=True)):
            h = {t: F.dropout(v, self.dropout, self.training) for t, v in h.items()}
            dst = [t for t in self.node_types if t in self._needed[i] and t in block.num_dst]
            h = layer(h, block, dst)
            if i < self.num_layers - 1:
                h = {t: F.relu(v) for t, v in h.items()}
            h = self.combine(i, after=h, first=first)
            if i == 0:
                first = h
            hiddens.append(h[self.target])
        return h[self.target], hiddens

    def combine(
        self, index: int, after: dict[str, Tensor], first: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Layer ``index``'s output from its activated result ``after``
        (``{t: [num_dst_t, d]}``) and layer 0's output ``first`` (empty at layer 0), whose
        rows start with each later layer's destination rows. Plain stacks return ``after``."""
        return after


def apply_before_gather(op: Any, h: Tensor, weight: Tensor) -> Tensor:
    """``mean_u W h_u`` for a bias-free map ``weight`` [out, in]; W is applied before the
    gather when it narrows the width (less to gather), after it otherwise (fewer rows)."""
    if weight.size(0) < weight.size(1):
        return op.neighbors(h @ weight.t())
    return op.neighbors(h) @ weight.t()


def key(rel: Relation) -> str:
    return relation_key(rel)


def count_embedding_parameters(model: nn.Module) -> int:
    """Parameters held in ``nn.Embedding`` tables (featureless-type embeddings)."""
    return sum(
        p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    )


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"params": all, "params_without_embeddings": all minus embedding tables}``.

    The ABKD paper's ogbn-mag ratio (5.5M / 170K = 32.3x) counts without the tables.
    """
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "params_without_embeddings": total - count_embedding_parameters(model)}
