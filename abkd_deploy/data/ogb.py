"""OGB node-property datasets (``ogbn-arxiv``, ``ogbn-products``, ``ogbn-mag``) read offline.

``--root`` holds OGB's own layout, as its zip files unpack, e.g.::

    ROOT/ogbn_arxiv/RELEASE_v1.txt
    ROOT/ogbn_arxiv/raw/{edge,node-feat,node-label,node_year,num-node-list,num-edge-list}.csv.gz
    ROOT/ogbn_arxiv/split/time/{train,valid,test}.csv.gz

Nothing is downloaded and OGB never gets to ask on stdin: the files are checked first
and a missing one raises :class:`DatasetError` naming it. OGB writes ``processed/`` next
to ``raw/``, so the dataset is built in a cache folder mirroring the raw files (see
:func:`abkd_deploy.data.pyg_datasets.build_in_cache`); the user's root is only read.

ogb 1.3.6 calls ``torch.load`` without ``weights_only``; with torch >= 2.6 that means
``weights_only=True``, which fails on PyG's storage classes. They are allow-listed with
``torch.serialization.safe_globals`` only while OGB loads its own processed file; the
safe unpickler stays on. Loading is refused where that default would be the full
unpickler (torch < 2.6, or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set), and PyG's own
``weights_only=False`` read of ``processed/pre_transform.pt`` is skipped
(:class:`~abkd_deploy.data.pyg_datasets.StrictCache`): see docs/SECURITY.md.

``ogbn-mag-papers`` is ogbn-mag's homogeneous paper subgraph (paper features,
paper-cites-paper edges, venue labels, the paper split); ``ogbn-mag`` itself is the full
typed graph (:mod:`abkd_deploy.data.ogb_hetero`). ``ogbn-proteins`` (112 binary tasks) is
known but refused with a :class:`ConfigError`: the toolkit trains single-label classifiers.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

from abkd_deploy.data.pyg_datasets import (
    StrictCache,
    build_in_cache,
    clean_edges,
    find_dataset_dir,
)
from abkd_deploy.data.registry import DATASETS, require_root
from abkd_deploy.errors import ConfigError, DatasetError

_SPLIT = ("train.csv.gz", "valid.csv.gz", "test.csv.gz")
_MAG_RELATIONS = (
    "author___affiliated_with___institution",
    "author___writes___paper",
    "paper___cites___paper",
    "paper___has_topic___field_of_study",
)

#: Files each dataset needs, relative to ``ROOT/<ogbn_name>`` (OGB's raw zip layout).
REQUIRED_FILES: dict[str, list[str]] = {
    "ogbn-arxiv": ["RELEASE_v1.txt"]
    + [
        f"raw/{f}.csv.gz"
        for f in ("edge", "node-feat", "node-label", "node_year", "num-node-list", "num-edge-list")
    ]
    + [f"split/time/{f}" for f in _SPLIT],
    "ogbn-products": ["RELEASE_v1.txt"]
    + [
        f"raw/{f}.csv.gz"
        for f in ("edge", "node-feat", "node-label", "num-node-list", "num-edge-list")
    ]
    + [f"split/sales_ranking/{f}" for f in _SPLIT],
    "ogbn-mag": [
        "RELEASE_v2.txt",
        "raw/num-node-dict.csv.gz",
        "raw/triplet-type-list.csv.gz",
        "raw/nodetype-has-label.csv.gz",
        "raw/node-feat/paper/node-feat.csv.gz",
        "raw/node-feat/paper/node_year.csv.gz",
        "raw/node-label/paper/node-label.csv.gz",
    ]
    + [
        f"raw/relations/{r}/{f}"
        for r in _MAG_RELATIONS
        for f in ("edge.csv.gz", "num-edge-list.csv.gz")
    ]
    + ["split/time/nodetype-has-split.csv.gz"]
    + [f"split/time/paper/{f}" for f in _SPLIT],
}


def _safe_globals() -> list[type]:
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    # What OGB's collated ``Data`` pickles hold beyond what PyG allow-lists itself.
    return [DataEdgeAttr, DataTensorAttr, GlobalStorage]


def _register(name: str, ogb_name: str | None = None) -> None:
    @DATASETS.register(name)
    def load(
        arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
    ) -> Data:
        return load_ogb(ogb_name or name, root, split)


def load_ogb(name: str, root: Path | None, split: str | None = None) -> Data:
    """Loads an OGB node-property dataset from ``root`` without network access.

    Args:
        name: ``ogbn-arxiv``, ``ogbn-products`` or ``ogbn-mag``.
        root: Folder holding ``<name with _>/`` in OGB's raw layout.
        split: Only the official split exists: ``None`` or ``"0"``.

    Returns:
        A contract ``Data`` (see :func:`abkd_deploy.data.registry.load_dataset`) with
        ``ogb_name`` set, for :func:`ogb_evaluate`.
    """
    if name == "ogbn-proteins":
        raise ConfigError(
            "ogbn-proteins is a multi-label task (112 binary labels); multi-label training "
            "is not supported yet, use ogbn-arxiv, ogbn-products or ogbn-mag"
        )
    if split not in (None, "0"):
        raise ConfigError(f"unknown split {split!r} for {name}; OGB ships one split (use 0)")
    root = require_root(root, name)
    dirname = name.replace("-", "_")
    src = find_dataset_dir(root, [dirname, f"{dirname}_pyg"], REQUIRED_FILES[name])

    _require_safe_torch_load()

    def build(cache: Path) -> Data:
        from ogb.nodeproppred import PygNodePropPredDataset

        class SafeOgbDataset(StrictCache, PygNodePropPredDataset):
            pass

        # OGB prints progress on stdout: keep stdout clean for the CLI's own output.
        with (
            torch.serialization.safe_globals(_safe_globals()),
            contextlib.redirect_stdout(sys.stderr),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            try:
                ds = SafeOgbDataset(name, root=str(cache))
                idx = ds.get_idx_split()
            except pickle.UnpicklingError as e:  # a cache file needing more than tensors
                found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
                reason = found.group(1).strip() if found else "not a plain tensor file"
                raise DatasetError(
                    f"refusing to load the {name} cache under {cache}: {reason} "
                    "(delete it to rebuild)"
                ) from None
            except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
                raise DatasetError(f"could not read {name} from {src}: {e}") from e
            return _to_contract(name, ds, idx)

    entries = [p.name for p in src.glob("RELEASE_v*.txt")] + ["raw", "split"]
    return build_in_cache("ogb", src, entries, dirname, build)


def _require_safe_torch_load() -> None:
    """Refuses to let OGB call ``torch.load()`` where its default is the full unpickler.

    Raises:
        ConfigError: torch < 2.6 (default ``weights_only=False``) or
            ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set.
    """
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise ConfigError(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: OGB would read its dataset cache with "
            "the full unpickler; unset it"
        )
    if torch.__version__ < "2.6":
        raise ConfigError(
            f"OGB datasets need torch >= 2.6 (found {torch.__version__}): older torch.load "
            "runs the full unpickler on OGB's dataset cache"
        )


def _to_contract(name: str, ds, idx: dict) -> Data:
    g = ds[0]
    if name == "ogbn-mag":
        x, y = g.x_dict["paper"], g.y_dict["paper"]
        edge_index = g.edge_index_dict[("paper", "cites", "paper")]
        idx = {k: v["paper"] for k, v in idx.items()}
    else:
        x, y, edge_index = g.x, g.y, g.edge_index
    n = x.size(0)
    data = Data(x=x.float(), edge_index=clean_edges(edge_index, n), y=y.long().view(-1))
    for key, part in (("train_mask", "train"), ("val_mask", "valid"), ("test_mask", "test")):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx[part]] = True
        data[key] = mask
    data.num_classes = int(ds.num_classes)
    data.metric = "accuracy"
    data.ogb_name = name
    return data


def ogb_evaluate(name: str, y_true, y_pred) -> float:
    """Scores predictions with OGB's official ``Evaluator``.

    Args:
        name: OGB dataset name (``data.ogb_name``).
        y_true: Labels, [n] or [n, 1] (tensor or array).
        y_pred: Predicted labels ([n] or [n, 1]) or logits / scores [n, C] (argmax taken
            for accuracy datasets).

    Returns:
        The dataset's official metric (accuracy for the supported datasets).
    """
    from ogb.nodeproppred import Evaluator

    try:
        ev = Evaluator(name)
    except ValueError:
        raise ConfigError(f"unknown OGB dataset {name!r}; expected an ogbn-* name") from None
    y_true = np.asarray(y_true.detach().cpu() if torch.is_tensor(y_true) else y_true)
    y_pred = np.asarray(y_pred.detach().cpu() if torch.is_tensor(y_pred) else y_pred)
    if ev.eval_metric == "acc":
        if y_pred.ndim == 2 and y_pred.shape[1] > 1:
            y_pred = y_pred.argmax(axis=1)
        y_true, y_pred = y_true.reshape(-1, 1), y_pred.reshape(-1, 1)
    return float(ev.eval({"y_true": y_true, "y_pred": y_pred})[ev.eval_metric])


for _name in ("ogbn-arxiv", "ogbn-products", "ogbn-proteins"):
    _register(_name)
_register("ogbn-mag-papers", "ogbn-mag")  # full typed ogbn-mag: abkd_deploy.data.ogb_hetero
