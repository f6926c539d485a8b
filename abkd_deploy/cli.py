"""``abkd-deploy`` command line: a thin click layer over the Python API.

Every command converts :class:`~abkd_deploy.errors.AbkdError` into a one-line
``error: ...`` on stderr and its exit code (2 for bad values, 1 for failures).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from abkd_deploy import __version__
from abkd_deploy.errors import AbkdError


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns package errors into ``error: <message>`` and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AbkdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--dataset``, ``--root``, ``--split``."""
    fn = click.option(
        "--split",
        default=None,
        help="Split: index for multi-split datasets (default 0); "
        "public/full/random for Planetoid (default public).",
    )(fn)
    fn = click.option(
        "--root",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder holding the dataset's files (not needed for csbm).",
    )(fn)
    fn = click.option(
        "--dataset",
        default="csbm",
        show_default=True,
        help="csbm[:k=v,...], ogbn-arxiv|products|mag, planetoid:<Name>, "
        "heterophilous:<Name>, npz:<path>.",
    )(fn)
    return fn


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Optimiser, schedule, device and seed options shared by teacher and distill."""
    opts = [
        click.option("--epochs", type=click.IntRange(1), default=300, show_default=True),
        click.option(
            "--patience",
            type=click.IntRange(1),
            default=100,
            show_default=True,
            help="Early stopping: epochs without a better validation score.",
        ),
        click.option(
            "--lr", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True
        ),
        click.option("--weight-decay", type=click.FloatRange(0), default=5e-4, show_default=True),
        click.option(
            "--batch-size",
            type=click.IntRange(0),
            default=0,
            show_default=True,
            help="Target nodes per mini-batch; 0 = full batch.",
        ),
        click.option(
            "--fanouts",
            default="10,10",
            show_default=True,
            help="Neighbours sampled per layer in mini-batch mode.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto, cpu, cuda or cuda:N (cuda without CUDA is an error).",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abkd-deploy")
def main() -> None:
    """Distill a GNN with ABKD, export the student to ONNX, serve and benchmark it.

    Pipeline: teacher -> distill -> export -> serve / bench.
    """


@main.command()
@dataset_options
@click.option("--arch", default="gcnii", show_default=True, help="gcn, sage, gat, gcnii or mlp.")
@click.option("--layers", type=int, default=16, show_default=True)
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--dropout", type=float, default=None, help="Default: 0.6 for gcnii, 0.5 otherwise.")
@training_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/teacher",
    show_default=True,
    help="Output run directory.",
)
@_friendly
def teacher(**kwargs: Any) -> None:
    """Train a teacher GNN with early stopping on validation accuracy."""
    from abkd_deploy.distill.teacher import train_teacher_cli

    train_teacher_cli(**kwargs)


def _not_built(name: str) -> Callable[..., None]:
    @main.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args: tuple[str, ...]) -> None:
        click.echo(f"error: `abkd-deploy {name}` is not built yet", err=True)
        sys.exit(1)

    cmd.__doc__ = f"(not built yet) {name}."
    return cmd


distill = _not_built("distill")
export = _not_built("export")
serve = _not_built("serve")
bench = _not_built("bench")


if __name__ == "__main__":  # pragma: no cover
    main()
