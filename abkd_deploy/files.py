"""Files: atomic writes (``atomic_path``), JSON (``write_json``/``read_json``), SHA-256.

Torch-free: shared by every stage, the serving path included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` on success.

    The temporary file ``.NAME.<pid>.<token>.tmp`` is created with mode ``0o666`` less the
    process umask (so the published file follows the umask); leftovers of a process that
    no longer runs are removed first. On any exception the temporary file is removed, so
    no half-written artifact is left. The file-level counterpart of
    :func:`abkd_deploy.staging.staged_directory`, with the same naming.
    """
    from abkd_deploy.staging import current_umask, remove_stale, staging_name

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, report_legacy=False)
    tmp_path = staging_name(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        if not tmp_path.is_symlink():  # a writer may have recreated it with other bits
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (numpy scalars/arrays and paths allowed)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    """Reads a JSON file."""
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
