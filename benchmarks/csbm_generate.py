"""Time and peak memory of generating a large csbm graph (each run in a fresh process).

Usage: python benchmarks/csbm_generate.py --num-nodes 1000000 --avg-degree 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch  # imported before timing: we measure the generator, not the import
from abkd_deploy.data import load_dataset
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
d = load_dataset(sys.argv[1])
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": secs, "peak_rss_mb": peak / 1024, "rss_before_mb": base / 1024,
                  "num_nodes": d.num_nodes, "num_edges": d.edge_index.size(1)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-nodes", type=int, default=1_000_000)
    p.add_argument("--avg-degree", type=float, default=10)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    name = f"csbm:num_nodes={a.num_nodes},avg_degree={a.avg_degree}"
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, name], check=True, capture_output=True, text=True
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    print(
        json.dumps(
            {
                "dataset": name,
                "num_nodes": runs[0]["num_nodes"],
                "num_edges": runs[0]["num_edges"],
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "seconds_all": [round(r["seconds"], 2) for r in runs],
                "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
                "rss_before_generation_mb": statistics.median(r["rss_before_mb"] for r in runs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
