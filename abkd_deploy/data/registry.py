"""Dataset registry: ``load_dataset("planetoid:Cora", root=...)`` -> a checked PyG ``Data``.

A dataset family is one module that registers a loader::

    @DATASETS.register("planetoid")
    def load_planetoid(arg: str | None, root: Path | None, split: str | None,
                       options: dict[str, str]) -> Data: ...

To add a family: write that module, add it to :data:`LOADER_MODULES` and add its name to
``DATASET_FAMILIES`` in :mod:`abkd_deploy.names` (the torch-free table the command line
checks ``--dataset`` against; registering an undeclared name fails).

Names are ``family`` or ``family:arg`` (``planetoid:Cora``, ``npz:/path/g.npz``);
``csbm:num_nodes=1000,homophily=0.8`` passes ``key=value`` options instead of an arg.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch_geometric.data import Data

from abkd_deploy.errors import ConfigError, DatasetError
from abkd_deploy.registry import Registry

Loader = Callable[[str | None, Path | None, str | None, dict[str, str]], Data]

DATASETS: Registry[Loader] = Registry("dataset")

#: Modules registering the built-in dataset families (imported on first use).
LOADER_MODULES = (
    "abkd_deploy.data.csbm",
    "abkd_deploy.data.csbm_mag",
    "abkd_deploy.data.npz",
    "abkd_deploy.data.ogb",
    "abkd_deploy.data.ogb_hetero",
    "abkd_deploy.data.pyg_datasets",
)

#: Metrics a dataset can declare in ``data.metric``.
METRICS = ("accuracy", "roc_auc")


def parse_dataset_name(name: str) -> tuple[str, str | None, dict[str, str]]:
    """Splits ``family[:arg]`` / ``family:k=v,k=v`` into (family, arg, options)."""
    family, _, rest = str(name).partition(":")
    family = family.strip().lower()
    if not family:
        raise ConfigError(f"empty dataset name {name!r}; expected one of: {known_datasets()}")
    options: dict[str, str] = {}
    arg: str | None = rest or None
    if rest and "=" in rest and family not in ("npz", "ogb-hetero"):
        arg = None
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"bad dataset option {part!r} in {name!r}; expected key=value")
            options[key.strip()] = value.strip()
    return family, arg, options


def known_datasets() -> str:
    """Comma-separated list of registered dataset families, for error messages."""
    _import_builtin_loaders()
    return ", ".join(DATASETS.names())


def load_dataset(name: str, root: str | Path | None = None, split: str | int | None = None) -> Data:
    """Loads a dataset by name.

    Args:
        name: ``csbm``, ``ogbn-arxiv``, ``planetoid:Cora``, ``heterophilous:Tolokers``,
            ``npz:/path/file.npz`` ... (see :data:`DATASETS`).
        root: Directory holding the dataset files (unused by ``csbm`` and ``npz``).
        split: Which split, as the family names them: an index (``"0"``) for datasets
            shipping several (heterophilous: 0-9, default 0), ``public``/``full``/
            ``random`` for Planetoid (default ``public``). Unknown values raise.

    Returns:
        A ``Data`` with ``x`` (float32, [N, F]), ``edge_index`` (int64, [2, E], both
        directions, no self loops), ``y`` (int64, [N]), boolean ``train_mask``,
        ``val_mask``, ``test_mask`` ([N]) and the attributes ``num_classes`` (int),
        ``name`` (str) and ``metric`` (``accuracy`` or ``roc_auc``). Typed families
        (``ogbn-mag``, ``ogb-hetero:<dir>``, ``csbm-mag``) return a
        :class:`~abkd_deploy.data.typed_graph.TypedGraph` instead.

    Raises:
        ConfigError: unknown name or bad option.
        DatasetError: files missing or malformed.
    """
    _import_builtin_loaders()
    family, arg, options = parse_dataset_name(name)
    loader = DATASETS.get(family)
    split = None if split is None else str(split)
    data = loader(arg, Path(root).expanduser() if root is not None else None, split, options)
    data.name = str(name)
    check_data(data)
    return data


def require_root(root: Path | None, family: str) -> Path:
    """Returns ``root`` or raises a clear error when it is missing / not a directory."""
    if root is None:
        raise ConfigError(f"dataset family {family!r} needs --root DIR (the folder holding it)")
    if not root.is_dir():
        raise DatasetError(f"dataset root {str(root)!r} does not exist or is not a directory")
    return root


def check_data(data: Data) -> None:
    """Checks the dataset contract documented in :func:`load_dataset`.

    Raises:
        DatasetError: naming the first attribute that violates it.
    """
    if getattr(data, "is_typed", False):  # a TypedGraph (abkd_deploy.data.typed_graph)
        data.check()
        return
    n = data.num_nodes
    if not isinstance(data.x, torch.Tensor) or data.x.dim() != 2 or data.x.size(0) != n:
        raise DatasetError(f"x must be a [num_nodes={n}, F] tensor")
    if data.x.dtype != torch.float32:
        data.x = data.x.float()
    ei = data.edge_index
    if ei.dim() != 2 or ei.size(0) != 2 or ei.dtype != torch.long:
        raise DatasetError(f"edge_index must be int64 [2, E], got {tuple(ei.shape)} {ei.dtype}")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise DatasetError(f"edge_index holds node ids outside [0, {n})")
    if data.y.dim() != 1 or data.y.size(0) != n:
        raise DatasetError(f"y must be a [num_nodes={n}] tensor, got {tuple(data.y.shape)}")
    for key in ("train_mask", "val_mask", "test_mask"):
        mask = getattr(data, key, None)
        if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            raise DatasetError(f"{key} must be a boolean [num_nodes={n}] tensor")
        if not bool(mask.any()):
            raise DatasetError(f"{key} selects no node")
    if int(getattr(data, "num_classes", 0) or 0) < 2:
        raise DatasetError("num_classes must be >= 2")
    if getattr(data, "metric", "accuracy") not in METRICS:
        raise DatasetError(f"metric must be one of {METRICS}, got {data.metric!r}")
    if not hasattr(data, "metric"):
        data.metric = "accuracy"


def _import_builtin_loaders() -> None:
    # Importing the modules registers their loaders (one module per family).
    for module in LOADER_MODULES:
        importlib.import_module(module)
