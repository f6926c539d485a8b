"""``abkd-deploy`` command line: a thin click layer over the Python API.

Every command converts :class:`~abkd_deploy.errors.AbkdError` into a one-line
``error: ...`` on stderr and its exit code (2 for bad values, 1 for failures).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from abkd_deploy import __version__, names
from abkd_deploy.distill.specs import KDSpec, StudentSpec, TeacherSpec
from abkd_deploy.errors import AbkdError, ConfigError
from abkd_deploy.extras import missing_extra_message
from abkd_deploy.registry import check_name


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so staging dirs are removed."""

    signum = 15


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns package errors into ``error: <message>`` and the error's exit code.

    SIGTERM is handled like SIGINT: it raises (so every staging directory is removed on
    the way out), then the process exits with ``128 + signal`` (143; SIGINT 130). A
    second SIGTERM during the clean-up kills the process at once.
    """
    import signal

    def on_term(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise _Terminated

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import threading

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except AbkdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ModuleNotFoundError as exc:  # installed without the `train` extra
            ctx = click.get_current_context(silent=True)
            message = missing_extra_message(exc, ctx.info_name if ctx else None)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", int(signal.SIGINT))
            click.echo(f"interrupted ({signal.Signals(signum).name})", err=True)
            sys.exit(128 + signum)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper


def _check_dataset(name: str) -> None:
    """Checks ``--dataset``'s family (before any ``:``) against the torch-free name table."""
    check_name("dataset", str(name).partition(":")[0].strip(), names.DATASET_FAMILIES)


def _check_list(kind: str, values: str | tuple[str, ...], known: tuple[str, ...]) -> None:
    """Checks each name of a comma-separated string or a tuple of names."""
    items = values.split(",") if isinstance(values, str) else values
    for value in items:
        if str(value).strip():
            check_name(kind, str(value).strip(), known)


def _int_list(value: str, what: str) -> tuple[int, ...]:
    """``"10,10"`` -> ``(10, 10)``; a :class:`ConfigError` naming the option otherwise."""
    try:
        out = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"bad {what} {value!r}; expected comma-separated integers") from None
    if not out:
        raise ConfigError(f"bad {what} {value!r}; expected comma-separated integers")
    return out


def _force_option(help: str) -> Callable[..., Any]:
    return click.option("--force", is_flag=True, help=help)


_RUN_FORCE_HELP = (
    "Replace an existing --out written by a previous run of this tool (refused if it "
    "holds any file its run.json does not list, or overlaps a source)."
)


def _option_dest(f: dataclasses.Field) -> str:
    """Parameter name of a declared field's option: ``--abkd-dissimilarity`` ->
    ``abkd_dissimilarity``."""
    return f.metadata["cli"].split("/")[0].lstrip("-").replace("-", "_")


def _cli_fields(spec: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(spec) if f.metadata.get("cli")]


