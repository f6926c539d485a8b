"""Atomic export directories: write into a temporary sibling, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from abkd_deploy.errors import ConfigError


@contextlib.contextmanager
def staged_directory(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary directory next to ``out_dir``.

    When the block succeeds the directory is renamed onto ``out_dir`` (an existing one is
    replaced only when ``force``); when it raises (or is interrupted) the temporary
    directory is removed, so nothing is left on disk.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        publish(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Renames ``tmp`` onto ``out_dir`` (replacing it when ``force``)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    old = None
    if out_dir.exists():
        if not force:
            raise ConfigError(f"output directory {str(out_dir)!r} already exists; use --force")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
