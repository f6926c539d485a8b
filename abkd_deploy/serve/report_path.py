"""Where ``bench --out X.json`` may write ``X.json``, ``X.md`` and ``X.png``.

Rules (the file-level counterpart of :mod:`abkd_deploy.staging`): none of the three may
lie inside the export or run directory being benchmarked (that would make them foreign
files there), ``X`` may not end in ``.md``/``.png`` (the report would overwrite itself),
and an existing file is overwritten only when ``X.json`` is a bench report this tool
wrote (a re-run replacing its own report); anything else is refused, naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from abkd_deploy.errors import ConfigError
from abkd_deploy.staging import PRODUCER

SUFFIXES = (".md", ".png")


def report_paths(path: str | Path) -> list[Path]:
    """``[X.json, X.md, X.png]`` for ``--out X.json``."""
    path = Path(path)
    return [path, *(path.with_suffix(s) for s in SUFFIXES)]


def is_bench_report(path: Path) -> bool:
    """Whether ``path`` is a JSON bench report written by this tool."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(data, dict)
        and (data.get("producer") or {}).get("name") == PRODUCER
        and isinstance(data.get("results"), list)
    )


def check_report_path(path: str | Path, protected: Iterable[str | Path | None] = ()) -> list[Path]:
    """Checks ``--out`` of ``bench``; returns the three paths it will write.

    Args:
        path: The JSON report path.
        protected: Directories the report may not be written into (the export dir and
            the run dir being benchmarked).

    Raises:
        ConfigError: one line naming the path and the rule.
    """
    path = Path(path)
    if path.suffix in SUFFIXES:
        raise ConfigError(
            f"--out {str(path)!r} would be overwritten by the {path.suffix} part of the "
            "report; give a .json path"
        )
    paths = report_paths(path)
    for directory in protected:
        if directory is None:
            continue
        root = Path(directory).resolve()
        for p in paths:
            if p.resolve() == root or root in p.resolve().parents:
                raise ConfigError(
                    f"--out {str(path)!r} would write {p.name} into {str(directory)!r}, "
                    "which is being benchmarked; choose a path outside it"
                )
    own = path.is_file() and not path.is_symlink() and is_bench_report(path)
    for p in paths:
        if p.is_dir():
            raise ConfigError(f"--out {str(path)!r}: {str(p)!r} is a directory")
        if (p.exists() or p.is_symlink()) and not own:
            raise ConfigError(
                f"refusing to overwrite {str(p)!r}: {path.name} is not a bench report written "
                "by abkd-deploy; choose another --out"
            )
    return paths
