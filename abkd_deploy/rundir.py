"""What a directory given on the command line is, and whether a run dir is consistent.

A run dir (``teacher`` / ``distill`` / ``compare``) ends with ``run.json`` listing every
file and its SHA-256; ``metrics.json`` / ``config.json`` record the checkpoints' SHA-256
under ``checkpoints``. :func:`verify_run_dir` checks both, so a student from one run is
never exported with the metrics of another. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.files import sha256_file
from abkd_deploy.staging import EXPORT_RECORD, RUN_RECORD

#: Files that record the checkpoints' SHA-256 (``{"checkpoints": {file: sha256}}``).
RECORDING_FILES = ("metrics.json", "config.json")


def checkpoint_hashes(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    """``{file: sha256}`` of the named checkpoint files present in ``directory``."""
    return {n: sha256_file(directory / n) for n in names if (directory / n).is_file()}


def kind_of(directory: Path) -> str | None:
    """``"export"``, ``"distill"``, ``"teacher"``, ``"compare"`` or ``None`` (unknown)."""
    if (directory / EXPORT_RECORD).is_file():
        return "export"
    if (directory / "student.json").is_file():
        return "distill"
    if (directory / "comparison.json").is_file():
        return "compare"
    if (directory / "teacher.json").is_file():
        return "teacher"
    return None


def check_is_run_dir(run_dir: str | Path) -> Path:
    """Refuses a path that does not exist or is an export / teacher / compare directory.

    Raises:
        CheckpointError: the directory does not exist or is not a directory.
        ConfigError: the directory is of another kind (named in the message).
    """
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} is not a directory")
    kind = kind_of(path)
    if kind == "export":
        raise ConfigError(
            f"{str(run_dir)!r} is an export directory (it has {EXPORT_RECORD}), not a run "
            "dir; export takes the run dir written by `abkd-deploy distill`"
        )
    if kind == "teacher":
        raise ConfigError(
            f"{str(run_dir)!r} is a teacher run dir (teacher.json, no student.json); export "
            "takes the run dir written by `abkd-deploy distill`"
        )
    if kind == "compare":
        methods = sorted(p.name for p in path.iterdir() if (p / "student.json").is_file())
        example = f"e.g. {str(path / methods[-1])!r}" if methods else "one of its method dirs"
        raise ConfigError(
            f"{str(run_dir)!r} is a compare directory; export one of its method run dirs, {example}"
        )
    return path


def not_an_export_hint(directory: str | Path) -> str:
    """``"; it is a run dir: ..."`` for a run dir given where an export is expected."""
    kind = kind_of(Path(directory))
    if kind in ("distill", "teacher", "compare"):
        return (
            f"; {str(directory)!r} is a {kind} run dir, not an export: run "
            f"`abkd-deploy export {directory} --out EXPORT_DIR` first"
            if kind == "distill"
            else f"; {str(directory)!r} is a {kind} run dir, not an export"
        )
    return ""


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def verify_run_dir(run_dir: str | Path) -> Path:
    """Checks a run dir: its kind, ``run.json`` hashes, and the recorded checkpoints.

    Run dirs written before ``run.json`` existed are accepted as they are.

    Raises:
        CheckpointError: a file is missing or disagrees with ``run.json`` or with the
            ``checkpoints`` recorded in ``metrics.json`` / ``config.json`` (named).
        ConfigError: see :func:`check_is_run_dir`.
    """
    path = check_is_run_dir(run_dir)
    record_path = path / RUN_RECORD
    if record_path.is_file():
        record = _read(record_path)
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict):
            raise CheckpointError(f"{record_path} lists no files")
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file} listed in {RUN_RECORD} is missing")
            if not isinstance(entry, dict) or sha256_file(file) != entry.get("sha256"):
                raise CheckpointError(
                    f"{file} does not match its sha256 in {RUN_RECORD}: the run dir was "
                    "changed after it was written"
                )
    for recorder in RECORDING_FILES:
        if not (path / recorder).is_file():
            continue
        data = _read(path / recorder)
        hashes = data.get("checkpoints") if isinstance(data, dict) else None
        for name, sha in (hashes or {}).items():
            file = path / name
            if file.is_file() and sha256_file(file) != sha:
                raise CheckpointError(
                    f"{path / recorder} records another {name} (sha256 {str(sha)[:12]}...) "
                    f"than the one in {str(path)!r}: the run dir mixes files of two runs"
                )
    return path
