"""``abkd_deploy.export.export``: run dir -> validated export directory (the CLI's API).

The pipeline: check the options and what the adjacency and artifact formats accept; load
the student and the dataset named in ``student.json``; draw the seeded fanout tables; build
the adjacency format's export-form module; score the PyTorch student (the reference); for
every artifact format write the files into a staging directory next to ``out_dir``, run the
format's own checks (ONNX: ``onnx.checker``, no Scatter op in a gather-only form), load
them back, validate them against PyTorch (:mod:`abkd_deploy.export.validate`) and score
them on the test split; then build the manifest (:mod:`abkd_deploy.manifest`), let each
format store what it keeps of it (ONNX metadata), hash the files and publish the directory
by one rename (:mod:`abkd_deploy.staging`). On any failure the staging directory is
removed: nothing is left on disk.

The pipeline never asks for a format's name: what differs between formats is declared by
their registry entries (:class:`~abkd_deploy.export.adjacency.AdjacencyFormat`,
:class:`~abkd_deploy.export.formats.ArtifactFormat`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abkd_deploy.errors import ConfigError
from abkd_deploy.export.adjacency import ADJACENCY, AdjacencyFormat, ExportContext, ExportSpec
from abkd_deploy.export.formats import DTYPES, ArtifactFormat, cast_module, runner_threads
from abkd_deploy.export.live_graph import write_live_graph
from abkd_deploy.export.manifest import provenance_from_run
from abkd_deploy.export.new_node_artifact import wants_new_nodes, write_new_nodes
from abkd_deploy.export.options import (
    check_options,
    check_out_dir,
    check_quantize,
    check_supported,
    resolve_formats,
)
from abkd_deploy.export.precompute import precompute_mode
from abkd_deploy.export.quantize import quantize_entry, quantize_tables
from abkd_deploy.export.reference import (
    ReferenceScores,
    export_context,
    load_run_dataset,
    reference_scores,
)
from abkd_deploy.export.snapshot import load_snapshot, snapshot_entry
from abkd_deploy.export.validate import RUNS, validate_artifact
from abkd_deploy.files import write_json
from abkd_deploy.manifest import MANIFEST_NAME, build_manifest, file_entries
from abkd_deploy.models import count_parameters, load_model
from abkd_deploy.names import DATASET_FAMILIES
from abkd_deploy.registry import check_name
from abkd_deploy.rundir import verify_run_dir
from abkd_deploy.scoring import score
from abkd_deploy.staging import staged_directory

#: An artifact's test score may differ from PyTorch's by this much before a note is printed.
SCORE_NOTE_GAP = 0.005


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    formats: Sequence[str] = ("onnx",),
    adjacency: str = "embedded",
    fanouts: str | int | Sequence[int | str] | None = None,
    opset: int = 18,
    atol: float | None = None,
    dtype: str = "float32",
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    precompute: bool | str = True,
    dataset: str | None = None,
    root: str | None = None,
    split: str | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Exports the student of ``run_dir`` into ``out_dir`` (see module docstring).

    Args:
        run_dir: A distill run directory holding ``student.safetensors``/``student.json``.
        out_dir: Export directory to create (refused if it exists, unless ``force``).
        formats: Any of ``onnx``, ``torchscript``, ``pt2``.
        adjacency: ``embedded`` (node ids in), ``ell`` (padded tables in) or ``coo``.
        fanouts: Neighbours per layer: ``"10,10"``, ``[10, 10]``, one value for every
            layer, or ``"max"`` (exact). ``None``: 10 per layer for ``embedded``, exact
            for ``ell`` (``coo`` is always exact).
        opset: ONNX opset (>= 16; ``coo`` needs >= 18 for scatter-add/max).
        atol: Largest accepted max-abs-diff vs PyTorch; ``None`` = 1e-4 for float32,
            1e-2 for float16.
        dtype: Artifact float dtype, ``float32`` or ``float16``.
        force: Replace an existing ``out_dir`` that a previous export wrote (and that
            holds nothing but the files its manifest lists).
        seed: Seed of the fanout tables and of the validation inputs.
        progress: Print steps and validation results to stderr.
        precompute: ``embedded`` ``gcn``/``sage`` students: store the outputs of layers
            ``1..L-1`` for every node (computed once here), so a request runs only the
            last layer (:mod:`abkd_deploy.export.precompute`). Same outputs. ``"all"``
            (``embedded`` only): store every node's outputs, the graph is a lookup.
        dataset: Embed this snapshot of the graph instead of the run's own dataset (same
            feature width, classes and metric; :mod:`abkd_deploy.export.snapshot`). The
            accuracy is then on this snapshot's test split.
        root: The snapshot's folder (with ``dataset``).
        split: The snapshot's split (with ``dataset``).
        quantize: ``None``/``"none"``, or ``"int8"`` (``embedded``, float32): the per-node
            tables (also those of ``new_nodes.onnx``) stored as int8 with a float32 scale
            per row, dequantised after the gather (:mod:`abkd_deploy.export.quantize`);
            validated with a tolerance relative to each output's scale, the accuracy
            change vs float32 PyTorch is logged and kept in the manifest.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ConfigError: a bad option (unknown format / adjacency / dtype / dataset, opset,
            fanout, existing ``out_dir``) or a snapshot that does not fit the student.
        CheckpointError: ``run_dir`` holds no usable student or names no dataset.
        ExportError / ValidationError: an artifact could not be produced or validated.
    """
    clock = _Stopwatch()
    log = _logger(progress)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dataset is not None:
        check_name("dataset", str(dataset).partition(":")[0].strip(), DATASET_FAMILIES)
    elif root is not None or split is not None:
        raise ConfigError("root and split describe a snapshot: give them with dataset")
    fmts = resolve_formats(formats)
    adj = ADJACENCY.get(adjacency)
    precompute_mode(precompute, adj.name)  # a bad value or `all` for ell/coo: refused now
    mode, rtol = check_quantize(quantize, adj.name, dtype)
    target = _Target(opset, dtype, check_options(adj, opset, dtype, atol), mode, rtol)
    verify_run_dir(run_dir)
    student, meta = load_model(run_dir, "student")
    check_out_dir(out_dir, force, run_dir)
    student = student.float().cpu().eval()
    if not student.exportable:
        raise ConfigError(
            f"export: {run_dir} holds a {student.arch} student, a teacher-only architecture "
            "with no export form; distill an rgcn or rsage student instead"
        )
    check_supported(adj, fmts, dtype, student.arch)
    provenance = provenance_from_run(run_dir, meta)
    if dataset is None:
        data = load_run_dataset(run_dir, meta, student)
    else:
        trained_on, metric = provenance["dataset"], provenance["metric"]
        data = load_snapshot(dataset, root, split, student, trained_on, metric)
        provenance["snapshot"] = snapshot_entry(dataset, root, split, data)
    clock.lap("load_s")
    ctx = export_context(adj, student, data, fanouts, seed, dtype, precompute)
    clock.lap("tables_s")
    log(
        f"export: {student.arch} student ({count_parameters(student):,} params), "
        f"{adj.name} adjacency, fanouts {ctx.fanouts}, {ctx.graph_entry()['num_nodes']:,} "
        f"{'target ' if ctx.typed else ''}nodes; formats "
        f"{', '.join(f.name for f in fmts)}"
    )
    # The reference first: its peak memory and the build's (precomputed states) do not add.
    ref = reference_scores(ctx, adj.exact_graph)
    clock.lap("reference_s")
    spec = adj.build(ctx)
    clock.lap("build_s")
    on = f" of snapshot {dataset!r}" if dataset is not None else ""
    log(
        f"  PyTorch student test{on} {data.metric}: {ref.student:.4f} with fanouts "
        f"{ctx.fanouts} ({ref.exact_graph:.4f} on the exact graph)"
    )
    with staged_directory(out_dir, force, sources=[run_dir]) as tmp:
        live = wants_new_nodes(ctx, adj.name, [f.name for f in fmts])
        spec.external_data = live  # refresh rewrites a live export's tables as raw arrays
        results = {f.name: _export_one(f, adj, spec, ctx, tmp, target, ref, log) for f in fmts}
        new_nodes, extra_files = None, []
        if live:
            new_nodes, extra_files = write_new_nodes(
                ctx,
                spec,
                tmp,
                target.opset,
                target.dtype,
                target.atol,
                log,
                target.quantize,
                target.rtol,
            )
            main = cast_module(spec.module, DTYPES[target.dtype])
            model = tmp / results["onnx"].artifact
            live_graph, graph_files = write_live_graph(ctx, tmp, model, main)
            extra_files += graph_files
        manifest = _manifest(adj, spec, ctx, target, ref, results, provenance)
        if new_nodes is not None:
            manifest["new_nodes"] = new_nodes
            manifest["live_graph"] = live_graph
        _write_manifest(tmp, manifest, fmts, results, clock, extra_files)
    log(
        f"export: wrote {out_dir} ({', '.join(manifest['files'])}) in "
        f"{manifest['timings']['total_s']:.1f} s"
    )
    return manifest


