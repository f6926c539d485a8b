"""Body of ``abkd-deploy export`` (kept out of ``abkd_deploy/cli.py`` so that the CLI
module does not import torch at start-up)."""

from __future__ import annotations

from typing import Any

import click

from abkd_deploy.export.api import export


def run_export(run_dir: str, out_dir: str, formats: tuple[str, ...], **kwargs: Any) -> None:
    """Runs :func:`abkd_deploy.export.export` and prints a one-screen summary."""
    manifest = export(run_dir, out_dir, formats=formats or ("onnx",), progress=True, **kwargs)
    acc = manifest["accuracy"]
    adj = manifest["adjacency"]
    fanouts = ",".join(map(str, adj["fanouts"])) if adj["fanouts"] else "exact"
    click.echo(
        f"exported {manifest['model']['arch']} student ({adj['format']}, fanouts {fanouts}, "
        f"{manifest['dtype']}, opset {manifest['opset']}) -> {out_dir}"
    )
    click.echo(f"  test {acc['metric']}: PyTorch student {acc['pytorch_student']:.4f}")
    for name, value in acc["exported"].items():
        diffs = manifest["validation"]["max_abs_diff"][name]
        worst = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        click.echo(f"  {name:<12} {value:.4f}  (max abs diff vs PyTorch: {worst})")
