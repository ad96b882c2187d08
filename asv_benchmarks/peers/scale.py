"""Scale study of the iterative (matrix-free) REML fit: time and peak memory against n and q.

For each size the data come from the ``lmmops simulate`` command (K = 2 Zipf-skewed
crossed factors), and the fit runs in a fresh child process so that its peak resident
memory is its own. Reported per size: the time to build the objective (one O(n) pass and
the deflation basis), one REML objective-and-gradient evaluation, the full fit, the
number of iterations, the Monte Carlo standard error of the log-likelihood, and the peak
RSS. Peers (lme4 through Rscript, mixedlm) are fitted through ``compare.py`` on the
sizes they can take (``--peer-max-n``), for the ratio.

Examples::

    python asv_benchmarks/peers/scale.py                       # 1e5, 1e6 and 1e7 rows
    python asv_benchmarks/peers/scale.py --sizes 1e6:1e5,3e3 --peers lme4
    python asv_benchmarks/peers/scale.py --movielens           # 27.7M rows, 267k x 54k
    python asv_benchmarks/peers/scale.py --sweep               # time per evaluation vs n
    python asv_benchmarks/peers/scale.py --slopes              # (1 + x | g1) + (1 | g2)

Targets (issue 5): K = 2, n = 1e7 with 1e6 and 3e4 levels, full REML fit <= 3 min and
<= 4 GiB; MovieLens shape, one evaluation <= 60 s and a full fit <= 15 min within 6 GiB.
The machine is noisy: compare ratios measured in one run, and read ``uptime``.

``--slopes`` fits ``y ~ 1 + x + (1 + x | g1) + (1 | g2)`` instead (issue 14: n = 1e7 with
1e6 and 3e4 levels by the iterative solver within 4 minutes and 6 GiB), on data from
:func:`lmmops.data.simulate.simulate_slopes` made in the child (the formula parser has no
random slopes yet, so the terms are built directly); ``simulate_s`` is then the child's.
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

DEFAULT_SIZES = ["1e5:1e4,1e3", "1e6:1e5,3e3", "1e7:1e6,3e4"]
MOVIELENS = "27.7e6:266980,53883"
SLOPE_SIZES = ["1e6:1e5,3e3", "1e7:1e6,3e4"]
SWEEP = ["1e5:1e4,2e3", "3e5:3e4,4e3", "1e6:1e5,8e3", "3e6:3e5,1.6e4", "1e7:1e6,3e4",
         "3e7:3e6,6e4"]


def parse_size(text):
    n, levels = text.split(":")
    return int(float(n)), [int(float(x)) for x in levels.split(",")]


def simulate(path, n, levels, zipf, seed):
    cmd = ["lmmops", "simulate", path, "--n-obs", str(n), "--levels",
           ",".join(map(str, levels)), "--zipf", ",".join([str(zipf)] * len(levels)),
           "--sigma2", ",".join(["0.5", "0.8", "0.3"][: len(levels)]), "--seed", str(seed),
           "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def child(path, formula, n_probes, max_evals):
    """Runs in a fresh process: read, build, one evaluation, fit; print one JSON line."""
    import resource

    import numpy as np
    import pandas as pd

    import lmmops
    from lmmops.estimation.direct import moment_start
    from lmmops.estimation.stochastic import fit_iterative

    t0 = time.perf_counter()
    df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = lmmops.LMM.from_formula(formula, df)
    del df
    obj = model.iterative_objective(n_probes=n_probes)
    t_build = time.perf_counter() - t0
    start = moment_start(model.design, model.X_conditioned, model.y_conditioned)
    t0 = time.perf_counter()
    ev = obj.evaluate(start)
    t_eval = time.perf_counter() - t0
    cg_first = obj.cg_iterations
    out = {"read_s": t_read, "build_s": t_build, "eval_s": t_eval, "cg_per_eval": cg_first,
           "n": int(model.n_obs), "q": int(model.design.q)}
    if max_evals > 1:
        t0 = time.perf_counter()
        ev, opt = fit_iterative(obj, start, maxiter=max_evals)
        out.update({
            "fit_s": t_build + t_eval + (time.perf_counter() - t0),
            "iterations": opt.iterations, "evaluations": opt.n_evaluations + 1,
            "converged": opt.converged,
            "variances": [float(v) for v in ev.sigma2 * ev.theta**2] + [float(ev.sigma2)],
            "loglik_mc_se": 0.5 * float(ev.objective_se),
        })
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("@result " + json.dumps(out), flush=True)
    del np


def child_slopes(size, zipf, seed, n_probes, max_evals):
    """The ``--slopes`` child: simulate, build, fit as ``lmmops.fit`` does (the optimiser
    of :func:`lmmops.estimation.protocol.optimise`: theta on unit scale, lme4's start
    for centred columns, probes raised while the Monte Carlo error is too large); the
    first evaluation is timed inside the fit (not evaluated twice); one JSON line."""
    import resource

    import numpy as np

    import lmmops
    from lmmops.data.design import CrossedDesign
    from lmmops.data.simulate import simulate_slopes
    from lmmops.estimation.protocol import optimise
    from lmmops.estimation.vector import start_theta
    from lmmops.options import Options

    n, levels = parse_size(size)
    t0 = time.perf_counter()
    terms, X, y = simulate_slopes(n, levels, zipf=[zipf] * len(levels), seed=seed)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    design = CrossedDesign.from_codes([t.codes for t in terms], names=[t.group for t in terms])
    model = lmmops.LMM(design, X, y, fixef_names=["(Intercept)", "x"], terms=terms)
    obj = model.iterative_objective(n_probes=n_probes)
    t_build = time.perf_counter() - t0
    first = []
    evaluate = obj.evaluate

    def timed(theta, **kw):  # the first evaluation's wall time, inside the fit
        t = time.perf_counter()
        ev = evaluate(theta, **kw)
        if not first:
            first.append(time.perf_counter() - t)
        return ev

    obj.evaluate = timed
    out = {"simulate_s": t_sim, "build_s": t_build, "n": int(n), "q": int(obj.q),
           "nnz": obj.nnz}
    if max_evals > 1:
        t0 = time.perf_counter()
        ev, opt = optimise(obj, None, Options(maxiter=max_evals))
        sd = np.sqrt(np.diag(ev.theta_mc_cov))
        out.update({
            "fit_s": t_build + (time.perf_counter() - t0), "eval_s": first[0],
            "iterations": opt.iterations, "evaluations": opt.n_evaluations,
            "converged": opt.converged, "message": opt.message,
            "optimizer": opt.optimizer, "n_probes": int(obj.n_probes),
            "theta": [float(v) for v in ev.theta], "theta_mc_sd": [float(v) for v in sd],
            "sigma2": float(ev.sigma2), "loglik_mc_se": 0.5 * float(ev.objective_se),
            "cg_iterations": [int(c) for c in obj.cg_history],
        })
    else:
        t0 = time.perf_counter()
        evaluate(start_theta(obj.terms))
        out["eval_s"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_gib"] = usage.ru_maxrss / 2**20
    out["cpu_s"] = usage.ru_utime + usage.ru_stime  # on a shared machine, with the wall time
    print("@result " + json.dumps(out), flush=True)


def run_child(path, formula, n_probes, max_evals, timeout, slopes=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", path, "--formula", formula,
           "--probes", str(n_probes), "--max-evals", str(max_evals)]
    if slopes is not None:  # path is the size, the child simulates
        cmd += ["--_slopes", "--zipf", str(slopes[0]), "--seed", str(slopes[1])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:g} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@result "):
            return json.loads(line[len("@result "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": (tail[-1] if tail else f"exit code {proc.returncode}")[:300]}


def run_peers(n, levels, zipf, seed, peers, timeout):
    cmd = [sys.executable, os.path.join(HERE, "compare.py"), "--simulate",
           ",".join(map(str, [n] + levels)), "--zipf", ",".join([str(zipf)] * len(levels)),
           "--seed", str(seed), "--peers", peers, "--timeout", str(timeout), "--repeat", "1",
           "--no-cold", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def _done(rows, text, res):
    rows.append(res)
    print(f"# done {text}: {json.dumps(res)[:300]}", file=sys.stderr, flush=True)


def _head(args, load, rows, columns):
    """Print the ``--json`` record (and return True) or the table's load line and head."""
    if args.json:
        print(json.dumps({"load_average": load, "rows": rows}, indent=2))
        return True
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    return False


def fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", help="N:L1,L2 entries (default 1e5, 1e6, 1e7)")
    p.add_argument("--movielens", action="store_true", help="add the MovieLens shape")
    p.add_argument("--sweep", action="store_true",
                   help="time one evaluation from 1e5 to 3e7 rows (no full fits)")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--max-evals", type=int, default=30)
    p.add_argument("--peers", default="none", help="comma-separated lme4,mixedlm or none")
    p.add_argument("--peer-max-n", type=float, default=1e6)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--formula", default=None)
    p.add_argument("--slopes", action="store_true",
                   help="fit y ~ 1 + x + (1 + x | g1) + (1 | g2) (default 1e6 and 1e7 rows)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_slopes", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        if args._slopes:
            child_slopes(args._child, args.zipf, args.seed, args.probes, args.max_evals)
        else:
            child(args._child, args.formula, args.probes, args.max_evals)
        return 0
    if args.slopes:
        return main_slopes(args)
    sizes = args.sizes or (SWEEP if args.sweep else list(DEFAULT_SIZES))
    if args.movielens:
        sizes.append(MOVIELENS)
    rows = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for text in sizes:
            n, levels = parse_size(text)
            path = os.path.join(tmp, f"sim_{n}.parquet")
            t_sim = simulate(path, n, levels, args.zipf, args.seed)
            formula = args.formula or "y ~ 1 + " + " + ".join(
                f"(1|g{k + 1})" for k in range(len(levels)))
            res = run_child(path, formula, args.probes, 1 if args.sweep else args.max_evals,
                            args.timeout)
            res.update({"size": text, "simulate_s": t_sim})
            if args.peers != "none" and n <= args.peer_max_n:
                res["peers"] = run_peers(n, levels, args.zipf, args.seed, args.peers,
                                         args.timeout)
            os.remove(path)
            _done(rows, text, res)
    if _head(args, load, rows, ["n", "levels", "build s", "1 eval s", "CG/eval", "fit s",
                                "iters", "peak GiB", "MC se loglik", "peers"]):
        return 0
    for r in rows:
        peers = ""
        if "peers" in r:
            pr = r["peers"].get("results", r["peers"])
            parts = []
            for name, v in (pr.items() if isinstance(pr, dict) else []):
                if isinstance(v, dict) and name != "lmmops":
                    t = v.get("time_first")
                    parts.append(f"{name} {fmt(t)} s" if t else f"{name}: {v.get('error', '?')}")
            peers = "; ".join(parts)
        if "error" in r:
            print(f"| {r['size']} | | | | | {r['error']} | | | | |")
            continue
        print(f"| {r['n']:,} | {r['size'].split(':')[1]} | {fmt(r['build_s'])} | "
              f"{fmt(r['eval_s'])} | {r['cg_per_eval']} | {fmt(r.get('fit_s'))} | "
              f"{r.get('iterations', '—')} | {fmt(r['peak_rss_gib'], '.2f')} | "
              f"{fmt(r.get('loglik_mc_se'), '.3f')} | {peers} |")
    return 0


def main_slopes(args):
    """The ``--slopes`` study: one child per size, a table (or ``--json``)."""
    rows = []
    load = os.getloadavg()
    for text in args.sizes or SLOPE_SIZES:
        res = run_child(text, "slopes", args.probes, args.max_evals, args.timeout,
                        slopes=(args.zipf, args.seed))
        res.update({"size": text, "load_after": os.getloadavg()})
        _done(rows, text, res)
    if _head(args, load, rows, ["n", "levels", "q", "build s", "1 eval s", "fit s", "evals",
                                "peak GiB", "MC se loglik", "load after"]):
        return 0
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | | | | | {r['error']} | | | | |")
            continue
        la = r["load_after"]
        print(f"| {r['n']:,} | {r['size'].split(':')[1]} | {r['q']:,} | {fmt(r['build_s'])} "
              f"| {fmt(r['eval_s'])} | {fmt(r.get('fit_s'))} | {r.get('evaluations', '—')} "
              f"| {fmt(r['peak_rss_gib'], '.2f')} | {fmt(r.get('loglik_mc_se'), '.3f')} "
              f"| {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
