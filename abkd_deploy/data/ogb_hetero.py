"""Typed graphs in OGB's raw heterogeneous layout: ``ogb-hetero:<dir>`` and ``ogbn-mag``.

Layout (what ``ogb.io.read_graph_raw.read_csv_heterograph_raw`` reads)::

    DIR/raw/num-node-dict.csv.gz                  header = node types, one row of counts
    DIR/raw/triplet-type-list.csv.gz              no header: head,rel,tail per line
    DIR/raw/relations/<h>___<r>___<t>/edge.csv.gz  no header: head_id,tail_id per line
    DIR/raw/relations/<h>___<r>___<t>/num-edge-list.csv.gz   one line: E
    DIR/raw/node-feat/<type>/node-feat.csv.gz     optional (types without it are featureless)
    DIR/raw/nodetype-has-label.csv.gz             header = node types, one row True/False
    DIR/raw/node-label/<type>/node-label.csv.gz   one label per node (-1 or empty: unlabelled)
    DIR/split/<name>/nodetype-has-split.csv.gz    header = node types, one row True/False
    DIR/split/<name>/<type>/{train,valid,test}.csv.gz   node ids, one per line

The target type is the labelled type with a split; ``--split NAME`` picks one of several
split folders. Reverse relations are added and same-type relations symmetrised (see
:mod:`abkd_deploy.data.typed_graph`). Everything is read with OGB's own raw readers
(pandas CSV): no pickle is ever loaded and nothing is written under the user's folder.

``ogbn-mag`` is OGB's ``ogbn_mag/`` folder (``RELEASE_v2.txt``, ``raw/...``, ``node_year``,
``edge_reltype``, ``split/time/paper/...``) read the same way as the full typed graph;
its former paper-only homogeneous view is ``ogbn-mag-papers``.

Write your own typed graph with :func:`save_ogb_hetero`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from abkd_deploy.data.registry import DATASETS, require_root
from abkd_deploy.data.typed_graph import Relation, TypedGraph, check_name, relation_key
from abkd_deploy.errors import ConfigError, DatasetError, first_line

_PARTS = (("train", "train_mask"), ("valid", "val_mask"), ("test", "test_mask"))
_REQUIRED = (
    "raw/num-node-dict.csv.gz",
    "raw/triplet-type-list.csv.gz",
    "raw/nodetype-has-label.csv.gz",
)

#: ogbn-mag's number of venues (OGB's master.csv).
MAG_NUM_CLASSES = 349


@DATASETS.register("ogb-hetero")
def load_ogb_hetero(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> TypedGraph:
    """Registry loader: ``ogb-hetero:<dir>`` (``<dir>`` relative to ``--root`` if given)."""
    if not arg:
        raise ConfigError("ogb-hetero needs a folder: ogb-hetero:<dir> (OGB's raw hetero layout)")
    path = Path(arg).expanduser()
    if not path.is_absolute() and root is not None:
        path = root / path
    return read_ogb_hetero(path, split)


@DATASETS.register("ogbn-mag")
def load_ogbn_mag(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> TypedGraph:
    """Registry loader: the full typed ogbn-mag from ``--root`` (``ROOT/ogbn_mag/...``)."""
    from abkd_deploy.data.ogb import REQUIRED_FILES
    from abkd_deploy.data.pyg_datasets import find_dataset_dir

    if split not in (None, "0", "time"):
        raise ConfigError(f"unknown split {split!r} for ogbn-mag; OGB ships one split (time)")
    root = require_root(root, "ogbn-mag")
    src = find_dataset_dir(root, ["ogbn_mag", "ogbn_mag_pyg"], REQUIRED_FILES["ogbn-mag"])
    graph = read_ogb_hetero(src, "time", num_classes=MAG_NUM_CLASSES)
    graph.ogb_name = "ogbn-mag"
    graph.homogeneous_view = "ogbn-mag-papers"
    return graph


def read_ogb_hetero(
    directory: str | Path, split: str | None = None, num_classes: int | None = None
) -> TypedGraph:
    """Reads a typed graph in OGB's raw layout (module docstring) with OGB's readers.

    Args:
        directory: Folder holding ``raw/`` and ``split/``.
        split: Name of the folder under ``split/``; may be omitted when there is one.
        num_classes: C; default ``max label + 1``.

    Returns:
        A checked :class:`TypedGraph` with reverse relations added.

    Raises:
        DatasetError: files missing or malformed. ConfigError: unknown / ambiguous split.
    """
    from ogb.io.read_graph_raw import (
        read_csv_heterograph_raw,
        read_node_label_hetero,
        read_nodesplitidx_split_hetero,
    )

    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"typed graph folder {str(directory)!r} does not exist")
    missing = [str(directory / f) for f in _REQUIRED if not (directory / f).is_file()]
    if missing:
        raise DatasetError(f"not OGB's raw hetero layout: missing {', '.join(missing)}")
    split_dir = _split_dir(directory, split)
    raw = str(directory / "raw")
    with _quiet():
        try:
            graphs = read_csv_heterograph_raw(raw)
            labels = read_node_label_hetero(raw)
            parts = read_nodesplitidx_split_hetero(str(split_dir))
        except Exception as e:  # pandas / OGB raise many types on malformed files
            raise DatasetError(
                f"could not read typed graph from {directory}: {_describe(e)}"
            ) from e
    if len(graphs) != 1:
        raise DatasetError(f"{directory} holds {len(graphs)} graphs; expected one")
    g = graphs[0]
    target = _target(directory, labels, parts[0])
    n = int(g["num_nodes_dict"][target])
    y = _labels(labels[target], n, directory / "raw/node-label" / target)
    masks = {}
    for (part, key), idx in zip(_PARTS, parts, strict=True):
        masks[key] = _mask(np.asarray(idx[target]), n, split_dir / target / f"{part}.csv.gz")
    feats = g["node_feat_dict"] or {}
    labelled = y[y >= 0]
    c = int(num_classes) if num_classes else (int(labelled.max()) + 1 if labelled.size else 0)
    graph = TypedGraph(
        num_nodes_dict={t: int(v) for t, v in g["num_nodes_dict"].items()},
        x_dict={
            t: torch.from_numpy(np.ascontiguousarray(feats[t], dtype=np.float32))
            if t in feats
            else None
            for t in g["num_nodes_dict"]
        },
        edge_index_dict={
            tuple(rel): torch.from_numpy(np.ascontiguousarray(ei, dtype=np.int64))
            for rel, ei in g["edge_index_dict"].items()
        },
        target=target,
        y=torch.from_numpy(y),
        num_classes=max(c, 2),
        **{k: torch.from_numpy(m) for k, m in masks.items()},
    )
    graph.check()
    graph = graph.with_reverse_relations()
    graph.check()
    return graph


def _split_dir(directory: Path, split: str | None) -> Path:
    base = directory / "split"
    names = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not names:
        raise DatasetError(f"no split folder under {base} (expected split/<name>/...)")
    if split is None or (split == "0" and "0" not in names):
        if len(names) > 1:
            raise ConfigError(
                f"{directory} has several splits ({', '.join(names)}); pass --split NAME"
            )
        split = names[0]
    if split not in names:
        raise ConfigError(
            f"unknown split {split!r} for {directory}; expected one of: {', '.join(names)}"
        )
    if not (base / split / "nodetype-has-split.csv.gz").is_file():
        raise DatasetError(f"missing {base / split / 'nodetype-has-split.csv.gz'}")
    return base / split


def _target(directory: Path, labels: dict, train: dict) -> str:
    both = sorted(set(labels) & set(train))
    if len(both) != 1:
        raise DatasetError(
            f"{directory}: expected exactly one node type with labels and a split, found "
            f"{both or 'none'} (labelled: {sorted(labels)}, split: {sorted(train)})"
        )
    return both[0]


def _labels(values: np.ndarray, n: int, path: Path) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] != 1:
        raise DatasetError(f"{path}: {values.shape[1]} label columns; only single-label tasks")
    values = values.reshape(-1)
    if values.shape[0] != n:
        raise DatasetError(f"{path}: {values.shape[0]} labels for {n} nodes")
    values = values.astype(np.float64)
    if (np.isfinite(values) & (values != np.round(values))).any():
        raise DatasetError(f"{path}: labels must be integers (class ids)")
    return np.where(np.isfinite(values) & (values >= 0), values, -1).astype(np.int64)


def _mask(idx: np.ndarray, n: int, path: Path) -> np.ndarray:
    idx = idx.reshape(-1)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n):
        raise DatasetError(f"{path}: node ids must be integers in [0, {n})")
    mask = np.zeros(n, dtype=bool)
    mask[idx.astype(np.int64)] = True
    return mask


def _describe(e: Exception) -> str:
    line, name = first_line(e), type(e).__name__
    return name if line == name else f"{name}: {line}"


@contextlib.contextmanager
def _quiet():
    # OGB prints progress on stdout (tqdm bars go to stderr): keep the CLI's stdout clean.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- writer -----------------------------------------------------------------------------
def save_ogb_hetero(
    graph: TypedGraph,
    directory: str | Path,
    split_name: str = "random",
    node_files: dict[str, dict[str, np.ndarray]] | None = None,
    edge_files: dict[str, dict[Relation, np.ndarray]] | None = None,
) -> Path:
    """Writes ``graph`` in OGB's raw hetero layout, readable by ``ogb-hetero:<directory>``.

    Reverse relations added by a loader (``graph.reverse_of``) are not written (the
    loader adds them back). The folder is staged next to ``directory`` and renamed into
    place, so it is never half-written; an existing non-empty ``directory`` is refused.

    Args:
        graph: The typed graph.
        directory: Folder to create.
        split_name: Name of the split folder (OGB uses ``time`` for ogbn-mag).
        node_files: Extra per-type node files, e.g. ``{"node_year": {"paper": [N, 1]}}``
            (written as ``raw/node-feat/<type>/<name>.csv.gz``, as OGB does).
        edge_files: Extra per-relation files, e.g. ``{"edge_reltype": {rel: [E, 1]}}``
            (``raw/relations/<h>___<r>___<t>/<name>.csv.gz``).

    Returns:
        ``directory``.
    """
    graph.check()
    directory = Path(directory)
    check_name(split_name, "split")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(
            f"{directory} already exists and is not an empty folder; choose a new one"
        )
    rels = graph.base_relations()
    for rel in rels:
        if graph.edge_index_dict[rel].size(1) == 0:
            raise DatasetError(f"relation {relation_key(rel)} has no edges; OGB cannot read it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_all(graph, tmp, rels, split_name, node_files or {}, edge_files or {})
        _follow_umask(tmp)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def _write_all(
    graph: TypedGraph,
    out: Path,
    rels: list[Relation],
    split_name: str,
    node_files: dict[str, dict[str, np.ndarray]],
    edge_files: dict[str, dict[Relation, np.ndarray]],
) -> None:
    types = graph.node_types
    raw = out / "raw"
    _csv(raw / "num-node-dict.csv.gz", [[graph.num_nodes_dict[t] for t in types]], header=types)
    _csv(raw / "triplet-type-list.csv.gz", [list(r) for r in rels])
    for rel in rels:
        sub = raw / "relations" / "___".join(rel)
        ei = graph.edge_index_dict[rel].cpu().numpy()
        _csv(sub / "edge.csv.gz", ei.T)
        _csv(sub / "num-edge-list.csv.gz", [[ei.shape[1]]])
        for name, per_rel in edge_files.items():
            if rel in per_rel:
                _csv(sub / f"{name}.csv.gz", np.asarray(per_rel[rel]).reshape(ei.shape[1], -1))
    for t in types:
        x = graph.x_dict.get(t)
        if x is not None:
            _csv(raw / "node-feat" / t / "node-feat.csv.gz", x.cpu().numpy())
        for name, per_type in node_files.items():
            if t in per_type:
                arr = np.asarray(per_type[t]).reshape(graph.num_nodes_dict[t], -1)
                _csv(raw / "node-feat" / t / f"{name}.csv.gz", arr)
    flags = [[t == graph.target for t in types]]
    _csv(raw / "nodetype-has-label.csv.gz", flags, header=types)
    _csv(
        raw / "node-label" / graph.target / "node-label.csv.gz",
        graph.y.cpu().numpy().reshape(-1, 1),
    )
    split = out / "split" / split_name
    _csv(split / "nodetype-has-split.csv.gz", flags, header=types)
    for part, key in _PARTS:
        idx = torch.nonzero(getattr(graph, key)).view(-1).cpu().numpy()
        _csv(split / graph.target / f"{part}.csv.gz", idx.reshape(-1, 1))


def _csv(path: Path, rows, header: list[str] | None = None) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=header)
    frame.to_csv(path, header=header is not None, index=False, compression="gzip")


def _follow_umask(root: Path) -> None:
    # mkdtemp creates 0700; make the staged tree follow the user's umask like a mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)