def spec_options(*specs: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options declared by the fields of the spec dataclasses ``specs``.

    A field's metadata (:func:`abkd_deploy.distill.specs.cli_field`) gives the option
    string and help; its type (``None`` stripped) gives the click type, ``choices`` a
    :class:`click.Choice`, ``path`` a directory path, ``bounds`` a
    :class:`click.FloatRange`; ``--x/--no-x`` is a boolean pair.
    """
    opts = []
    for spec in specs:
        hints = typing.get_type_hints(spec)
        for f in _cli_fields(spec):
            kinds = [
                t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)
            ]
            kw: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help")}
            if f.default is not None:
                kw["show_default"] = True
            if f.metadata.get("choices"):
                kw["type"] = click.Choice(list(f.metadata["choices"]))
            elif f.metadata.get("bounds"):
                kw["type"] = click.FloatRange(**f.metadata["bounds"])
            elif f.metadata.get("path"):
                kw["type"] = click.Path(file_okay=False)
            elif kinds[0] is not bool:
                kw["type"] = kinds[0]
            opts.append(click.option(f.metadata["cli"], _option_dest(f), **kw))

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return decorate


def _pop_spec(spec: type, kw: dict[str, Any]) -> Any:
    """Builds ``spec`` from (and removes) the options :func:`spec_options` declared."""
    return spec(**{f.name: kw.pop(_option_dest(f)) for f in _cli_fields(spec)})


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


_nproc_option = click.option(
    "--nproc",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Data-parallel worker processes on this machine (gloo on CPU, NCCL on GPU); "
    "under torchrun leave it at 1.",
)


@main.command()
@dataset_options
@click.option(
    "--arch",
    default="gcnii",
    show_default=True,
    help="gcn, sage, gat, gcnii or mlp; typed graphs: rgcn, rsage or res-rgcn (deep teachers).",
)
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
@_nproc_option
@_force_option(_RUN_FORCE_HELP)
@_friendly
def teacher(**kw: Any) -> None:
    """Train a teacher GNN with early stopping on validation accuracy."""
    _check_dataset(kw["dataset"])
    check_name("architecture", kw["arch"], names.ARCHITECTURES)
    nproc = kw.pop("nproc")
    from abkd_deploy.distill.distributed import launch, under_torchrun
    from abkd_deploy.distill.teacher import train_teacher

    if nproc > 1 or under_torchrun():
        metrics = launch(nproc, job="teacher", train=_train_config(kw), **kw)
        if metrics is None:  # a torchrun rank other than 0: rank 0 reports
            return
    else:
        metrics = train_teacher(train=_train_config(kw), **kw)
    click.echo(
        f"teacher {metrics['arch']}: {metrics['params']:,} params, "
        f"val {metrics['metric']} {metrics['val_score']:.4f}, "
        f"test {metrics['metric']} {metrics['test_score']:.4f} "
        f"(best epoch {metrics['best_epoch']}, {metrics['seconds']:.1f} s) -> {kw['out']}"
    )


def _train_config(kw: dict[str, Any]) -> Any:
    """Pops the options of :func:`training_options` into a ``TrainConfig`` (imports torch)."""
    from abkd_deploy.distill.trainer import TrainConfig

    return TrainConfig(
        epochs=kw.pop("epochs"),
        patience=kw.pop("patience"),
        lr=kw.pop("lr"),
        weight_decay=kw.pop("weight_decay"),
        batch_size=kw.pop("batch_size"),
        fanouts=_int_list(kw.pop("fanouts"), "--fanouts"),
        device=kw.pop("device"),
        seed=kw.pop("seed"),
    )


def distill_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Teacher, student and KD options shared by ``distill`` and ``compare``.

    Declared once, by the fields of :mod:`abkd_deploy.distill.specs`.
    """
    fn = click.option(
        "--seeds",
        type=click.IntRange(1),
        default=1,
        show_default=True,
        help="Number of seeds (--seed, --seed+1, ...); reports mean +- std.",
    )(fn)
    fn = click.option(
        "--teacher-lr",
        type=float,
        default=1e-3,
        show_default=True,
        help="Learning rate of the teacher in joint mode.",
    )(fn)
    return spec_options(TeacherSpec, StudentSpec, KDSpec)(fn)


def _check_distill_names(kw: dict[str, Any]) -> None:
    """Dataset and architecture names of ``distill``/``compare``, before torch is imported."""
    _check_dataset(kw["dataset"])
    if kw["teacher"] is None:
        check_name("architecture", kw["teacher_arch"], names.ARCHITECTURES)
    check_name("architecture", kw["student_arch"], names.ARCHITECTURES)


def _distill_specs(kw: dict[str, Any]) -> dict[str, Any]:
    """Pops the options of ``distill``/``compare`` into the keyword arguments of
    :func:`abkd_deploy.distill.run.distill` (specs, training settings, dataset, seeds)."""
    teacher_lr = kw.pop("teacher_lr")
    train = _train_config(kw)
    train.teacher_lr = teacher_lr
    return {
        "teacher": _pop_spec(TeacherSpec, kw),
        "student": _pop_spec(StudentSpec, kw),
        "kd": _pop_spec(KDSpec, kw),
        "train": train,
        "dataset": kw.pop("dataset"),
        "root": kw.pop("root"),
        "split": kw.pop("split"),
        "seeds": kw.pop("seeds"),
        "force": kw.pop("force"),
    }


@main.command()
@dataset_options
@distill_options
@click.option(
    "--method",
    default="abkd",
    show_default=True,
    help="ce, kd, fitnet, at, lsp, gcrd, abkd, or all (= compare).",
)
@training_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/distill",
    show_default=True,
    help="Output run directory.",
)
@_nproc_option
@_force_option(_RUN_FORCE_HELP)
@_friendly
def distill(**kw: Any) -> None:
    """Distill a teacher into a compact student (ABKD or a baseline)."""
    method, out, nproc = kw.pop("method"), kw.pop("out"), kw.pop("nproc")
    method = check_name("KD method", method, (*names.KD_METHODS, "all"))
    _check_distill_names(kw)
    specs = _distill_specs(kw)
    if method == "all":
        if nproc > 1:
            raise ConfigError("--nproc runs one --method; --method all (compare) runs alone")
        _run_compare(specs, None, out)
        return
    from abkd_deploy.distill.distributed import launch, under_torchrun
    from abkd_deploy.distill.run import distill as run_distill

    specs["kd"].method = method
    if nproc > 1 or under_torchrun():
        m = launch(nproc, out=out, **specs)
        if m is None:  # a torchrun rank other than 0: rank 0 reports
            return
    else:
        m = run_distill(out=out, **specs)
    s = m["student"]
    click.echo(
        f"{method}: student {s['arch']} {s['params']:,} params ({m['compression_ratio']:.1f}x "
        f"smaller), test {m['metric']} {s['test_score']:.4f} +- {s['test_score_std']:.4f} over "
        f"{len(m['seeds'])} seed(s); teacher {m['teacher']['test_score']:.4f} -> {out}"
    )


