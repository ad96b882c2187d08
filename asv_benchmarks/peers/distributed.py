"""Fit from partitioned Parquet on a Dask LocalCluster: wall time, client and worker memory.

For each size the data are written by ``lmmops simulate --partitions`` (K = 2 Zipf-skewed
crossed factors, ``y ~ 1 + (1|g1) + (1|g2)``) into a temporary directory; then a fresh
child process starts a ``distributed.LocalCluster`` (``--workers`` worker processes, one
thread each, loopback), fits the files with ``lmmops.fit`` on a Dask DataFrame (one
partition per file) and reports the wall time of the build (the passes over the data)
and of the whole fit, the seconds of each pass and the bytes gathered on the client,
the client's peak RSS and each worker's peak RSS. The child is fresh, so its peak RSS is
its own; the simulated files are made by another process.

Examples::

    python asv_benchmarks/peers/distributed.py --help
    python asv_benchmarks/peers/distributed.py                      # 1e7 and 1e8 rows
    python asv_benchmarks/peers/distributed.py --sizes 2e4:300,40 --partitions 4
    python asv_benchmarks/peers/distributed.py --sizes 1e6:100000,10000 --partitions 8 \
        --solver iterative --phases          # where the client's memory goes

Targets (issue 15): 1e8 rows, K = 2 with 1e6 x 1e5 levels on a LocalCluster of two
workers, client peak memory at most 2.5 GB (independent of n); the same at 1e7 rows shows
how the cost grows. The big sizes take minutes and several GB per worker: do not run them
on a shared machine without checking ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

DEFAULT_SIZES = ["1e7:1000000,100000", "1e8:1000000,100000"]


def _parse_size(text):
    """``"1e7:1000000,100000"`` -> (10000000, [1000000, 100000])."""
    n, _, levels = text.partition(":")
    return int(float(n)), [int(float(q)) for q in (levels or "1000000,100000").split(",")]


CHILD = r"""
import functools, json, os, resource, sys, time, tracemalloc
import lmmops
import distributed
from lmmops.distributed.files import read_dask, resolve_files

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

#: the client-side steps whose tracemalloc peaks --phases reports (module, attribute)
PHASES = [("lmmops.distributed.model", "map_reduce"),
          ("lmmops.distributed.levelspace", "LevelDesign.connected_components"),
          ("lmmops.linalg.operators", "GramOperator.__init__"),
          ("lmmops.estimation.iterative", "IterativeObjective._deflation_basis"),
          ("lmmops.estimation.iterative", "IterativeObjective.__init__"),
          ("lmmops.estimation.iterative", "IterativeObjective.evaluate"),
          ("lmmops.estimation.iterative", "IterativeObjective.average_information"),
          ("lmmops.estimation.iterative", "IterativeObjective.boundary_gradient"),
          ("lmmops.estimation.iterative", "IterativeObjective.expected_information"),
          ("lmmops.estimation.iterative", "IterativeObjective.diag_inverse"),
          ("lmmops.distributed.model", "optimise"),
          ("lmmops.distributed.model", "DaskResult.__init__"),
          ("lmmops.distributed.model", "DaskLMM._build"),
          ("lmmops.distributed.model", "DaskLMM.fit")]
STACK, RECORDS = [], {}

def traced(fn, label):
    # the peak of traced memory above the start of each call (nested calls fold into
    # their caller's peak); RECORDS[label] = [calls, largest increase MiB, seconds]
    @functools.wraps(fn)
    def inner(*a, **k):
        cur, peak = tracemalloc.get_traced_memory()
        if STACK:
            STACK[-1][1] = max(STACK[-1][1], peak)
        STACK.append([cur, cur])
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            start, top = STACK.pop()
            top = max(top, tracemalloc.get_traced_memory()[1])
            if STACK:
                STACK[-1][1] = max(STACK[-1][1], top)
            tracemalloc.reset_peak()
            r = RECORDS.setdefault(label, [0, 0.0, 0.0])
            r[0] += 1
            r[1] = max(r[1], (top - start) / 2**20)
            r[2] += time.perf_counter() - t0
    return inner

