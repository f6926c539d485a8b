"""Output directories: staged next to the target, published whole by one rename.

The one owner of how every command (teacher, distill, compare, export, bench) writes a
directory. Rules:

* the directory is built in a staging sibling ``.NAME.<pid>.<token>.tmp`` and renamed onto
  ``NAME`` at the end; on any exception (SIGINT/SIGTERM included) the staging dir is
  removed, so a reader never sees a half-written directory;
* an existing non-empty ``NAME`` is refused without ``force``; with ``force`` it is
  replaced only when this tool wrote it and it holds nothing else: every file must be
  listed in its ownership record (an export's ``manifest.json`` ``files``, a run dir's
  ``run.json``), otherwise the first foreign file is named and nothing is touched;
* the target may not equal, lie inside, or contain a source directory of the command
  (paths are resolved: symlinks, ``.``, ``x/..``);
* staging leftovers of a process that no longer runs (its pid is in the name) are
  removed before a new one is staged; others are never read;
* published files and directories follow the process umask.

Torch-free: imported by the CLI, distill, export and serve alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from abkd_deploy.errors import ConfigError

#: Ownership record of a run directory (teacher, distill, compare).
RUN_RECORD = "run.json"
#: Ownership record of an export directory.
EXPORT_RECORD = "manifest.json"
PRODUCER = "abkd-deploy"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_name(target: Path) -> Path:
    """``target.parent / .NAME.<pid>.<token>.tmp``: the pid lets a later run spot leftovers."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(target: Path, report_legacy: bool = True) -> list[Path]:
    """Removes ``.NAME.<pid>.*.tmp`` siblings of ``target`` whose process is gone.

    ``report_legacy``: also name (never read, never remove) leftovers of older versions,
    whose names carry no pid.

    Returns:
        The removed paths (a note is printed to stderr for each).
    """
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+(\.old)?\.tmp$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None and report_legacy and _is_legacy_leftover(entry, target):
            print(
                f"note: {entry} looks like the leftover of an interrupted run of an older "
                "abkd-deploy; it is not read; remove it",
                file=sys.stderr,
            )
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        print(
            f"note: removed {entry} left by a process that no longer runs (pid {match.group(1)})",
            file=sys.stderr,
        )
    return removed


def _is_legacy_leftover(entry: Path, target: Path) -> bool:
    """``.NAME.<random>.tmp`` / ``.NAME.old-*`` / ``.distill-*`` of versions without pids."""
    name = entry.name
    return name.startswith(".distill-") or (
        name.startswith(f".{target.name}.")
        and (name.endswith(".tmp") or f".{target.name}.old-" in name)
    )


def check_sources(out: Path, sources: Iterable[str | Path | None]) -> None:
    """Refuses ``out`` equal to, inside, or containing any of ``sources`` (resolved)."""
    target = Path(out).resolve()
    for src in sources:
        if src is None:
            continue
        source = Path(src).resolve()
        if target == source:
            where = "is the source directory"
        elif source in target.parents:
            where = "is inside the source directory"
        elif target in source.parents:
            where = "contains the source directory"
        else:
            continue
        raise ConfigError(
            f"--out {str(out)!r} {where} {str(src)!r}; choose an output directory outside it"
        )


def owned_names(directory: Path) -> tuple[str, set[str]] | None:
    """``(record name, files it lists incl. itself)`` of a directory this tool wrote."""
    for record in (EXPORT_RECORD, RUN_RECORD):
        path = directory / record
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            continue
        if (data.get("producer") or {}).get("name") != PRODUCER:
            continue
        return record, {record, *map(str, data["files"])}
    return None


def foreign_entry(directory: Path) -> str | None:
    """The first entry under ``directory`` (relative posix path) that its ownership record
    does not list, or ``None`` when every entry is listed. Without a record every entry
    is foreign."""
    owned = owned_names(directory)
    names = owned[1] if owned is not None else set()
    parents = {p.as_posix() for n in names for p in Path(n).parents}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        rel_root = Path(root).relative_to(directory)
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if rel not in names or (Path(root) / name).is_symlink():
                return rel
        for name in dirs:
            rel = (rel_root / name).as_posix()
            if rel not in parents or (Path(root) / name).is_symlink():
                return rel
    return None


def check_replaceable(out: Path, force: bool, display: str | Path | None = None) -> None:
    """Refuses an existing ``out`` unless it is absent, an empty directory, or (with
    ``force``) a directory this tool wrote holding nothing but its listed files."""
    shown = str(display if display is not None else out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"output path {shown!r} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"output directory {shown!r} already exists; use --force to replace it")
    foreign = foreign_entry(out)
    if foreign is not None:
        why = "" if owned_names(out) else f" (no {EXPORT_RECORD} or {RUN_RECORD} lists it)"
        raise ConfigError(
            f"refusing to replace {shown!r}: {foreign!r} was not written by abkd-deploy"
            f"{why}; move it away or choose another --out"
        )


def check_out_dir(
    out: str | Path, force: bool = False, sources: Iterable[str | Path | None] = ()
) -> Path:
    """All checks of :func:`staged_directory` up front (before any work); creates the parent.

    Returns:
        The resolved target path.

    Raises:
        ConfigError: ``out`` overlaps a source, exists without ``force``, is a file, or is
            not this tool's to replace.
    """
    check_sources(Path(out), sources)
    target = Path(out).resolve()
    if target.parent == target:
        raise ConfigError(f"--out {str(out)!r} is a filesystem root; choose a directory")
    check_replaceable(target, force, out)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def staged_directory(
    out: str | Path, force: bool = False, sources: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yields an empty staging directory next to ``out``; publishes it when the block ends.

    When the block raises (or is interrupted) the staging directory is removed.
    """
    sources = list(sources)
    target = check_out_dir(out, force, sources)
    remove_stale(target)
    tmp = staging_name(target)
    os.mkdir(tmp, 0o777)  # the umask applies
    try:
        yield tmp
        publish(tmp, target, force, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_umask(root: Path) -> None:
    """Sets every file under ``root`` to ``0o666 & ~umask`` and every directory (``root``
    included) to ``0o777 & ~umask`` (temporary files are created private)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def publish(tmp: Path, out: Path, force: bool, display: str | Path | None = None) -> None:
    """Renames ``tmp`` onto ``out``; an existing ``out`` is re-checked, then replaced."""
    apply_umask(tmp)
    check_replaceable(out, force, display)
    old = None
    if out.exists() and any(out.iterdir()):
        old = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old.tmp"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_run_record(directory: Path, command: str, extra: dict[str, Any] | None = None) -> None:
    """Writes ``directory/run.json``: every file under ``directory`` with its SHA-256.

    Call it last, inside the staging directory: it is both the ownership record (what
    ``--force`` may replace) and the consistency record ``export`` checks.
    """
    from abkd_deploy import __version__
    from abkd_deploy.files import sha256_file, write_json

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != RUN_RECORD:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    record = {
        "format_version": 1,
        "producer": {"name": PRODUCER, "version": __version__},
        "command": command,
        **(extra or {}),
        "files": files,
    }
    write_json(directory / RUN_RECORD, record)