@main.command()
@dataset_options
@distill_options
@click.option("--methods", default="ce,kd,fitnet,at,lsp,gcrd,abkd", show_default=True)
@training_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/compare", show_default=True)
@_force_option(_RUN_FORCE_HELP)
@_friendly
def compare(**kw: Any) -> None:
    """Run every KD method on the same teacher and seeds; write a comparison table."""
    methods, out = kw.pop("methods"), kw.pop("out")
    _check_list("KD method", methods, names.KD_METHODS)
    _check_distill_names(kw)
    _run_compare(_distill_specs(kw), methods, out)


def _run_compare(specs: dict[str, Any], methods: str | None, out: str) -> None:
    from abkd_deploy.distill.compare import DEFAULT_METHODS, format_table
    from abkd_deploy.distill.compare import compare as run_compare

    names = (
        tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else DEFAULT_METHODS
    )
    rows = run_compare(methods=names, out=out, **specs)
    click.echo(format_table(rows))


def _destination_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--out DIR`` / ``--repo REPO/<model>`` of the commands that write an export."""
    fn = click.option(
        "--repo",
        "repo_dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Instead of --out: publish as the next version of the model directory "
        "REPO/<model> (max(version) + 1, atomically; what `serve REPO/<model>` hot-swaps to).",
    )(fn)
    return click.option(
        "--out",
        "out_dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Export directory to create (refused if it exists, unless --force).",
    )(fn)


def _check_destination(out_dir: str | None, repo_dir: str | None, force: bool) -> None:
    from abkd_deploy.errors import ConfigError

    if (out_dir is None) == (repo_dir is None):
        raise ConfigError("give exactly one of --out DIR and --repo REPO/<model>")
    if repo_dir is not None and force:
        raise ConfigError("--force is for --out; --repo always writes a new version")


def _publish(
    write: Callable[[Any], dict[str, Any]],
    out_dir: str | None,
    repo_dir: str | None,
    sources: list[str | None],
) -> tuple[dict[str, Any], str]:
    """Runs ``write`` into ``out_dir``, or as the next version of ``repo_dir`` (which may
    not overlap ``sources``); returns the manifest and where it went, for the result line."""
    if repo_dir is None:
        return write(out_dir), str(out_dir)
    from abkd_deploy.model_repo import write_version
    from abkd_deploy.staging import check_sources

    check_sources(repo_dir, sources)
    version, path, manifest = write_version(repo_dir, write)
    return manifest, f"{path} (version {version})"


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@_destination_options
@click.option(
    "--format",
    "formats",
    multiple=True,
    default=("onnx",),
    show_default=True,
    help="onnx, torchscript or pt2; repeat for several.",
)
@click.option(
    "--adjacency",
    default="embedded",
    show_default=True,
    help="embedded (node ids in), ell (padded neighbour tables in) or coo.",
)
@click.option(
    "--fanout",
    "fanouts",
    default=None,
    help="Neighbours per layer, e.g. 10,10, or max (exact). "
    "Default: 10 per layer for embedded, max for ell.",
)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 16).")
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Max abs diff accepted vs PyTorch. Default: 1e-4 (float32), 1e-2 (float16).",
)
@click.option("--dtype", default="float32", show_default=True, help="float32 or float16.")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    show_default=True,
    help="int8 (embedded, float32): per-node tables (>= 8 columns, also in new_nodes.onnx) "
    "as int8 with a float32 scale per row, dequantised after the gather; weights stay "
    "float32. Validated within 2%% of each output's scale; the accuracy change is printed.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the fanout tables and validation inputs.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing --out written by a previous export (refused if it holds "
    "any file its manifest does not list, or overlaps RUN_DIR).",
)
@click.option(
    "--precompute",
    type=click.Choice(["hidden", "all", "none"]),
    default="hidden",
    show_default=True,
    help="embedded: hidden stores layers 1..L-1's outputs for every node (gcn/sage), so a "
    "request runs only the last layer; all stores every node's final outputs (any arch: "
    "the model is one lookup); none gathers the L-hop tree per request. Same outputs.",
)
@click.option("--no-precompute", is_flag=True, help="Same as --precompute none.")
@click.option(
    "--dataset",
    default=None,
    help="Embed this snapshot of the graph instead of the run's own dataset (same feature "
    "width and classes; accuracy is on its test split), e.g. csbm:num_nodes=2000,seed=1.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="With --dataset: folder holding the snapshot's files.",
)
@click.option("--split", default=None, help="With --dataset: the snapshot's split.")
@_friendly
def export(
    run_dir: str, out_dir: str | None, repo_dir: str | None, formats: tuple[str, ...], **kwargs: Any
) -> None:
    """Export the student of RUN_DIR, validated against PyTorch, into --out (or --repo)."""
    from abkd_deploy.errors import ConfigError

    _check_destination(out_dir, repo_dir, kwargs["force"])
    _check_list("export format", formats, names.EXPORT_FORMATS)
    check_name("adjacency format", kwargs["adjacency"], names.ADJACENCY_FORMATS)
    if kwargs.pop("no_precompute"):
        kwargs["precompute"] = "none"
    check_name("dtype", kwargs["dtype"], names.EXPORT_DTYPES)
    if kwargs["dataset"] is not None:
        _check_dataset(kwargs["dataset"])
    elif kwargs["root"] is not None or kwargs["split"] is not None:
        raise ConfigError("--root and --split describe a snapshot: give them with --dataset")
    from abkd_deploy.export.api import export as run_export

    def write(out: Any) -> dict[str, Any]:
        # steps and per-output validation details go to stderr as they happen; stdout gets
        # this one result line
        return run_export(run_dir, out, formats=formats or ("onnx",), progress=True, **kwargs)

    manifest, out_dir = _publish(write, out_dir, repo_dir, sources=[run_dir])
    acc, adj = manifest["accuracy"], manifest["adjacency"]
    mode = (manifest.get("quantize") or {}).get("mode", "none")
    quantized = f", {mode} tables" if mode != "none" else ""
    snapshot = manifest["provenance"].get("snapshot")
    on = f" of snapshot {snapshot['name']!r}" if snapshot else ""
    fanouts = ",".join(map(str, adj["fanouts"])) if adj["fanouts"] else "exact"
    exported = ", ".join(
        f"{name} {value:.4f} (max abs diff "
        f"{max(manifest['validation']['max_abs_diff'][name].values(), default=0.0):.1e})"
        for name, value in acc["exported"].items()
    )
    click.echo(
        f"exported {manifest['model']['arch']} student ({adj['format']}, fanouts {fanouts}, "
        f"{manifest['dtype']}{quantized}, opset {manifest['opset']}) -> {out_dir}: test{on} "
        f"{acc['metric']} PyTorch {acc['pytorch_student']:.4f}, {exported}"
    )


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--delta",
    "delta",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Delta .npz: add_edges, remove_edges, new_x, update_ids/update_x (docs/FORMATS.md).",
)
@_destination_options
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="The student's run directory (default: the one the export records).",
)
@click.option("--force", is_flag=True, help="Replace an existing --out written by abkd-deploy.")
@_friendly
def refresh(
    export_dir: str,
    delta: str,
    out_dir: str | None,
    repo_dir: str | None,
    run_dir: str | None,
    force: bool,
) -> None:
    """Apply a graph delta to EXPORT_DIR, recomputing only the rows it can reach.

    EXPORT_DIR is an embedded gcn/sage ONNX export, or a model directory REPO/<model>
    (its newest version is refreshed). The result equals a full export on the updated
    graph and is validated the same way.
    """
    from abkd_deploy.model_repo import is_model_dir, list_versions

    _check_destination(out_dir, repo_dir, force)
    source = Path(export_dir)
    if is_model_dir(source):
        source = source / str(list_versions(source)[-1])
    from abkd_deploy.export.refresh import refresh as run_refresh

    def write(out: Any) -> dict[str, Any]:
        return run_refresh(source, delta, out, run_dir=run_dir, force=force, progress=True)

    # the source version may lie inside --repo (the usual case): only the run is checked
    manifest, out_dir = _publish(write, out_dir, repo_dir, sources=[run_dir])
    d = manifest["provenance"]["refresh"]["delta"]
    acc = manifest["accuracy"]
    click.echo(
        f"refreshed {source} -> {out_dir}: +{d['new_nodes']} nodes, +{d['added_edges']} / "
        f"-{d['removed_edges']} edges, {d['updated_features']} feature updates; "
        f"{manifest['graph']['num_nodes']:,} nodes; test {acc['metric']} "
        f"{acc['exported']['onnx']:.4f} (max abs diff "
        f"{max(manifest['validation']['max_abs_diff']['onnx'].values()):.1e})"
    )


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N (cuda that cannot run on CUDA is an error).",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads.")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Node ids per model run (micro-batch size cap).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0),
    default=2.0,
    show_default=True,
    help="Upper bound on the extra wait for company; the model never waits when idle unless "
    "--min-batch > 1.",
)
@click.option(
    "--min-batch",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Node ids worth waiting for (up to --max-wait-ms) before a model run; 1: never wait.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Server processes on the port (each loads the model; /metrics sums all workers).",
)
@click.option(
    "--http",
    type=click.Choice(["auto", "httptools", "h11"]),
    default="auto",
    show_default=True,
    help="HTTP parser (auto: httptools when installed, else h11).",
)
@click.option(
    "--max-ids",
    type=click.IntRange(1),
    default=None,
    help="Node ids per request (default: --max-batch); more get HTTP 413.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a connection may take to send a request's headers (counted from connect "
    "or the previous response); then it is closed.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a request's body may take to arrive; then HTTP 408 and close.",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=4096,
    show_default=True,
    help="Concurrent connections served; requests beyond it get HTTP 503.",
)
@click.option(
    "--graceful-timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="On SIGTERM/SIGINT, seconds in-flight requests may still take; requests cut off "
    "get HTTP 503 and the exit status is 1.",
)
@click.option(
    "--engine",
    type=click.Choice(["builtin", "ray"]),
    default="builtin",
    show_default=True,
    help="builtin: this package's server; ray: a Ray Serve application (the ray extra; "
    "Ray's proxy owns the connections: of the timeouts only --body-timeout applies, and "
    "--min-batch, --http and --workers do not).",
)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="--engine ray: model replicas, each with its own @serve.batch micro-batcher.",
)
@click.option(
    "--ray-address",
    default=None,
    help="--engine ray: an existing Ray cluster (default: start a local Ray instance).",
)
@click.option(
    "--poll-s",
    type=click.FloatRange(0, min_open=True),
    default=2.0,
    show_default=True,
    help="EXPORT_DIR a model directory REPO/<model> of version folders: seconds between "
    "scans for new and removed versions (the newest valid one is served, swapped live).",
)
@_friendly
def serve(
    export_dir: str,
    host: str,
    port: int,
    device: str,
    threads: int | None,
    max_batch: int,
    max_wait_ms: float,
    min_batch: int,
    workers: int,
    http: str,
    max_ids: int | None,
    header_timeout: float,
    body_timeout: float,
    keep_alive: float,
    max_connections: int,
    graceful_timeout: float,
    engine: str,
    replicas: int,
    ray_address: str | None,
    poll_s: float,
) -> None:
    """Serve EXPORT_DIR over HTTP: POST /v1/predict, GET /healthz, GET /metrics.

    EXPORT_DIR is an export directory, or a model directory REPO/<model> whose integer
    version folders each hold one export: the newest valid version is served and new or
    removed versions are picked up while running (docs/FORMATS.md "Model repository").
    """
    from abkd_deploy.errors import ConfigError
    from abkd_deploy.model_repo import is_model_dir
    from abkd_deploy.serve.limits import HttpLimits
    from abkd_deploy.serve.server import serve as run_server

    if engine == "ray" and is_model_dir(export_dir):
        raise ConfigError(
            "--engine ray serves one export directory; a model directory (hot swap) needs "
            "--engine builtin"
        )
    if engine == "ray":
        from abkd_deploy.serve.ray_engine import serve_ray

        if workers > 1:
            raise ConfigError("--workers is for --engine builtin; with --engine ray use --replicas")
        serve_ray(
            export_dir,
            replicas=replicas,
            ray_address=ray_address,
            host=host,
            port=port,
            device=device,
            threads=threads,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_ids=max_ids,
            limits=HttpLimits(body_timeout_s=body_timeout),
        )
        return
    if replicas > 1 or ray_address:
        raise ConfigError("--replicas and --ray-address need --engine ray")
    run_server(
        export_dir,
        host=host,
        port=port,
        device=device,
        threads=threads,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        min_batch=min_batch,
        workers=workers,
        http=http,
        max_ids=max_ids,
        poll_s=poll_s,
        limits=HttpLimits(
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            keep_alive_s=keep_alive,
            max_connections=max_connections,
            graceful_timeout_s=graceful_timeout,
        ),
    )


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "repo",
    required=True,
    type=click.Path(file_okay=False),
    help="Triton model repository (created if missing; other models in it are left alone).",
)
@click.option("--name", default=None, help="Model name (default: EXPORT_DIR's name).")
@click.option(
    "--max-batch",
    type=int,
    default=None,
    help="max_batch_size: node ids per model run (embedded; default 1024). "
    "ell/coo take one graph per request: 0, the default.",
)
@click.option("--instances", default="cpu:1", show_default=True, help="cpu:N or gpu:N.")
@click.option(
    "--max-queue-delay-us",
    type=int,
    default=2000,
    show_default=True,
    help="dynamic_batching: how long a request waits for others to join its batch.",
)
@click.option("--force", is_flag=True, help="Replace REPO/NAME if abkd-deploy wrote it.")
@_friendly
def triton(export_dir: str, repo: str, **kw: Any) -> None:
    """Write a Triton Inference Server model repository (onnxruntime_onnx) for EXPORT_DIR."""
    from abkd_deploy.serve.triton import write_triton_repo

    m = write_triton_repo(export_dir, repo, **kw)
    batching = f"max_batch_size {m.max_batch_size}" + (
        ", dynamic batching" if m.max_batch_size else " (one graph per request)"
    )
    click.echo(
        f"wrote Triton model {m.name!r} ({batching}, {m.instances.count} x "
        f"{m.instances.kind}) -> {m.path}"
    )


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--teacher",
    type=click.Path(file_okay=False),
    default=None,
    help="Run dir with teacher.safetensors (default: the export's run dir).",
)
@click.option("--batch-sizes", default="1,64,1024", show_default=True)
@click.option(
    "--models",
    default="teacher-torch,student-torch,student-torch-export,student-onnx",
    show_default=True,
)
@click.option(
    "--requests",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="Request batches per batch size (each trial replays them).",
)
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option(
    "--trials",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Timed passes; reported numbers are medians over trials.",
)
@click.option(
    "--trial-seconds",
    type=float,
    default=3.0,
    show_default=True,
    help="Stop a pass early after this long (keeping >= 3 requests).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="Intra-op threads (default: all cores)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write REPORT.json plus REPORT.md and REPORT.png.",
)
@click.option(
    "--baseline",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A previous report: exit 1 if a metric regressed beyond the tolerance.",
)
@click.option(
    "--max-regression",
    type=click.FloatRange(0),
    default=0.15,
    show_default=True,
    help="Tolerated relative slowdown of medians vs the baseline.",
)
@click.option(
    "--http",
    "http_on",
    is_flag=True,
    help="Also measure over loopback HTTP: `abkd-deploy serve` (started here) and a bare "
    "FastAPI app answering the same bytes (the floor), with closed-loop clients.",
)
@click.option(
    "--http-concurrency",
    default="1,8,32",
    show_default=True,
    help="Concurrent clients (keep-alive connections) of the HTTP cells.",
)
@click.option(
    "--http-batch-sizes", default="1,64", show_default=True, help="Node ids per HTTP request."
)
@click.option(
    "--http-requests",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Timed HTTP requests per trial and cell (all clients together).",
)
@click.option(
    "--http-workers",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Server processes of serve (--workers) and of the floor app.",
)
@click.option(
    "--http-client-processes",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Processes the HTTP clients are spread over.",
)
@_friendly
def bench(export_dir: str, **kw: Any) -> None:
    """Latency, memory and accuracy of the student (onnxruntime, eager) vs the teacher."""
    models = tuple(m.strip() for m in kw.pop("models").split(",") if m.strip())
    _check_list("bench model", models, names.BENCH_MODELS)
    _require_training_stack()
    if kw["out"]:  # a bad --out is refused before the benchmark runs
        _check_bench_out(kw["out"], export_dir, kw["teacher"])
    from abkd_deploy.serve.bench import bench as run_bench
    from abkd_deploy.serve.bench import format_markdown, write_report
    from abkd_deploy.serve.bench_http import HttpOptions

    out, baseline, tol = kw.pop("out"), kw.pop("baseline"), kw.pop("max_regression")
    sizes = _int_list(kw.pop("batch_sizes"), "--batch-sizes")
    http = HttpOptions(
        concurrency=_int_list(kw.pop("http_concurrency"), "--http-concurrency"),
        batch_sizes=_int_list(kw.pop("http_batch_sizes"), "--http-batch-sizes"),
        requests=kw.pop("http_requests"),
        workers=kw.pop("http_workers"),
        client_processes=kw.pop("http_client_processes"),
    )
    if not kw.pop("http_on"):
        http = None
    report = run_bench(export_dir, batch_sizes=sizes, models=models, http=http, **kw)
    click.echo(format_markdown(report))
    if out:
        paths = write_report(report, out)
        click.echo("wrote " + ", ".join(str(p) for p in paths))
    if baseline:
        from abkd_deploy.serve.gate import compare_reports, format_regressions, load_report

        regressions = compare_reports(load_report(baseline), report, max_regression=tol)
        click.echo(format_regressions(regressions, tol))
        if regressions:
            sys.exit(1)


def _require_training_stack() -> None:
    """``bench`` reads the test split and runs PyTorch workers: without the ``train`` extra
    it stops here, with the hint :func:`_friendly` gives for a missing training package."""
    import importlib.util

    for module in ("torch", "torch_geometric"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _check_bench_out(out: str, export_dir: str, teacher: str | None) -> None:
    """``bench --out``: the rules :func:`~abkd_deploy.serve.bench.write_report` applies,
    checked up front (the directories benchmarked: the export and its run/teacher dir)."""
    from abkd_deploy.serve.report_path import check_report_path

    run_dir = teacher
    if run_dir is None:
        try:
            from abkd_deploy.serve.manifest import load_manifest

            run_dir = load_manifest(export_dir).get("provenance", {}).get("run_dir")
        except AbkdError:  # a bad export dir: bench itself says what is wrong with it
            run_dir = None
    check_report_path(out, (export_dir, run_dir))


if __name__ == "__main__":  # pragma: no cover
    main()
