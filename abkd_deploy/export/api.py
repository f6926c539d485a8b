"""``abkd_deploy.export.export``: run dir -> validated export directory (the CLI's API).

Steps: check the options; load the student and the dataset named in ``student.json``;
draw the seeded fanout tables; build the adjacency format's export-form module; for
every artifact format write the files into a temporary directory next to ``out_dir``,
check them (``onnx.checker`` full check; no Scatter op in ``ell``/``embedded`` graphs),
load them back and validate them against PyTorch (:mod:`abkd_deploy.export.validate`),
and score them on the test split; then write the manifest and rename the temporary
directory onto ``out_dir``. On any failure the temporary directory is removed: nothing
is left on disk.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from abkd_deploy.data.csr import CSR
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.errors import ConfigError, ExportError
from abkd_deploy.export.adjacency import ADJACENCY, ExportContext, ExportSpec
from abkd_deploy.export.formats import DTYPES, ArtifactFormat, get_format
from abkd_deploy.export.manifest import (
    MANIFEST_NAME,
    build_manifest,
    file_entries,
    provenance_from_run,
)
from abkd_deploy.export.options import (
    check_options,
    check_out_dir,
    parse_fanouts,
    resolve_formats,
)
from abkd_deploy.export.reference import (
    eval_ids,
    exact_graph_score,
    load_run_dataset,
    student_logits,
)
from abkd_deploy.export.validate import validate_artifact
from abkd_deploy.metrics import score
from abkd_deploy.models import count_parameters, load_model
from abkd_deploy.rundir import verify_run_dir
from abkd_deploy.staging import staged_directory
from abkd_deploy.utils import write_json


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
    precompute: bool = True,
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
            last layer (:mod:`abkd_deploy.export.precompute`). Same outputs.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ConfigError: a bad option (unknown format / adjacency / dtype, opset, fanout,
            existing ``out_dir``).
        CheckpointError: ``run_dir`` holds no usable student or names no dataset.
        ExportError / ValidationError: an artifact could not be produced or validated.
    """
    start = time.perf_counter()
    log = _logger(progress)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    fmts = resolve_formats(formats)
    adj = ADJACENCY.get(adjacency)
    atol = check_options(adj.name, opset, dtype, atol)
    verify_run_dir(run_dir)
    student, meta = load_model(run_dir, "student")
    check_out_dir(out_dir, force, run_dir)
    student = student.float().cpu().eval()
    if dtype == "float16" and student.arch == "gat" and adj.name != "coo":
        raise ConfigError(
            "gat students cannot be exported as float16 in ell/embedded form (the attention "
            "mask uses -1e9, which overflows float16); use --dtype float32"
        )
    if dtype == "float16" and adj.name == "coo" and any(f.name == "onnx" for f in fmts):
        raise ConfigError(
            "coo adjacency cannot be exported to onnx as float16: onnxruntime's CPU "
            "ScatterElements has no float16 'add'; use --dtype float32 or --adjacency ell"
        )
    data = load_run_dataset(run_dir, meta, student)
    stages = {"load_s": time.perf_counter() - start}
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    default = adj.default_fanout if fanouts is None else fanouts
    ks = parse_fanouts(default, student.num_layers, csr.max_degree)
    if adj.name == "coo":
        ks = [max(1, csr.max_degree)] * student.num_layers
    sampler = NeighborSampler(csr, ks, student.norm, seed=seed)
    stages["tables_s"] = time.perf_counter() - start - sum(stages.values())
    scored = eval_ids(data, seed)
    ctx = ExportContext(student, data, csr, ks, sampler, scored, dtype, precompute)
    log(
        f"export: {student.arch} student ({count_parameters(student):,} params), "
        f"{adj.name} adjacency, fanouts {ks}, {data.num_nodes:,} nodes; formats "
        f"{', '.join(f.name for f in fmts)}"
    )
    spec = adj.build(ctx)
    stages["build_s"] = time.perf_counter() - start - sum(stages.values())
    y = data.y[scored].numpy()
    acc_student = score(data.metric, y, student_logits(ctx, adj.name))
    acc_exact = exact_graph_score(student, data, csr, scored)
    stages["reference_s"] = time.perf_counter() - start - sum(stages.values())
    log(
        f"  PyTorch student test {data.metric}: {acc_student:.4f} with fanouts {ks} "
        f"({acc_exact:.4f} on the exact graph)"
    )

    with staged_directory(out_dir, force, sources=[run_dir]) as tmp:
        results = {}
        for fmt in fmts:
            results[fmt.name] = _export_one(fmt, spec, ctx, tmp, opset, dtype, atol, y, log)
            gap = abs(results[fmt.name]["accuracy"] - acc_student)
            if gap > 0.005:
                log(
                    f"  note: {fmt.name} accuracy differs from PyTorch's by {gap:.4f} (argmax "
                    "ties / reduced precision); the outputs themselves passed validation"
                )
        manifest = build_manifest(
            adjacency={
                "format": adj.name,
                "fanouts": None if adj.name == "coo" else ks,
                "exact": all(k >= csr.max_degree for k in ks),
                "sampling_seed": None if adj.name == "coo" else seed,
                "norm": student.norm,
                **spec.params,
            },
            model={**student.config, "params": count_parameters(student)},
            graph={
                "num_nodes": data.num_nodes,
                "num_edges": int(data.edge_index.size(1)),
                "max_degree": csr.max_degree,
                "num_features": data.num_features,
                "num_classes": int(data.num_classes),
            },
            opset=opset,
            dtype=dtype,
            inputs=spec.inputs,
            outputs=spec.outputs,
            artifacts={name: get_format(name).filename for name in results},
            provenance=provenance_from_run(run_dir, meta),
            accuracy={
                "metric": data.metric,
                "split": "test",
                "nodes": int(scored.numel()),
                "pytorch_student": acc_student,
                "pytorch_student_exact_graph": acc_exact,
                "exported": {name: r["accuracy"] for name, r in results.items()},
            },
            validation={
                "atol": atol,
                "passed": True,
                "runs_per_input": 2,
                "input_sets": [label for label, _ in spec.validation],
                "max_abs_diff": {name: r["max_abs_diff"] for name, r in results.items()},
            },
        )
        manifest["timings"] = {k: round(v, 3) for k, v in stages.items()}
        manifest["timings"].update({name: r["timings"] for name, r in results.items()})
        if "onnx" in results:
            from abkd_deploy.export.onnx_format import write_metadata

            write_metadata(tmp / get_format("onnx").filename, manifest)
        files = [f for r in results.values() for f in r["files"]]
        manifest["files"] = file_entries(tmp, files)
        manifest["timings"]["total_s"] = round(time.perf_counter() - start, 3)
        write_json(tmp / MANIFEST_NAME, manifest)
    log(
        f"export: wrote {out_dir} ({', '.join(manifest['files'])}) in "
        f"{manifest['timings']['total_s']:.1f} s"
    )
    return manifest


