"""Time and peak memory of generating ``csbm-mag`` at ogbn-mag's size (fresh process per run).

Usage: nice -n 10 python benchmarks/csbm_mag_generate.py --num-papers 736389 --num-classes 349

Reports the generator alone (``generate_csbm_mag``) and the full registry load (with the
reverse relations added and cites symmetrised, what training sees), in wall-clock seconds
and in CPU seconds (user + system) of the process: on a shared machine the wall time
mostly measures the other processes; the CPU time is what an idle machine would take
(numpy and these torch ops run on one core here).
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
from abkd_deploy.data.csbm_mag import CSBMMagConfig, generate_csbm_mag
from abkd_deploy.data.registry import parse_dataset_name
_, _, options = parse_dataset_name(sys.argv[1])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0 = cpu()
t = time.perf_counter()
g = generate_csbm_mag(CSBMMagConfig.from_options(options))
gen = time.perf_counter() - t
raw_edges = g.total_edges
g = g.with_reverse_relations()
total = time.perf_counter() - t
cpu_total = cpu() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"generate_seconds": gen, "load_seconds": total, "load_cpu_seconds": cpu_total,
                  "peak_rss_mb": peak / 1024,
                  "num_nodes": g.total_nodes, "raw_edges": raw_edges,
                  "edges_with_reverse": g.total_edges}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-papers", type=int, default=736_389)
    p.add_argument("--num-classes", type=int, default=349)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    name = f"csbm-mag:num_papers={a.num_papers},num_classes={a.num_classes}"
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, name], check=True, capture_output=True, text=True
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    summary = {
        "dataset": name,
        "repeats": a.repeats,
        "median_generate_seconds": statistics.median(r["generate_seconds"] for r in runs),
        "median_load_seconds": statistics.median(r["load_seconds"] for r in runs),
        "median_load_cpu_seconds": statistics.median(r["load_cpu_seconds"] for r in runs),
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
