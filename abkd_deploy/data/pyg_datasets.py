"""PyG benchmark datasets read offline from ``--root``: ``planetoid`` and ``heterophilous``.

PyG's dataset classes write a ``processed/`` folder under their root and download any
raw file they miss. Both are avoided here: the raw files are checked first (a missing
one raises :class:`DatasetError` naming it), and the PyG class is built in a cache
directory (``$ABKD_CACHE``, else ``~/.cache/abkd-deploy``) that mirrors the user's raw
files through symlinks, so the user's root is only ever read.

No full unpickler ever runs on these files (docs/SECURITY.md): Planetoid's pickled raw
files go through :mod:`abkd_deploy.data.restricted_pickle` (PyG would ``pickle.load``
them), and the cached ``processed/`` files are only read with
``torch.load(weights_only=True)`` (:class:`StrictCache`); PyG itself would fall back to
``weights_only=False`` and unpickles ``pre_transform.pt`` with the full unpickler.

Layouts (as PyG names them)::

    ROOT/Cora/raw/ind.cora.{x,tx,allx,y,ty,ally,graph,test.index}
    ROOT/tolokers/raw/tolokers.npz
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data
from torch_geometric.data.dataset import files_exist
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from abkd_deploy.data.planetoid_raw import read_planetoid_data
from abkd_deploy.data.registry import DATASETS, require_root
from abkd_deploy.errors import ConfigError, DatasetError, first_line
from abkd_deploy.staging import current_umask

PLANETOID_NAMES = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_SPLITS = ("public", "full", "random")
_PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")

#: Heterophilous datasets (PyG folder name -> metric).
HETEROPHILOUS_METRICS = {
    "roman_empire": "accuracy",
    "amazon_ratings": "accuracy",
    "minesweeper": "roc_auc",
    "tolokers": "roc_auc",
    "questions": "roc_auc",
}


def cache_root() -> Path:
    """Base folder for processed dataset caches: ``$ABKD_CACHE`` or ``~/.cache/abkd-deploy``."""
    env = os.environ.get("ABKD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "abkd-deploy"


def clean_edges(edge_index: torch.Tensor, num_nodes: int, directed: bool = False) -> torch.Tensor:
    """Returns int64 edges without self loops, coalesced, symmetrised unless ``directed``."""
    edge_index, _ = remove_self_loops(edge_index.long())
    if directed:
        return coalesce(edge_index, num_nodes=num_nodes)
    return to_undirected(edge_index, num_nodes=num_nodes)


def build_in_cache(
    family: str, src: Path, entries: Sequence[str], subdir: str, build: Callable[[Path], Data]
) -> Data:
    """Builds a PyG dataset in a cache folder that mirrors ``src`` without writing to it.

    ``src/<entry>`` (files or folders) are symlinked file by file into
    ``<cache>/<family>/<key>/<subdir>/`` where ``key`` hashes the resolved ``src`` and the
    size/mtime of those files, so edited raw files get a fresh cache. ``build(root)`` gets
    the cache root. A first build happens in a temporary folder renamed into place only
    on success, so an interrupted run never leaves a half-written cache. An existing entry
    is used only if every file in it is the user's own and not world-writable, and its
    files are read by data-only loaders (:class:`StrictCache`): see docs/SECURITY.md.

    Returns:
        What ``build`` returns.
    """
    src = src.resolve()
    files = sorted(
        p for e in entries for p in ([src / e] if (src / e).is_file() else (src / e).rglob("*"))
    )
    h = hashlib.sha1(str(src).encode())
    for p in files:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}".encode())
    final = cache_root() / family / h.hexdigest()[:16]
    if (final / subdir).is_dir():
        _require_private(final)
        return build(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(
            f"cannot create dataset cache {str(final.parent)!r} ({e.strerror}); "
            "set ABKD_CACHE to a writable folder"
        ) from None
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for p in files:
            dst = tmp / subdir / p.relative_to(src)
            if p.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                dst.symlink_to(p)
            except OSError:  # no symlinks (some Windows setups): copy instead
                shutil.copy2(p, dst)
        data = build(tmp)
        with contextlib.suppress(OSError):  # another process finished first: keep its cache
            tmp.rename(final)
        return data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _require_private(folder: Path) -> None:
    """Refuses a cache entry another user could have written (owner or world-writable).

    World-writable entries are accepted when the process umask itself allows that.

    Raises:
        DatasetError: naming the first such file or folder.
    """
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners
        return
    uid = os.getuid()
    others_may_write = not current_umask() & 0o002  # then world-writable is the user's choice
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        world = st.st_mode & 0o002 and not path.is_symlink() and not others_may_write
        if st.st_uid != uid or world:
            who = "owned by another user" if st.st_uid != uid else "writable by every user"
            raise DatasetError(
                f"refusing dataset cache {path}: {who}; remove it or set ABKD_CACHE to a "
                "folder only you can write"
            )


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, no code.

    Raises:
        DatasetError: the file is unreadable or needs anything else (one line naming it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cache file is untrusted input
        found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
        reason = found.group(1) if found else first_line(e)
        raise DatasetError(
            f"refusing to load dataset cache {path}: {reason.strip()} (delete it to rebuild)"
        ) from None


class StrictCache:
    """Mixin for a PyG ``InMemoryDataset``: its cache is never read by the full unpickler.

    PyG's ``Dataset._process`` unpickles ``processed/pre_transform.pt`` with
    ``weights_only=False`` and ``InMemoryDataset.load`` retries ``weights_only=False``
    when the safe load fails. Here processing runs only when the processed files are
    missing, and :meth:`load` uses :func:`load_weights_only` (put the mixin first).
    """

    def _process(self) -> None:
        if files_exist(self.processed_paths):
            return
        os.makedirs(self.processed_dir, exist_ok=True)
        self.process()

    def load(self, path: str, data_cls: type = Data) -> None:
        out = load_weights_only(Path(path))
        cls = out[2] if isinstance(out, tuple) and len(out) == 3 else data_cls
        if not (
            isinstance(out, tuple)
            and len(out) in (2, 3)
            and isinstance(out[0], dict)
            and isinstance(cls, type)
            and issubclass(cls, Data)
        ):
            raise DatasetError(f"{path} is not a PyG dataset cache (delete it to rebuild)")
        self.data, self.slices = cls.from_dict(out[0]), out[1]


def find_dataset_dir(root: Path, dirnames: Sequence[str], required: Sequence[str]) -> Path:
    """Returns the first ``root/<dirname>`` (or ``root`` itself) holding all ``required`` files.

    Raises:
        DatasetError: none does; the message names the missing files of the closest one.
    """
    candidates = [root / d for d in dirnames] + [root]
    for cand in candidates:
        if all((cand / r).is_file() for r in required):
            return cand
    # Report against the candidate missing the fewest files (ties: the first, root/<dirname>).
    first = min(candidates, key=lambda c: sum(not (c / r).is_file() for r in required))
    missing = [str(first / r) for r in required if not (first / r).is_file()]
    shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
    raise DatasetError(f"dataset files not found: expected {shown}")


@DATASETS.register("planetoid")
def load_planetoid(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> Data:
    """Loads Cora / CiteSeer / PubMed from ``root/<Name>/raw`` (PyG's Planetoid layout).

    ``split`` is ``public`` (default), ``full`` or ``random`` (PyG's names; ``random`` is
    drawn with a fixed seed so it is the same on every load).
    """
    name = PLANETOID_NAMES.get(str(arg).lower())
    if name is None:
        raise ConfigError(
            f"unknown Planetoid dataset {arg!r}; expected planetoid:NAME with NAME one of: "
            f"{', '.join(PLANETOID_NAMES.values())}"
        )
    split = (split or "public").lower()
    if split not in PLANETOID_SPLITS:
        raise ConfigError(
            f"unknown split {split!r} for planetoid:{name}; expected one of: "
            f"{', '.join(PLANETOID_SPLITS)}"
        )
    root = require_root(root, "planetoid")
    required = [f"raw/ind.{name.lower()}.{f}" for f in _PLANETOID_FILES]
    src = find_dataset_dir(root, [name, name.lower()], required)

    def build(cache: Path) -> Data:
        from torch_geometric.datasets import Planetoid

        class SafePlanetoid(StrictCache, Planetoid):
            def process(self) -> None:  # PyG's unpickles the raw files with pickle.load
                self.save(
                    [read_planetoid_data(Path(self.raw_dir), self.name)], self.processed_paths[0]
                )

        with torch.random.fork_rng():
            torch.manual_seed(0)
            ds = SafePlanetoid(str(cache), name, split=split)
        return _to_contract(ds[0], int(ds.num_classes), "accuracy")

    return build_in_cache("planetoid", src, ["raw"], name, build)


@DATASETS.register("heterophilous")
def load_heterophilous(
    arg: str | None, root: Path | None, split: str | None, options: dict[str, str]
) -> Data:
    """Loads a heterophilous benchmark (Tolokers, Roman-empire, ...) from ``root/<name>/raw``.

    ``split`` picks one of the 10 shipped splits: ``"0"`` (default) to ``"9"``. The metric
    is ``roc_auc`` for the binary Tolokers / Minesweeper / Questions, else ``accuracy``.
    """
    key = str(arg).lower().replace("-", "_")
    if key not in HETEROPHILOUS_METRICS:
        raise ConfigError(
            f"unknown heterophilous dataset {arg!r}; expected heterophilous:NAME with NAME one "
            "of: Roman-empire, Amazon-ratings, Minesweeper, Tolokers, Questions"
        )
    col = _split_index(split, 10, f"heterophilous:{arg}")
    root = require_root(root, "heterophilous")
    src = find_dataset_dir(root, [key], [f"raw/{key}.npz"])

    def build(cache: Path) -> Data:
        from torch_geometric.datasets import HeterophilousGraphDataset

        # PyG reads the raw .npz with np.load (allow_pickle=False, numpy's default since
        # 1.16.3): an object array raises ValueError instead of being unpickled.
        class SafeHeterophilous(StrictCache, HeterophilousGraphDataset):
            pass

        try:
            ds = SafeHeterophilous(str(cache), key)
        except (ValueError, KeyError, OSError, RuntimeError, EOFError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DatasetError(f"cannot read {src / 'raw' / f'{key}.npz'}: {reason}") from None
        data = ds[0]
        for m in ("train_mask", "val_mask", "test_mask"):
            data[m] = data[m][:, col]
        return _to_contract(data, int(data.y.max()) + 1, HETEROPHILOUS_METRICS[key])

    return build_in_cache("heterophilous", src, ["raw"], key, build)


def _split_index(split: str | None, count: int, what: str) -> int:
    if split is None:
        return 0
    try:
        col = int(split)
    except ValueError:
        col = -1
    if not 0 <= col < count:
        raise ConfigError(f"unknown split {split!r} for {what}; expected an integer 0-{count - 1}")
    return col


def _to_contract(data: Data, num_classes: int, metric: str) -> Data:
    n = int(data.num_nodes)
    out = Data(
        x=data.x.float(),
        edge_index=clean_edges(data.edge_index, n),
        y=data.y.long().view(-1),
        train_mask=data.train_mask.bool(),
        val_mask=data.val_mask.bool(),
        test_mask=data.test_mask.bool(),
    )
    out.num_classes = num_classes
    out.metric = metric
    return out
