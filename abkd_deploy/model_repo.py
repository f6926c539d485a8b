"""Model repositories: ``REPO/<model>/<version>/``, one export per integer version folder.

The layout Triton and TF Serving use (``docs/FORMATS.md`` "Model repository"). A *model
directory* holds version folders named by a non-negative integer in canonical form (``1``,
``2``, ``10``; not ``01``, ``-1`` or ``v2``); every other entry is ignored, in particular
hidden entries such as the staging folders ``.NAME.<pid>.<token>.tmp`` that
:mod:`abkd_deploy.staging` and :func:`write_version` use. ``serve`` serves the newest valid
version (:mod:`abkd_deploy.serve.versions`).

A new version is published atomically: it is written whole into a hidden folder of the
model directory, then renamed to ``max(version) + 1``. Two publishers racing for the same
number cannot both win: renaming a directory onto a non-empty one fails, and the loser
retries with the next number (:func:`publish_version`).

Torch-free: used by ``serve`` and by ``export --repo``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from abkd_deploy.errors import ConfigError
from abkd_deploy.staging import remove_stale

T = TypeVar("T")

#: A version folder's name: a non-negative integer without leading zeros.
VERSION_NAME = re.compile(r"^(0|[1-9][0-9]*)$")
#: Manifest of an export directory (a model directory has none at its top level).
MANIFEST_NAME = "manifest.json"
#: Hidden folders ``.next.<pid>.<token>.tmp`` hold versions being written.
STAGING_STEM = "next"
#: How many numbers :func:`publish_version` tries before giving up.
MAX_PUBLISH_TRIES = 1000


def list_versions(model_dir: str | Path) -> list[int]:
    """The version numbers of ``model_dir``, ascending (folders only; see module docstring).

    A missing or unreadable ``model_dir`` has no versions.
    """
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return []
    versions = []
    for entry in entries:
        if VERSION_NAME.match(entry.name) and entry.is_dir():
            versions.append(int(entry.name))
    return sorted(versions)


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a model directory: a directory without ``manifest.json`` that
    holds at least one version folder (an export directory has a ``manifest.json``)."""
    path = Path(path)
    return path.is_dir() and not (path / MANIFEST_NAME).exists() and bool(list_versions(path))


def next_version(model_dir: str | Path) -> int:
    """``max(version) + 1``, or 1 for a model directory without versions."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def publish_version(model_dir: str | Path, staged: str | Path) -> tuple[int, Path]:
    """Renames the complete directory ``staged`` (inside ``model_dir``) to the next version.

    Race-safe: when another publisher took the number first (the rename fails because the
    target exists and is not empty, or is a file), the next number is tried.

    Returns:
        ``(version, path)`` of the published folder.

    Raises:
        ConfigError: ``staged`` is not a directory directly inside ``model_dir``.
        OSError: the rename fails for another reason.
    """
    model_dir, staged = Path(model_dir), Path(staged)
    if not staged.is_dir() or staged.parent.resolve() != model_dir.resolve():
        raise ConfigError(f"{staged} must be a directory directly inside {model_dir}")
    version = next_version(model_dir)
    for _ in range(MAX_PUBLISH_TRIES):
        target = model_dir / str(version)
        try:
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            version = max(version + 1, next_version(model_dir))
            continue
        return version, target
    raise ConfigError(f"could not find a free version number in {model_dir}")


def write_version(model_dir: str | Path, write: Callable[[Path], T]) -> tuple[int, Path, T]:
    """Writes a new version of ``model_dir`` with ``write`` and publishes it atomically.

    ``write(out)`` must create the directory ``out`` (it does not exist yet; ``export``
    does this through :mod:`abkd_deploy.staging`). ``out`` is a hidden folder of
    ``model_dir``, which ``serve`` ignores; it is then renamed to the next version
    (:func:`publish_version`). If ``write`` fails, ``out`` is removed (this function chose
    its unique name, so nothing else can be there). Such folders left by a publisher that
    was killed (its pid no longer runs) are removed first.

    Returns:
        ``(version, path, write's result)``.

    Raises:
        ConfigError: ``model_dir`` exists and is an export directory or a file.
    """
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise ConfigError(f"--repo {str(model_dir)!r} exists and is not a directory")
    if (model_dir / MANIFEST_NAME).exists():
        raise ConfigError(
            f"--repo {str(model_dir)!r} is an export directory, not a model directory "
            "REPO/<model> of version folders"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(model_dir / STAGING_STEM, report_legacy=False)  # left by killed publishers
    out = model_dir / f".{STAGING_STEM}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        result = write(out)
        version, path = publish_version(model_dir, out)
    except BaseException:
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out, ignore_errors=True)
        raise
    return version, path, result
