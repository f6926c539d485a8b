"""``abkd_deploy.export.refresh``: a live export + a graph delta -> a new validated export.

The pipeline (DESIGN.md section 9, docs/FORMATS.md "Refresh"):

1. Read the parent export (every file checked against its manifest hash), its stored graph
   (``graph.npz``, :mod:`.live_graph`), its features and layer states (the ``state_l``
   initializers of ``new_nodes.onnx``) and the student of its run directory.
2. Apply the delta (:mod:`abkd_deploy.data.delta`); re-draw only the fanout-table rows of
   nodes whose neighbour list changed (sampling is per node,
   :func:`~abkd_deploy.data.ell.refresh_table`); recompute only the state rows the change
   can reach (:mod:`.affected`, :func:`~.precompute.layer_states` in incremental mode).
3. Rebuild the export-form modules from those tables and states (cheap: no gathering of
   unchanged rows) and write their tables into copies of the parent's ONNX graphs
   (:mod:`.onnx_tables`): no tracing, same graph.
4. Validate like ``export``: the main graph against the PyTorch tree form on random ids,
   on the recomputed rows and on the new nodes; the new-node graph against its module
   and against the main graph; score the test nodes. Then write the manifest (with the
   parent and the delta's hash) and publish the directory by one rename.

Equal to a full export on the updated graph by construction (a test checks it over all
nodes); the cost grows with the delta, not with the graph, apart from reading and
writing the tables.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from abkd_deploy.data.delta import Delta, apply_delta, read_delta
from abkd_deploy.data.ell import FanoutTable, refresh_table
from abkd_deploy.data.sampler import NeighborSampler
from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.export.adjacency import ADJACENCY, ExportContext
from abkd_deploy.export.affected import affected_rows
from abkd_deploy.export.formats import get_format, runner_threads
from abkd_deploy.export.live_graph import LIVE_GRAPH_FILE, LiveGraph
from abkd_deploy.export.manifest import read_manifest
from abkd_deploy.export.new_node_artifact import check_consistency
from abkd_deploy.export.new_nodes import NEW_NODES_FILE, new_node_module, new_node_spec
from abkd_deploy.export.onnx_tables import (
    Rewritten,
    load_graph,
    read_initializers,
    rewrite_initializers,
)
from abkd_deploy.export.precompute import layer_states
from abkd_deploy.export.validate import validate_artifact
from abkd_deploy.files import sha256_file, write_json
from abkd_deploy.manifest import MANIFEST_NAME, file_entries
from abkd_deploy.models import load_model
from abkd_deploy.rundir import verify_run_dir
from abkd_deploy.scoring import score
from abkd_deploy.staging import check_out_dir, staged_directory

#: Recomputed rows and new nodes checked against PyTorch (at most, each).
CHECK_ROWS = 1000


def refresh(
    export_dir: str | Path,
    delta: str | Path,
    out_dir: str | Path,
    run_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Applies ``delta`` to the live export ``export_dir`` and writes ``out_dir``.

    Args:
        export_dir: An ``embedded`` ONNX export of a ``gcn``/``sage`` student (one that
            holds ``graph.npz`` and ``new_nodes.onnx``).
        delta: A delta ``.npz`` (:mod:`abkd_deploy.data.delta`).
        out_dir: The new export directory (refused if it exists, unless ``force``).
        run_dir: The student's run directory; default: the one the parent records.
        force: Replace an existing ``out_dir`` that a previous export wrote.
        progress: Print steps and validation results to stderr.

    Returns:
        The new manifest (also in ``out_dir/manifest.json``).

    Raises:
        ConfigError: a bad option or an export that cannot be refreshed.
        DatasetError: a malformed delta, or one that does not fit the graph.
        CheckpointError: the run directory is missing or holds another student.
        ExportError / ValidationError: the refreshed artifacts failed their checks.
    """
    t_start = time.perf_counter()
    log = _logger(progress)
    export_dir, out_dir, delta = Path(export_dir), Path(out_dir), Path(delta)
    parent = read_manifest(export_dir, verify_files=True)
    _check_refreshable(parent, export_dir)
    student, run_dir = _load_student(parent, run_dir)
    check_out_dir(out_dir, force, sources=[export_dir, run_dir])  # before the work, not after
    n_old, layers = int(parent["graph"]["num_nodes"]), student.num_layers
    fanouts = [int(k) for k in parent["adjacency"]["fanouts"]]
    graph = LiveGraph.load(export_dir / LIVE_GRAPH_FILE, layers)
    names = [f"state_{i}" for i in range(layers)]
    new_node_graph = load_graph(export_dir / NEW_NODES_FILE)  # read once, rewritten below
    stored = read_initializers(new_node_graph, names)
    x = torch.from_numpy(stored[names[0]])
    previous = [torch.from_numpy(stored[n]) for n in names[1:]]
    change = read_delta(delta, n_old, int(x.size(1)))
    laps = {"load_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    update = apply_delta(graph.csr, x, change, graph.undirected)
    old_deg = graph.csr.degree
    old_tables = [_table(nbr, old_deg, k) for nbr, k in zip(graph.tables, fanouts, strict=True)]
    tables = [
        refresh_table(nbr, update.csr, update.changed, k, seed)
        for nbr, k, seed in zip(graph.tables, fanouts, graph.table_seeds, strict=True)
    ]
    rows = affected_rows(student.norm, old_tables, tables, update.updated, update.changed)
    states = layer_states(student, update.x, tables, rows=rows[:-1], previous=previous)
    laps["recompute_s"] = time.perf_counter() - t0
    log(_summary(change, update.changed, rows, update.csr.num_nodes))

    t0 = time.perf_counter()
    ctx = ExportContext(
        student=student,
        data=Data(x=update.x, num_nodes=update.csr.num_nodes),
        csr=update.csr,
        fanouts=fanouts,
        sampler=NeighborSampler(
            update.csr,
            fanouts,
            student.norm,
            int(parent["adjacency"]["sampling_seed"]),
            tables=tables,
        ),
        eval_ids=graph.eval_ids,
        dtype=parent["dtype"],
        precompute=parent["adjacency"]["precompute"],
        states=states,
        # the parent's layout: exports before the factored sage layer 1 keep slot weights
        factor=parent["adjacency"].get("table_weights") == "scale",
    )
    adj = ADJACENCY.get("embedded")
    spec = adj.build(ctx)
    new_nodes = new_node_module(ctx)
    laps["build_s"] = time.perf_counter() - t0

    with staged_directory(out_dir, force, sources=[export_dir, run_dir]) as tmp:
        t0 = time.perf_counter()
        model_name = parent["artifacts"]["onnx"]
        main = rewrite_initializers(
            export_dir / model_name,
            tmp / model_name,
            _arrays(spec.module),
            parent["live_graph"]["tables"],
            n_old,
        )
        extra = rewrite_initializers(
            new_node_graph,
            tmp / NEW_NODES_FILE,
            _arrays(new_nodes),
            parent["new_nodes"]["tables"],
            n_old,
        )
        LiveGraph(
            update.csr,
            [t.nbr for t in tables],
            graph.table_seeds,
            graph.undirected,
            graph.eval_ids,
            graph.eval_labels,
        ).save(tmp / LIVE_GRAPH_FILE)
        laps["write_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        checked = _validate(
            ctx, spec, new_nodes, (main, extra), rows[-1], graph.eval_labels, n_old, parent, log
        )
        laps["validate_s"] = time.perf_counter() - t0

        manifest = _manifest(parent, ctx, spec, checked, export_dir, delta, change)
        manifest["timings"] = {k: round(v, 3) for k, v in laps.items()}
        get_format("onnx").finalize(tmp / model_name, manifest)
        listed = [p.name for p in main.files + extra.files] + [LIVE_GRAPH_FILE]
        manifest["files"] = file_entries(tmp, listed)
        manifest["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        write_json(tmp / MANIFEST_NAME, manifest)
    log(f"refresh: wrote {out_dir} in {manifest['timings']['total_s']:.2f} s")
    return manifest


def _check_refreshable(manifest: dict[str, Any], export_dir: Path) -> None:
    """Refuses exports that ``refresh`` cannot rebuild, naming why and what to do."""
    adj = manifest["adjacency"]
    why = None
    if adj.get("format") != "embedded":
        why = f"its adjacency is {adj.get('format')!r}; refresh rebuilds embedded exports"
    elif set(manifest.get("artifacts") or {}) != {"onnx"}:
        held = sorted(manifest.get("artifacts") or {})
        why = f"it holds {held} artifacts; refresh writes onnx only"
    elif (manifest.get("quantize") or {}).get("mode", "none") != "none":
        why = "its tables are quantized (int8); refresh rebuilds float32 exports"
    elif manifest.get("dtype") != "float32":
        why = f"its tables are {manifest.get('dtype')}; refresh rebuilds float32 exports"
    elif "live_graph" not in manifest or "new_nodes" not in manifest:
        why = "it keeps no graph.npz / new_nodes.onnx (an embedded gcn/sage ONNX export does)"
    if why is not None:
        raise ConfigError(f"cannot refresh {str(export_dir)!r}: {why}; export it again instead")


def _load_student(manifest: dict[str, Any], run_dir: str | Path | None) -> tuple[Any, Path]:
    """The student of ``run_dir`` (default: the parent's), checked to be the exported one."""
    recorded = (manifest.get("provenance") or {}).get("run_dir")
    if run_dir is None and not recorded:
        raise ConfigError("the export records no run directory; give --run RUN_DIR")
    path = Path(run_dir if run_dir is not None else recorded)
    if not path.is_dir():
        raise CheckpointError(
            f"run directory {str(path)!r} of the student is gone; give --run RUN_DIR"
        )
    verify_run_dir(path)
    student, _meta = load_model(path, "student")
    want = (manifest.get("provenance") or {}).get("student_sha256")
    got = sha256_file(path / "student.safetensors") if want else None
    model = {k: v for k, v in manifest["model"].items() if k != "params"}
    if got != want or any(student.config.get(k) != v for k, v in model.items()):
        raise CheckpointError(
            f"{path} holds another student than the one exported (checkpoint hash or "
            "config differ); give the run directory the export was made from"
        )
    return student.float().cpu().eval(), path


def _table(nbr: torch.Tensor, degree: torch.Tensor, fanout: int) -> FanoutTable:
    return FanoutTable(nbr=nbr, count=degree.clamp(max=fanout), degree=degree)


def _arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _validate(
    ctx: ExportContext,
    spec: Any,
    new_nodes: Any,
    written: tuple[Rewritten, Rewritten],
    recomputed: torch.Tensor,
    labels: np.ndarray,
    n_old: int,
    parent: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Both graphs against PyTorch (see the module docstring); returns what the manifest
    records."""
    fmt = get_format("onnx")
    atol = float(parent["validation"]["atol"])
    main, extra = written  # the parent's checked graphs with new tables
    main_path, nn_path = main.files[0], extra.files[0]
    runner = fmt.load(main_path, torch.float32, runner_threads())
    gen = ctx.generator(offset=31)
    sets = list(spec.validation)
    if recomputed.numel():
        pick = recomputed[torch.randperm(recomputed.numel(), generator=gen)[:CHECK_ROWS]]
        sets.append((f"{pick.numel()} recomputed nodes", (pick,)))
    if ctx.data.num_nodes > n_old:
        sets.append(("new nodes", (torch.arange(n_old, ctx.data.num_nodes)[:CHECK_ROWS],)))
    reference = spec.module if spec.reference is None else spec.reference
    diffs = validate_artifact(
        "onnx",
        runner,
        reference,
        sets,
        spec.output_names,
        atol,
        log,
        declared=main.output_names,
    )
    emb_dim = int(spec.outputs[1]["shape"][1])
    nn_spec = new_node_spec(ctx, new_nodes, emb_dim)
    nn_runner = fmt.load(nn_path, torch.float32, runner_threads())
    nn_diffs = validate_artifact(
        "new_nodes.onnx",
        nn_runner,
        new_nodes,
        nn_spec.validation,
        nn_spec.output_names,
        atol,
        lambda _msg: None,
        declared=extra.output_names,
    )
    width = int(nn_spec.inputs[1]["shape"][1])
    consistency = check_consistency(ctx, new_nodes, reference, width, atol)
    metric = parent["accuracy"]["metric"]
    acc = score(metric, labels, spec.logits(runner))
    log(
        f"  onnx: test {metric} {acc:.4f}, max abs diff "
        f"{max(diffs.values()):.2e}; new nodes {max(nn_diffs.values()):.2e}"
    )
    return {
        "atol": atol,
        "input_sets": [label for label, _ in sets],
        "max_abs_diff": diffs,
        "new_nodes_max_abs_diff": nn_diffs,
        "stored_answers_max_abs_diff": consistency,
        "score": acc,
    }


def _manifest(
    parent: dict[str, Any],
    ctx: ExportContext,
    spec: Any,
    checked: dict[str, Any],
    export_dir: Path,
    delta: Path,
    change: Delta,
) -> dict[str, Any]:
    """The parent's manifest with the graph, accuracy, validation and provenance of the
    refreshed export (without ``timings`` and ``files``)."""
    m = copy.deepcopy({k: v for k, v in parent.items() if k not in ("files", "timings")})
    csr = ctx.csr
    m["graph"].update(
        num_nodes=csr.num_nodes, num_edges=int(csr.col.numel()), max_degree=csr.max_degree
    )
    m["adjacency"]["exact"] = all(k >= csr.max_degree for k in ctx.fanouts)
    acc = m["accuracy"]
    # refresh scores the artifact only (PyTorch's outputs were compared on the validation
    # sets); the parent's PyTorch scores are on the parent's graph
    acc["pytorch_student"] = acc["pytorch_student_exact_graph"] = None
    acc["exported"] = {"onnx": checked["score"]}
    m["validation"].update(
        atol=checked["atol"],
        passed=True,
        input_sets=checked["input_sets"],
        max_abs_diff={"onnx": checked["max_abs_diff"]},
    )
    m["new_nodes"].update(
        max_abs_diff=checked["new_nodes_max_abs_diff"],
        stored_answers_max_abs_diff=checked["stored_answers_max_abs_diff"],
    )
    prov = m["provenance"]
    previous = prov.pop("refresh", None)
    prov["refresh"] = {
        "parent": {
            "path": str(export_dir.resolve()),
            "manifest_sha256": sha256_file(export_dir / MANIFEST_NAME),
            "num_nodes": int(parent["graph"]["num_nodes"]),
            "snapshot": prov.pop("snapshot", None),
        },
        "generation": 1 + (previous or {}).get("generation", 0),
        "delta": {"file": str(delta.resolve()), "sha256": sha256_file(delta), **change.counts()},
    }
    return m


def _summary(change: Delta, changed: torch.Tensor, rows: list[torch.Tensor], n: int) -> str:
    counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in change.counts().items())
    recomputed = ", ".join(f"H^{i + 1} {r.numel():,}" for i, r in enumerate(rows[:-1]))
    return (
        f"refresh: {counts}; {int(changed.sum()):,} neighbour lists changed; rows recomputed "
        f"of {n:,}: {recomputed or 'none (one layer)'}; outputs that can change: "
        f"{rows[-1].numel():,}"
    )


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda _msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)
