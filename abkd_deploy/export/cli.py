"""Body of ``abkd-deploy export`` (kept out of ``abkd_deploy/cli.py`` so that the CLI
module does not import torch at start-up)."""

from __future__ import annotations

from typing import Any

import click

from abkd_deploy.export.api import export


def run_export(run_dir: str, out_dir: str, formats: tuple[str, ...], **kwargs: Any) -> None:
    """Runs :func:`abkd_deploy.export.export` and prints its result line.

    The steps and per-output validation details go to stderr as they happen; stdout gets
    the one result line (printed once), e.g. ``exported gcn student (embedded, fanouts
    10,10, float32, opset 18) -> exp: test accuracy PyTorch 0.9130, onnx 0.9130 (max abs
    diff 4.8e-07)``.
    """
    manifest = export(run_dir, out_dir, formats=formats or ("onnx",), progress=True, **kwargs)
    acc = manifest["accuracy"]
    adj = manifest["adjacency"]
    fanouts = ",".join(map(str, adj["fanouts"])) if adj["fanouts"] else "exact"
    exported = ", ".join(
        f"{name} {value:.4f} (max abs diff "
        f"{max(manifest['validation']['max_abs_diff'][name].values(), default=0.0):.1e})"
        for name, value in acc["exported"].items()
    )
    click.echo(
        f"exported {manifest['model']['arch']} student ({adj['format']}, fanouts {fanouts}, "
        f"{manifest['dtype']}, opset {manifest['opset']}) -> {out_dir}: test {acc['metric']} "
        f"PyTorch {acc['pytorch_student']:.4f}, {exported}"
    )
