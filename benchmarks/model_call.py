"""The ``embedded`` model call in onnxruntime vs a numpy gather of the same rows (issue 10).

For each batch size, in one process and one loop (every repeat runs each variant once, in
turn, so they see the same machine load), medians over the repeats of:

* ``ort``: ``session.run(["logits"], {"node_ids": ids})`` of a precomputed export
  (``--precompute hidden``, the default), with the serving session settings (1 intra-op
  thread, no spinning) and, with ``--threads 1,2``, other thread counts;
* ``numpy``: ``np.take`` of exactly the table rows that call reads (``nbr[ids]``,
  ``weight[ids]``, ``self_weight[ids]`` for ``gcn``, ``features[nbr]``, and
  ``dst_features[ids]`` or ``features[ids]``): the floor for a gather-bound call;
* ``ort_lookup`` / ``numpy_lookup``: the same for a ``--precompute all`` export (one
  Gather of ``node_ids`` on the logits table) vs ``np.take(logits_table, ids)``;
* ``predictor`` / ``predictor_lookup``: :meth:`Predictor.predict` on a list of ids, the
  whole in-process call (validation, model, softmax); a ``--precompute all`` export is
  answered from its tables in numpy (:mod:`abkd_deploy.serve.lookup`), and
  ``answers_lookup`` is that call's model part (the classes and scores rows).

Ratios are ``ort / numpy`` from the same run. Without ``--export`` it trains a 2-layer
``sage`` student for a few epochs on ``csbm:num_nodes=N`` (latency does not depend on
accuracy) and exports it both ways into ``--workdir``.

Usage:
    python benchmarks/model_call.py --num-nodes 100000 --workdir /tmp/mc --out mc.json
    python benchmarks/model_call.py --export EXPORT_DIR --export-all EXPORT_ALL_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from abkd_deploy.serve import Predictor
from abkd_deploy.serve.providers import session_options


def build_exports(num_nodes: int, workdir: Path, epochs: int) -> tuple[Path, Path]:
    """Trains a small ``sage`` student and exports it as ``hidden`` and ``all``."""
    import torch
    import torch.nn.functional as F

    from abkd_deploy.data import load_dataset
    from abkd_deploy.data.graph import FullGraph
    from abkd_deploy.export import export
    from abkd_deploy.models import build_model, save_model

    name = f"csbm:num_nodes={num_nodes}"
    data = load_dataset(name)
    torch.manual_seed(0)
    model = build_model(
        "sage",
        in_channels=data.num_features,
        hidden=16,
        out_channels=data.num_classes,
        num_layers=2,
    )
    graph = FullGraph.from_edge_index(data.edge_index, data.num_nodes, model.norm)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        model.train()
        optim.zero_grad()
        logits = model(data.x, graph)[0]
        F.cross_entropy(logits[data.train_mask], data.y[data.train_mask]).backward()
        optim.step()
    run = workdir / "run"
    save_model(
        model.eval(), run, "student", extra={"dataset": {"name": name, "root": None, "split": None}}
    )
    hidden, every = workdir / "export_hidden", workdir / "export_all"
    export(run, hidden, progress=False, force=True)
    export(run, every, progress=False, force=True, precompute="all")
    return hidden, every


def tables(export_dir: Path) -> dict[str, np.ndarray]:
    """The model's initializers by name, and by buffer name where the manifest maps an
    initializer to one (the exporter may rename a table: ``last.features`` -> ``clone``)."""
    model = onnx.load(str(export_dir / "model.onnx"))
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    manifest = json.loads((export_dir / "manifest.json").read_text())
    for init, buffer in (manifest.get("live_graph") or {}).get("tables", {}).items():
        out.setdefault(buffer, out[init])
    return out


def numpy_gather(export_dir: Path) -> Callable[[np.ndarray], Any]:
    """``np.take`` of the rows a precomputed export's logits read, for a batch of ids:
    the neighbour ids, the slot weights ``[B, K]`` (or, factored ``sage`` layout, the
    per-destination scales ``[B, 1]``), the ``K`` feature rows and the destination rows."""
    t = tables(export_dir)
    nbr, feats = t["last.nbr_1"], t["last.features"]
    weight = t["last.weight_1"] if "last.weight_1" in t else t["last.scale_1"]
    self_w, dst = t.get("last.self_weight_1"), t.get("last.dst_features", feats)

    def gather(ids: np.ndarray) -> Any:
        nb = np.take(nbr, ids, 0)
        rows = [nb, np.take(weight, ids, 0), np.take(feats, nb.reshape(-1), 0)]
        rows.append(np.take(dst, ids, 0))
        if self_w is not None:
            rows.append(np.take(self_w, ids, 0))
        return rows

    return gather


def session(export_dir: Path, threads: int) -> ort.InferenceSession:
    """The serving settings: all optimisations, ``threads`` threads, no spinning."""
    opts = session_options(threads, spinning=False if threads == 1 else None)
    path = str(export_dir / "model.onnx")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def measure(
    fns: dict[str, Callable[[np.ndarray, list[int]], Any]], batches: list[np.ndarray]
) -> dict[str, float]:
    """Median seconds of each function over ``batches`` (fresh ids every repeat, as
    requests bring; each variant reads its own copy of the tables). Within a repeat every
    function runs once, in an order that rotates, so all see the same load and caches."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for fn in fns.values():  # warm-up
        fn(batches[0], batches[0].tolist())
    for r, ids in enumerate(batches):
        id_list = ids.tolist()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t = time.perf_counter()
            fn(ids, id_list)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(args: argparse.Namespace, hidden: Path, every: Path | None) -> dict[str, Any]:
    gather = numpy_gather(hidden)
    threads = [int(t) for t in args.threads.split(",")]
    sessions = {t: session(hidden, t) for t in threads}
    pred = Predictor(hidden, device="cpu")
    lookup_sess = lookup_table = pred_all = answers = None
    if every is not None:
        lookup_sess = session(every, 1)
        lookup_table = tables(every)["logits_table"]
        pred_all = Predictor(every, device="cpu")
        # the model-call part of predict() for such an export (its classes and scores
        # rows), on its own copy of the tables
        answers = Predictor(every, device="cpu")._answers
    rng = np.random.default_rng(0)
    n = pred.num_nodes
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        batches = [rng.integers(0, n, batch, dtype=np.int64) for _ in range(args.repeats)]
        fns: dict[str, Callable[[np.ndarray, list[int]], Any]] = {
            "numpy": lambda ids, _: gather(ids),
            "predictor": lambda _, id_list: pred.predict(id_list),
        }
        for t, s in sessions.items():
            fns[f"ort_t{t}"] = lambda ids, _, s=s: s.run(["logits"], {"node_ids": ids})
        if lookup_sess is not None:
            ids = batches[0]
            want = sessions[threads[0]].run(["logits"], {"node_ids": ids})[0]
            got = lookup_sess.run(["logits"], {"node_ids": ids})[0]
            assert np.abs(got - want).max() < 1e-5, "the lookup export disagrees"
            fns["numpy_lookup"] = lambda ids, _: np.take(lookup_table, ids, 0)
            fns["ort_lookup"] = lambda ids, _: lookup_sess.run(["logits"], {"node_ids": ids})
            fns["predictor_lookup"] = lambda _, id_list: pred_all.predict(id_list)
            fns["answers_lookup"] = lambda ids, _: answers.predict(ids, False)
        med = measure(fns, batches)
        row: dict[str, Any] = {"batch": batch, **{k: v * 1e6 for k, v in med.items()}}
        for t in threads:
            row[f"ratio_ort_t{t}"] = med[f"ort_t{t}"] / med["numpy"]
        if lookup_sess is not None:
            row["ratio_lookup"] = med["ort_lookup"] / med["numpy_lookup"]
            row["ratio_answers_lookup"] = med["answers_lookup"] / med["numpy_lookup"]
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    return {
        "export": str(hidden),
        "export_all": None if every is None else str(every),
        "num_nodes": n,
        "repeats": args.repeats,
        "unit": "us (median)",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "loadavg": os.getloadavg(),
        },
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--export", type=Path, help="a precomputed (hidden) embedded export")
    p.add_argument("--export-all", type=Path, help="the same model with --precompute all")
    p.add_argument("--num-nodes", type=int, default=100_000)
    p.add_argument("--workdir", type=Path, default=Path("model_call_work"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-sizes", default="1,64,1024")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts for 'ort'")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    hidden, every = args.export, args.export_all
    if hidden is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        hidden, every = build_exports(args.num_nodes, args.workdir, args.epochs)
    report = bench(args, hidden, every)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
