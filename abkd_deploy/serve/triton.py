"""A Triton Inference Server model repository for an ONNX export (``abkd-deploy triton``).

Layout written (nothing else in ``REPO`` is touched)::

    REPO/<name>/config.pbtxt        platform onnxruntime_onnx; inputs/outputs from the graph
    REPO/<name>/1/model.onnx        the export's ONNX model, byte for byte
    REPO/<name>/1/model.onnx.data   its external data (if any), same relative location
    REPO/<name>/1/manifest.json     the export's manifest, verbatim (provenance; the other
                                    formats it lists, model.pt / model.pt2, are not copied)
    REPO/<name>/run.json            ownership record (abkd_deploy.staging): what --force may
                                    replace; Triton ignores both extra files

Batching. ``embedded`` exports take ``node_ids [batch]`` and every output's first dim is
the same ``batch``: Triton may concatenate requests along it, so ``max_batch_size`` > 0,
``dims`` leave the batch dim out and ``dynamic_batching`` merges concurrent requests. A
batch-only tensor (``node_ids``) is declared ``dims: [1]`` with ``reshape: { shape: [] }``
(Triton needs non-empty dims): clients send ``[n, 1]``. ``ell`` and ``coo`` take one
(sub)graph per request: the first dims of ``x``, ``nbr_l``, ``edge_index`` count that
graph's rows, not independent requests, so ``max_batch_size`` is 0 and ``dims`` are the
full ONNX shapes (``-1`` = any size).

Torch-free: the graph is read by :mod:`abkd_deploy.serve.onnx_signature`, the text comes
from :mod:`abkd_deploy.serve.triton_config`, the folder is staged and published by
:mod:`abkd_deploy.staging`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abkd_deploy.errors import ConfigError
from abkd_deploy.serve.errors import ArtifactError
from abkd_deploy.serve.manifest import load_manifest, onnx_file, verify_files
from abkd_deploy.serve.onnx_signature import (
    TensorSig,
    batch_dim,
    external_data_files,
    read_signature,
)
from abkd_deploy.serve.triton_config import (
    DEFAULT_QUEUE_DELAY_US,
    Instances,
    parse_instances,
    render_config,
)
from abkd_deploy.staging import check_out_dir, staged_directory, write_run_record

MANIFEST_NAME = "manifest.json"
VERSION_DIR = "1"
#: Node ids per model run for ``embedded`` exports (the built-in server's --max-batch).
DEFAULT_MAX_BATCH = 1024
BATCHED_FORMATS = ("embedded",)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonModel:
    """What :func:`write_triton_repo` wrote."""

    path: Path
    name: str
    max_batch_size: int
    instances: Instances
    inputs: list[TensorSig]
    outputs: list[TensorSig]


def write_triton_repo(
    export_dir: str | Path,
    repo: str | Path,
    *,
    name: str | None = None,
    max_batch: int | None = None,
    instances: str = "cpu:1",
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    force: bool = False,
) -> TritonModel:
    """Writes ``repo/<name>/`` (config.pbtxt + version ``1/``) for an export directory.

    Args:
        export_dir: An ``abkd-deploy export`` directory with an ONNX model.
        repo: Triton model repository (created if missing; other models are left alone).
        name: Model name (default: the export directory's name).
        max_batch: ``max_batch_size``; default 1024 for ``embedded``, 0 for ``ell``/``coo``
            (which cannot batch across requests: anything but 0 is refused).
        instances: ``cpu:N`` or ``gpu:N``.
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds``.
        force: Replace ``repo/<name>`` if an earlier call wrote it (never anything else).

    Raises:
        ConfigError: bad name / instances / max_batch, or ``repo/<name>`` exists.
        ArtifactError: malformed export, hash mismatch, or a graph Triton cannot describe.
    """
    export_dir, repo = Path(export_dir), Path(repo)
    groups = parse_instances(instances)
    manifest = load_manifest(export_dir)
    name = export_dir.resolve().name if name is None else name
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model name {name!r}: use letters, digits, '_', '.', '-' (start with a letter "
            "or digit); pass --name"
        )
    if int(max_queue_delay_us) < 0:
        raise ConfigError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    fmt = manifest["adjacency"]["format"]
    max_batch = _max_batch(fmt, max_batch)
    target = repo / name
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"--out {str(repo)!r} exists and is not a directory")
    created_repo = not repo.exists()
    try:
        check_out_dir(target, force, sources=[export_dir])  # refuse early, before hashing
        verify_files(export_dir, manifest)
        inputs, outputs, copies = _read_model(export_dir, manifest, max_batch)
        text = render_config(
            name,
            inputs,
            outputs,
            max_batch_size=max_batch,
            instances=groups,
            adjacency=fmt,
            model_filename=onnx_file(manifest),
            queue_delay_us=int(max_queue_delay_us),
            source=str(export_dir.resolve()),
        )
        with staged_directory(target, force, sources=[export_dir]) as tmp:
            _fill(tmp, export_dir, copies, text)
    except BaseException:
        if created_repo:
            with contextlib.suppress(OSError):
                repo.rmdir()  # only while still empty: it was ours
        raise
    return TritonModel(target, name, max_batch, groups, inputs, outputs)


def _read_model(
    export_dir: Path, manifest: dict[str, Any], max_batch: int
) -> tuple[list[TensorSig], list[TensorSig], list[str]]:
    """Signature of the export's ONNX model and the files to copy with it."""
    model_path = export_dir / onnx_file(manifest)
    inputs, outputs = read_signature(model_path)
    if max_batch > 0 and batch_dim(inputs, outputs) is None:
        raise ArtifactError(
            f"{model_path}: not every input and output starts with one shared symbolic "
            "batch dim, so Triton cannot batch it; use --max-batch 0"
        )
    copies = _files_to_copy(manifest)
    missing = external_data_files(model_path) - set(copies)
    if missing:
        raise ArtifactError(
            f"{model_path.name} reads external data {sorted(missing)} that manifest.json "
            "does not list"
        )
    return inputs, outputs, copies


def _fill(tmp: Path, export_dir: Path, copies: list[str], config_text: str) -> None:
    """Writes the model folder's content into the staging directory ``tmp``."""
    version = tmp / VERSION_DIR
    version.mkdir()
    for rel in [*copies, MANIFEST_NAME]:
        (version / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(export_dir / rel, version / rel)
    (tmp / "config.pbtxt").write_text(config_text)
    write_run_record(tmp, "triton", {"source_export": str(export_dir.resolve())})


def _max_batch(fmt: str, max_batch: int | None) -> int:
    if max_batch is None:
        return DEFAULT_MAX_BATCH if fmt in BATCHED_FORMATS else 0
    if int(max_batch) < 0:
        raise ConfigError(f"--max-batch must be >= 0, got {max_batch}")
    if max_batch > 0 and fmt not in BATCHED_FORMATS:
        raise ConfigError(
            f"--max-batch {max_batch}: adjacency {fmt!r} takes one graph per request (its "
            "inputs have no batch dim), so Triton's max_batch_size must be 0"
        )
    return int(max_batch)


def _files_to_copy(manifest: dict[str, Any]) -> list[str]:
    """The ONNX model and its companions: every listed file but the other artifacts."""
    others = {v for k, v in (manifest.get("artifacts") or {}).items() if k != "onnx" and v}
    return sorted(n for n in manifest["files"] if n not in others and n != MANIFEST_NAME)
