"""Reads an export directory's ``manifest.json`` and checks its files' hashes.

The contract is ``docs/FORMATS.md`` ("Export directory", format_version 1).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from abkd_deploy.serve.errors import ArtifactError
from abkd_deploy.utils import sha256_file

FORMAT_VERSION = 1
ADJACENCY_FORMATS = ("embedded", "ell", "coo")


def load_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Loads and checks ``export_dir/manifest.json`` (format_version 1).

    Raises:
        ArtifactError: the directory or manifest is missing, not JSON, of another format
            version, or lacks a field the runtime needs.
    """
    root = Path(export_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise ArtifactError(f"export directory {str(root)!r} does not exist")
    if not path.is_file():
        raise ArtifactError(
            f"no manifest.json in {str(root)!r}; expected a directory written by "
            "`abkd-deploy export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this runtime reads {FORMAT_VERSION}"
        )
    _check_fields(manifest, path)
    return manifest


def _check_fields(m: dict[str, Any], path: Path) -> None:
    """Checks the fields the runtime uses, with one-line messages."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ArtifactError(f"{path}: {what}")

    adj = m.get("adjacency")
    need(isinstance(adj, dict), "missing object 'adjacency'")
    fmt = adj.get("format")
    need(fmt in ADJACENCY_FORMATS, f"adjacency.format {fmt!r} is not one of {ADJACENCY_FORMATS}")
    graph = m.get("graph")
    need(isinstance(graph, dict), "missing object 'graph'")
    for key in ("num_nodes", "num_classes"):
        val = graph.get(key)
        need(isinstance(val, int) and val > 0, f"graph.{key} must be a positive int, got {val!r}")
    for key in ("inputs", "outputs"):
        specs = m.get(key)
        need(
            isinstance(specs, list) and all(isinstance(s, dict) and "name" in s for s in specs),
            f"'{key}' must be a list of {{name, dtype, shape}} objects",
        )
    files = m.get("files")
    need(isinstance(files, dict) and files, "missing object 'files' (name -> sha256, bytes)")
    onnx_name = onnx_file(m)
    need(onnx_name in files, f"files does not list the ONNX model {onnx_name!r}")


def onnx_file(manifest: dict[str, Any]) -> str:
    """Name of the ONNX model inside the export directory (``artifacts.onnx``)."""
    return str((manifest.get("artifacts") or {}).get("onnx") or "model.onnx")


def verify_files(export_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Checks the size and SHA-256 of every file listed in ``manifest["files"]``.

    Raises:
        ArtifactError: a file is missing, escapes the directory, or has another size/hash.
    """
    root = Path(export_dir)
    for name, entry in manifest["files"].items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"manifest file name {name!r} must be relative to the export dir")
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{name!r} is listed in manifest.json but missing from {root}")
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(want, str):
            raise ArtifactError(f"manifest entry for {name!r} has no sha256")
        size = entry.get("bytes")
        if isinstance(size, int) and path.stat().st_size != size:
            raise ArtifactError(
                f"{name!r} has {path.stat().st_size} bytes; manifest.json says {size} "
                "(corrupt or replaced file)"
            )
        got = sha256_file(path)
        if got != want.lower():
            raise ArtifactError(
                f"sha256 of {name!r} is {got}; manifest.json says {want} (corrupt or replaced file)"
            )