@dataclass(frozen=True)
class _Target:
    """What every artifact is written and validated for."""

    opset: int
    dtype: str
    atol: float
    quantize: str = "none"
    rtol: float = 0.0


@dataclass(frozen=True)
class _Result:
    """One validated artifact: main file, files, max abs diff per output, score, timings."""

    artifact: str
    files: list[str]
    max_abs_diff: dict[str, float]
    score: float
    timings: dict[str, float]


class _Stopwatch:
    """Seconds per pipeline stage (each lap since the previous one) and in total."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage], self.last = now - self.last, now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _export_one(
    fmt: ArtifactFormat,
    adj: AdjacencyFormat,
    spec: ExportSpec,
    ctx: ExportContext,
    tmp: Path,
    target: _Target,
    ref: ReferenceScores,
    log: Callable[[str], None],
) -> _Result:
    """Writes, checks, validates and scores one artifact format."""
    t0 = time.perf_counter()
    module = cast_module(spec.module, DTYPES[target.dtype])
    if target.quantize == "int8":
        module = quantize_tables(module)
    paths = fmt.export(module, spec, tmp / fmt.filename, target.opset)
    t1 = time.perf_counter()
    fmt.check(paths[0], adj)
    runner = fmt.load(paths[0], DTYPES[target.dtype], runner_threads())
    declared = None if fmt.output_names is None else fmt.output_names(paths[0])
    reference = spec.module if spec.reference is None else spec.reference
    diffs = validate_artifact(
        fmt.name,
        runner,
        reference,
        spec.validation,
        spec.output_names,
        target.atol,
        log,
        declared=declared,
        rtol=target.rtol,
    )
    t2 = time.perf_counter()
    acc = score(ctx.data.metric, ref.labels, spec.logits(runner))
    t3 = time.perf_counter()
    size = sum(p.stat().st_size for p in paths)
    log(
        f"  {fmt.name}: {', '.join(p.name for p in paths)} ({size / 2**20:.1f} MiB), "
        f"test {ctx.data.metric} {acc:.4f}"
    )
    gap = abs(acc - ref.student)
    if target.quantize != "none" or target.dtype != "float32":
        kind = target.dtype if target.quantize == "none" else target.quantize
        log(
            f"  {fmt.name}: {kind} accuracy change vs float32 PyTorch: "
            f"{acc - ref.student:+.4f} ({ref.student:.4f} -> {acc:.4f})"
        )
    elif gap > SCORE_NOTE_GAP:
        log(
            f"  note: {fmt.name} accuracy differs from PyTorch's by {gap:.4f} (argmax "
            "ties / reduced precision); the outputs themselves passed validation"
        )
    timings = {"export_s": t1 - t0, "validate_s": t2 - t1, "accuracy_s": t3 - t2}
    rounded = {k: round(v, 3) for k, v in timings.items()}
    return _Result(fmt.filename, [p.name for p in paths], diffs, acc, rounded)


def _manifest(
    adj: AdjacencyFormat,
    spec: ExportSpec,
    ctx: ExportContext,
    target: _Target,
    ref: ReferenceScores,
    results: dict[str, _Result],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the validated artifacts (without ``timings`` and ``files``)."""
    student, data = ctx.student, ctx.data
    return build_manifest(
        quantize=quantize_entry(target.quantize, spec.module),
        adjacency=adj.manifest_entry(ctx, spec),
        model={**student.config, "params": count_parameters(student)},
        graph=ctx.graph_entry(),
        opset=target.opset,
        dtype=target.dtype,
        inputs=spec.inputs,
        outputs=spec.outputs,
        artifacts={name: r.artifact for name, r in results.items()},
        provenance=provenance,
        accuracy={
            "metric": data.metric,
            "split": "test",
            "nodes": int(ctx.eval_ids.numel()),
            "pytorch_student": ref.student,
            "pytorch_student_exact_graph": ref.exact_graph,
            "exported": {name: r.score for name, r in results.items()},
        },
        validation={
            "atol": target.atol,
            "passed": True,
            "runs_per_input": RUNS,
            "input_sets": [label for label, _ in spec.validation],
            "max_abs_diff": {name: r.max_abs_diff for name, r in results.items()},
            **({"rtol": target.rtol} if target.rtol else {}),
        },
    )


def _write_manifest(
    tmp: Path,
    manifest: dict[str, Any],
    fmts: Sequence[ArtifactFormat],
    results: dict[str, _Result],
    clock: _Stopwatch,
    extra_files: Sequence[str] = (),
) -> None:
    """Adds timings, lets each format store the manifest (``finalize``), then adds the
    hashes of the artifacts' files (and ``extra_files``) and writes ``manifest.json`` into
    the staging directory."""
    manifest["timings"] = {k: round(v, 3) for k, v in clock.laps.items()}
    manifest["timings"].update({name: r.timings for name, r in results.items()})
    for fmt in fmts:
        fmt.finalize(tmp / fmt.filename, manifest)
    names = [f for r in results.values() for f in r.files] + list(extra_files)
    manifest["files"] = file_entries(tmp, names)
    manifest["timings"]["total_s"] = round(clock.total(), 3)
    write_json(tmp / MANIFEST_NAME, manifest)


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)