def trace_phases():
    import importlib
    for mod, attr in PHASES:
        owner = importlib.import_module(mod)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, traced(getattr(owner, name), attr))
    tracemalloc.start()

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if cfg.get("phases"):
        trace_phases()
    with distributed.LocalCluster(n_workers=cfg["workers"], threads_per_worker=1,
                                  processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        files = resolve_files(cfg["data"])
        ddf, labels = read_dask(files)
        t0 = time.perf_counter()
        model = lmmops.distributed.DaskLMM.from_formula(cfg["formula"], ddf, labels=labels)
        build = time.perf_counter() - t0
        res = model.fit(solver=cfg["solver"])
        wall = time.perf_counter() - t0
        workers = client.run(peak_mb)
        print(json.dumps({
            "n": res.n_obs, "levels": list(res.n_levels.values()), "partitions": len(files),
            "workers": cfg["workers"], "solver": res.solver, "build_s": build,
            "fit_s": wall, "passes": {p.name: round(p.seconds, 3) for p in model.passes},
            "bytes_gathered": sum(p.nbytes for p in model.passes),
            "client_peak_mb": peak_mb(),
            "worker_peak_mb": sorted(workers.values()),
            "loglik": res.loglik, "converged": res.converged,
            "phases": {k: {"calls": v[0], "peak_increase_mb": round(v[1], 1),
                           "seconds": round(v[2], 2)} for k, v in RECORDS.items()}}))
"""


def simulate(n, levels, partitions, directory, seed=1):
    """Write the partitioned Parquet data with ``lmmops simulate --partitions``."""
    cmd = [sys.executable, "-m", "lmmops", "simulate", directory, "--n-obs", str(n),
           "--levels", ",".join(map(str, levels)), "--zipf", "0.8,1.0", "--seed", str(seed),
           "--partitions", str(partitions), "--quiet"]
    subprocess.run(cmd, check=True, env=_env())


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_fit(directory, workers, solver="auto", formula="y ~ 1 + (1|g1) + (1|g2)",
            phases=False):
    """Fit the files in a fresh child process; its JSON report (``phases``: with the
    tracemalloc peaks of the client's steps, which slow the fit and add to its RSS)."""
    cfg = json.dumps({"data": directory, "workers": workers, "solver": solver,
                      "formula": formula, "phases": bool(phases)})
    out = subprocess.run([sys.executable, "-c", CHILD, cfg], check=True,
                         capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Run the benchmark and print one JSON line per size (and a Markdown table)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                   help="N:Q1,Q2 per size (default 1e7 and 1e8 rows, 1e6 x 1e5 levels)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--partitions", type=int, default=None,
                   help="Parquet files per size (default: one per 2e6 rows, at least 4)")
    p.add_argument("--solver", default="auto", choices=["auto", "direct", "iterative"])
    p.add_argument("--keep", metavar="DIR", help="write the data here and keep it")
    p.add_argument("--phases", action="store_true",
                   help="also report the client's tracemalloc peak per step (the passes, "
                        "the connectivity, the Gram, the deflation basis, the "
                        "evaluations); slower, and its RSS includes tracemalloc's own")
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        n, levels = _parse_size(size)
        parts = args.partitions or max(4, n // 2_000_000)
        with tempfile.TemporaryDirectory() as tmp:
            directory = os.path.join(args.keep or tmp, f"sim-{n}")
            t0 = time.perf_counter()
            simulate(n, levels, parts, directory)
            sim_s = time.perf_counter() - t0
            rep = run_fit(directory, args.workers, args.solver, phases=args.phases)
        rep["simulate_s"] = sim_s
        print(json.dumps(rep), flush=True)
        rows.append(rep)
    print("\n| n | levels | partitions | workers | solver | build s | fit s | client MB "
          "| worker MB | gathered MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        workers = ", ".join(f"{w:.0f}" for w in r["worker_peak_mb"])
        print(f"| {r['n']:.0e} | {' x '.join(map(str, r['levels']))} | {r['partitions']} "
              f"| {r['workers']} | {r['solver']} | {r['build_s']:.1f} | {r['fit_s']:.1f} "
              f"| {r['client_peak_mb']:.0f} | {workers} "
              f"| {r['bytes_gathered'] / 2**20:.1f} |")
    if args.phases:
        print("\n| n | client step | calls | peak increase MB | seconds |")
        print("|---|---|---|---|---|")
        for r in rows:
            for name, ph in r["phases"].items():
                print(f"| {r['n']:.0e} | {name} | {ph['calls']} "
                      f"| {ph['peak_increase_mb']:.1f} | {ph['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
