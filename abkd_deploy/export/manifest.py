"""Export's side of ``manifest.json``: provenance from the run dir, and re-exports.

The schema (building, reading, checking) has one owner, :mod:`abkd_deploy.manifest`, which
``serve`` reads through too; this module adds only what needs a run dir and turns the
owner's :class:`ManifestError` into :class:`ExportError`. A copy of the manifest without
``files`` goes into the ONNX ``metadata_props`` (:func:`onnx_format.write_metadata`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abkd_deploy import manifest as schema
from abkd_deploy.errors import ExportError
from abkd_deploy.files import read_json, sha256_file
from abkd_deploy.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    METADATA_KEY,
    ManifestError,
    build_manifest,
    file_entries,
)

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "METADATA_KEY",
    "build_manifest",
    "file_entries",
    "provenance_from_run",
    "read_manifest",
]


def read_manifest(export_dir: str | Path, verify_files: bool = False) -> dict[str, Any]:
    """Reads and checks ``export_dir/manifest.json`` (:func:`abkd_deploy.manifest.read_manifest`).

    Args:
        export_dir: An export directory.
        verify_files: Also check every listed file's size and SHA-256.

    Raises:
        ExportError: missing / unreadable / malformed manifest, unsupported version, or a
            file that is missing or does not match its hash.
    """
    try:
        manifest = schema.read_manifest(export_dir)
        if verify_files:
            schema.verify_files(export_dir, manifest)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None
    return manifest


def provenance_from_run(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Dataset, method and accuracies from the run's ``student.json`` / ``metrics.json``.

    Tolerant: ``metrics.json`` may be absent or lack keys; both nested
    (``{"teacher": {"test_acc": ...}}``) and flat (``"teacher.test_acc"``,
    ``"teacher_test_acc"``) layouts are read. Missing values are ``None``.
    """
    metrics: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for name, target in (("metrics.json", metrics), ("config.json", config)):
        try:
            loaded = read_json(run_dir / name)
            if isinstance(loaded, dict):
                target.update(loaded)
        except (OSError, json.JSONDecodeError):
            pass
    method = _dig(metrics, "method") or _dig(config, "method") or meta.get("method")
    return {
        "dataset": meta.get("dataset"),
        "method": method,
        "run_dir": str(run_dir.resolve()),
        "student_sha256": _student_hash(run_dir),
        "teacher_test_acc": _dig(metrics, "teacher", "test_acc"),
        "student_test_acc": _dig(metrics, "student", "test_acc"),
        "teacher_params": _dig(metrics, "teacher", "params"),
        "student_params": _dig(metrics, "student", "params"),
        "compression_ratio": _dig(metrics, "compression_ratio"),
        "metric": _dig(metrics, "metric"),
    }


def _student_hash(run_dir: Path) -> str | None:
    """SHA-256 of the exported checkpoint (``refresh`` checks it is the same student)."""
    path = run_dir / "student.safetensors"
    return sha256_file(path) if path.is_file() else None


def _dig(obj: dict[str, Any], *keys: str) -> Any:
    """``obj[k1][k2]`` or ``obj["k1.k2"]`` or ``obj["k1_k2"]``; ``None`` when absent."""
    node: Any = obj
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None and len(keys) > 1:
        node = obj.get(".".join(keys), obj.get("_".join(keys)))
    return node if isinstance(node, str | int | float | bool) or node is None else None