def _export_one(
    fmt: ArtifactFormat,
    spec: ExportSpec,
    ctx: ExportContext,
    tmp: Path,
    opset: int,
    dtype: str,
    atol: float,
    y: np.ndarray,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Writes, checks, validates and scores one artifact format."""
    t0 = time.perf_counter()
    module = cast_module(spec.module, DTYPES[dtype])
    paths = fmt.export(module, spec, tmp / fmt.filename, opset)
    t1 = time.perf_counter()
    if fmt.name == "onnx":
        _check_onnx_graph(paths[0], spec)
    from abkd_deploy.export.onnx_format import threads

    runner = fmt.load(paths[0], DTYPES[dtype], threads())
    reference = spec.module if spec.reference is None else spec.reference
    diffs = validate_artifact(
        fmt.name, runner, reference, spec.validation, spec.output_names, atol, log
    )
    t2 = time.perf_counter()
    acc = score(ctx.data.metric, y, spec.logits(runner))
    t3 = time.perf_counter()
    size = sum(p.stat().st_size for p in paths)
    log(
        f"  {fmt.name}: {', '.join(p.name for p in paths)} ({size / 2**20:.1f} MiB), "
        f"test {ctx.data.metric} {acc:.4f}"
    )
    return {
        "files": [p.name for p in paths],
        "max_abs_diff": diffs,
        "accuracy": acc,
        "timings": {
            "export_s": round(t1 - t0, 3),
            "validate_s": round(t2 - t1, 3),
            "accuracy_s": round(t3 - t2, 3),
        },
    }


def _check_onnx_graph(path: Path, spec: ExportSpec) -> None:
    from abkd_deploy.export.onnx_format import check_onnx, op_types

    check_onnx(path)
    if spec.input_names != ["x", "edge_index"]:  # ell / embedded: gather-only
        scatter = sorted(op for op in op_types(path) if op.startswith("Scatter"))
        if scatter:
            raise ExportError(f"{path.name} contains {', '.join(scatter)}; expected gather-only")


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module`` itself for float32, else a copy with float params/buffers in ``dtype``."""
    if dtype == torch.float32:
        return module
    return copy.deepcopy(module).to(dtype)


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)
