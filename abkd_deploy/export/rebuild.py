"""Rebuild the export-form PyTorch module of an export directory (for eager baselines).

``bench`` compares the onnxruntime artifact with the *same computation* in PyTorch eager:
this rebuilds it from the manifest (run dir, adjacency format, fanouts and sampling
seed), so the fanout tables are exactly the exported ones.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from abkd_deploy.errors import CheckpointError
from abkd_deploy.export.adjacency import ADJACENCY
from abkd_deploy.export.manifest import read_manifest
from abkd_deploy.export.reference import export_context, load_run_dataset
from abkd_deploy.models import load_model


def build_export_module(export_dir: str | Path) -> nn.Module:
    """The float32 export-form module (eval mode, CPU) that ``export_dir`` was made from.

    Raises:
        ExportError: no readable manifest (:func:`abkd_deploy.manifest.read_manifest`).
        CheckpointError: the manifest names no run dir, or the run dir is gone.
    """
    manifest = read_manifest(export_dir)
    run_dir = (manifest.get("provenance") or {}).get("run_dir")
    if not run_dir or not (Path(run_dir) / "student.json").is_file():
        raise CheckpointError(
            f"{export_dir}: the manifest's run dir {run_dir!r} holds no student to rebuild from"
        )
    adj = manifest["adjacency"]
    fmt = ADJACENCY.get(adj["format"])
    student, meta = load_model(run_dir, "student")
    student = student.float().cpu().eval()
    data = load_run_dataset(Path(run_dir), meta, student)
    ctx = export_context(
        fmt,
        student,
        data,
        adj.get("fanouts") or None,  # None (exact formats): the format's own fanouts
        int(adj.get("sampling_seed") or 0),
        manifest.get("dtype", "float32"),
        precompute=adj.get("precompute") or bool(adj.get("precomputed_layers")),
    )
    return fmt.build(ctx).module.eval()
