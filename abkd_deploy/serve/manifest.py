"""The serving runtime's view of ``manifest.json``: :mod:`abkd_deploy.manifest` with serve errors.

The schema, its checks and the cross-check with the model live in :mod:`abkd_deploy.manifest`
(the one owner, shared with export); this module only turns its :class:`ManifestError` into
:class:`ArtifactError` and adds what serving needs (an ONNX model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abkd_deploy import manifest as schema
from abkd_deploy.manifest import ADJACENCY_FORMATS, MANIFEST_VERSION, ManifestError, onnx_file
from abkd_deploy.serve.errors import ArtifactError

FORMAT_VERSION = MANIFEST_VERSION
__all__ = [
    "ADJACENCY_FORMATS",
    "FORMAT_VERSION",
    "check_model",
    "load_manifest",
    "onnx_file",
    "verify_files",
]


def load_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Loads and checks ``export_dir/manifest.json``; it must list an ONNX model.

    Raises:
        ArtifactError: see :func:`abkd_deploy.manifest.read_manifest`.
    """
    try:
        manifest = schema.read_manifest(export_dir)
    except ManifestError as exc:
        raise ArtifactError(str(exc)) from None
    name = onnx_file(manifest)
    if name not in manifest["files"]:
        path = Path(export_dir) / schema.MANIFEST_NAME
        raise ArtifactError(f"{path}: files does not list the ONNX model {name!r}")
    return manifest


def verify_files(export_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Sizes and SHA-256 of every listed file (:func:`abkd_deploy.manifest.verify_files`).

    Raises:
        ArtifactError: a file is missing, escapes the directory, or has another size/hash.
    """
    try:
        schema.verify_files(export_dir, manifest)
    except ManifestError as exc:
        raise ArtifactError(str(exc)) from None


def check_model(manifest: dict[str, Any], model_path: str | Path) -> None:
    """The manifest agrees with the model (:func:`abkd_deploy.manifest.check_model`).

    Raises:
        ArtifactError: a field differs from the model's metadata copy, or a table's size
            differs from ``graph.num_nodes``.
    """
    try:
        schema.check_model(manifest, model_path)
    except ManifestError as exc:
        raise ArtifactError(str(exc)) from None
