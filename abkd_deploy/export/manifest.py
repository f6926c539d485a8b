"""``manifest.json`` of an export directory (format_version 1, docs/FORMATS.md).

The manifest is what a consumer (the serving runtime, a service in another language)
needs: adjacency format and parameters, input/output names, dtypes and symbolic shapes,
opset, graph sizes, provenance, accuracy, validation result and the SHA-256 of every
file. A copy without ``files`` goes into the ONNX ``metadata_props``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from abkd_deploy import __version__
from abkd_deploy.errors import ExportError
from abkd_deploy.utils import read_json, sha256_file

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


def file_entries(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for files of ``directory``."""
    out = {}
    for name in sorted(names):
        path = directory / name
        out[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def build_manifest(
    *,
    adjacency: dict[str, Any],
    model: dict[str, Any],
    graph: dict[str, Any],
    opset: int,
    dtype: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    artifacts: dict[str, str],
    provenance: dict[str, Any],
    accuracy: dict[str, Any],
    validation: dict[str, Any],
) -> dict[str, Any]:
    """Assembles a manifest (without ``files``; see :func:`file_entries`)."""
    return {
        "format_version": MANIFEST_VERSION,
        "producer": {"name": "abkd-deploy", "version": __version__},
        "adjacency": adjacency,
        "model": model,
        "graph": graph,
        "opset": opset,
        "dtype": dtype,
        "inputs": inputs,
        "outputs": outputs,
        "artifacts": artifacts,
        "provenance": provenance,
        "accuracy": accuracy,
        "validation": validation,
    }


def read_manifest(export_dir: str | Path, verify_files: bool = False) -> dict[str, Any]:
    """Reads and checks ``export_dir/manifest.json``.

    Args:
        export_dir: An export directory.
        verify_files: Also recompute every file's SHA-256 and compare.

    Raises:
        ExportError: missing / unreadable manifest, unsupported version, or a file that
            is missing or does not match its hash.
    """
    directory = Path(export_dir)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"no {MANIFEST_NAME} in {str(directory)!r}: not an export directory")
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, OSError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        raise ExportError(
            f"{path} has format_version {version!r}; this version reads {MANIFEST_VERSION}"
        )
    if verify_files:
        for name, entry in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                raise ExportError(f"{name} listed in {MANIFEST_NAME} is missing")
            if sha256_file(file) != entry.get("sha256"):
                raise ExportError(f"{name} does not match its sha256 in {MANIFEST_NAME}")
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
        "teacher_test_acc": _dig(metrics, "teacher", "test_acc"),
        "student_test_acc": _dig(metrics, "student", "test_acc"),
        "teacher_params": _dig(metrics, "teacher", "params"),
        "student_params": _dig(metrics, "student", "params"),
        "compression_ratio": _dig(metrics, "compression_ratio"),
        "metric": _dig(metrics, "metric"),
    }


def _dig(obj: dict[str, Any], *keys: str) -> Any:
    """``obj[k1][k2]`` or ``obj["k1.k2"]`` or ``obj["k1_k2"]``; ``None`` when absent."""
    node: Any = obj
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if node is None and len(keys) > 1:
        node = obj.get(".".join(keys), obj.get("_".join(keys)))
    return node if isinstance(node, str | int | float | bool) or node is None else None
