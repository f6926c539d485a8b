"""Max abs diff of an exported exact-fanout ``ell`` ONNX model vs the PyTorch student.

Runs the artifact in onnxruntime on the whole graph (exact tables, ``K = max degree``)
and the student of the run dir on PyTorch's sparse ``FullGraph`` operand, and prints the
largest absolute logit difference and both test accuracies.

Usage:
    python benchmarks/export_check_exact.py RUN_DIR EXPORT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.csr import CSR
from abkd_deploy.data.ell import sample_fanout_table
from abkd_deploy.data.graph import FullGraph
from abkd_deploy.models import load_model
from abkd_deploy.scoring import score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("export_dir")
    args = p.parse_args()
    manifest = json.loads((Path(args.export_dir) / "manifest.json").read_text())
    if manifest["adjacency"]["format"] != "ell":
        raise SystemExit("export_check_exact.py needs an ell export")
    student, meta = load_model(args.run_dir, "student")
    ds = meta["dataset"]
    data = load_dataset(ds["name"], ds.get("root"), ds.get("split"))
    csr = CSR.from_edge_index(data.edge_index, data.num_nodes)
    table = sample_fanout_table(csr, csr.max_degree)
    w, sw = table.weights(student.norm)
    feed = {"x": data.x.numpy()}
    for layer in range(1, student.num_layers + 1):
        feed[f"nbr_{layer}"], feed[f"weight_{layer}"] = table.nbr.numpy(), w.numpy()
        if student.norm == "gcn":
            feed[f"self_weight_{layer}"] = sw.numpy()
    session = ort.InferenceSession(str(Path(args.export_dir) / "model.onnx"))
    got = session.run(None, feed)[0]
    with torch.no_grad():
        ref = student(data.x, FullGraph(csr, student.norm))[0].numpy()
    mask = data.test_mask.numpy()
    y = data.y.numpy()[mask]
    print(
        json.dumps(
            {
                "arch": student.arch,
                "num_nodes": data.num_nodes,
                "max_degree": csr.max_degree,
                "max_abs_diff_vs_pytorch_full_graph": float(np.abs(got - ref).max()),
                f"onnx_test_{data.metric}": score(data.metric, y, got[mask]),
                f"pytorch_test_{data.metric}": score(data.metric, y, ref[mask]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
