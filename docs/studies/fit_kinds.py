"""Fit-level timings per preconditioner kind of the iterative solver.

Run from the repository root (``PYTHONPATH=.`` times the working tree)::

    PYTHONPATH=. python docs/studies/fit_kinds.py            # 10^5, 10^6 and K = 3 at 10^5
    PYTHONPATH=. python docs/studies/fit_kinds.py --no-1e6   # the two 10^5 designs only

Whole REML fits, ``lmmops.fit(formula, df, solver="iterative", preconditioner=KIND,
n_probes=16, seed=0)``, of the same simulated data for every kind the iterative fit
accepts (``lmmops.estimation.iterative.PRECONDITIONERS``: the level-space kinds of
``lmmops.linalg.preconditioners.LEVEL_KINDS`` but ``identity``; ``spectral`` needs
K = 2), plus the direct fit where its dense Schur block is small enough. Designs as the
solver study's Zipf(1) ones (``make_design("zipf1")``, ``"K3_zipf1"``): levels n/10 and
n/75 (and n/1000 for K = 3), Zipf exponent 1 on every factor, data from
``lmmops.data.simulate.simulate_crossed`` (variances 0.5, 0.8, 0.3, residual 1, seed 1).

Each fit runs in a fresh process, after a warm-up fit of the same kind on 2,000 rows
(Numba compilation and caches outside the timing); the wall time is taken around
``lmmops.fit`` alone (the data are simulated before). The kinds of one design are run in
rounds, in the listed order and then reversed, so that the machine's load drifts over
all of them; the table gives the median wall time over the rounds.

Recorded per fit: wall seconds, criterion evaluations, CG iterations per evaluation of the
solve with the chosen kind (``res.solver_info["cg_iterations"]``) and of the Jacobi probe
block (``probe_cg_iterations``), the REML criterion and its Monte Carlo standard error,
and the largest relative difference of theta from the default kind's fit.

Writes ``docs/studies/fit_kinds.md`` and the section "Fit-level timings per
preconditioner kind" of ``docs/studies/solver_study.md`` (between the
``<!-- fit_kinds:begin -->`` and ``<!-- fit_kinds:end -->`` markers; ``solver_study.py
--quick`` keeps it). ``--json`` saves the records; ``--from-json`` writes the tables again
from such a file without fitting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- fit_kinds:begin -->", "<!-- fit_kinds:end -->"
SECTION = "Fit-level timings per preconditioner kind"
N_PROBES, SEED, DATA_SEED = 16, 0, 1
SIGMA2 = (0.5, 0.8, 0.3)


def design_spec(n, K):
    levels = [n // 10, n // 75] + ([max(n // 1000, 20)] if K == 3 else [])
    formula = "y ~ 1 + " + " + ".join(f"(1|g{k + 1})" for k in range(K))
    return levels, formula


# ----------------------------------------------------------------------------- child
def child(spec):
    import resource

    import numpy as np

    import lmmops
    from lmmops.data.simulate import simulate_crossed

    n, K, solver, kind = spec["n"], spec["K"], spec["solver"], spec["kind"]
    levels, formula = design_spec(n, K)
    kw = {"method": "REML", "solver": solver}
    if solver == "iterative":
        kw.update(preconditioner=kind, n_probes=N_PROBES, seed=SEED)
    small = simulate_crossed(2000, [50, 20, 5][:K], zipf=[1.0] * K, sigma2=SIGMA2[:K], seed=3)
    lmmops.fit(formula, small, **kw)  # warm-up: Numba compilation, caches
    df = simulate_crossed(n, levels, zipf=[1.0] * K, sigma2=list(SIGMA2[:K]), seed=DATA_SEED)
    with open("/proc/loadavg", encoding="ascii") as f:
        load0 = f.read().strip()
    t0 = time.perf_counter()
    res = lmmops.fit(formula, df, **kw)
    wall = time.perf_counter() - t0
    with open("/proc/loadavg", encoding="ascii") as f:
        load1 = f.read().strip()
    info = res.solver_info
    mc = getattr(res, "mc_stderr", None) or {}
    return {"wall": wall, "elapsed_s": res.elapsed_s, "n_evaluations": res.n_evaluations,
            "iterations": res.iterations, "converged": res.converged,
            "criterion": float(res.objective),
            "criterion_se": 2.0 * float(mc.get("loglik", 0.0)),
            "theta": [float(x) for x in np.asarray(res.theta)],
            "cg_iterations": list(info.get("cg_iterations", [])),
            "probe_cg_iterations": list(info.get("probe_cg_iterations", [])),
            "preconditioner": info.get("preconditioner"),
            "notes": [str(x) for x in res.notes],
            "q": int(sum(res.n_levels.values())),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load": [load0, load1]}


def child_main(arg):
    try:
        out = child(json.loads(arg))
    except Exception as e:  # reported to the parent
        out = {"error": f"{type(e).__name__}: {e}"}
    print("@@RESULT@@" + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- parent
def run_fit(spec, timeout):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    out = p.stdout
    i = out.rfind("@@RESULT@@")
    if i < 0:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-500:]}"}
    rec = json.loads(out[i + len("@@RESULT@@"):].strip())
    rec["process_s"] = time.perf_counter() - t0
    return rec


def kinds_for(K):
    from lmmops.estimation.iterative import DEFAULT_PRECONDITIONER, PRECONDITIONERS

    kinds = [k for k in PRECONDITIONERS if not (k == "spectral" and K != 2)]
    kinds.remove(DEFAULT_PRECONDITIONER)
    return [DEFAULT_PRECONDITIONER] + kinds  # the default first


def study(designs, rounds, direct_max_q2, timeout):
    from lmmops.estimation.iterative import DEFAULT_PRECONDITIONER

    out = []
    for name, n, K in designs:
        levels, formula = design_spec(n, K)
        kinds = kinds_for(K)
        recs = {k: [] for k in kinds}
        for r in range(rounds[n]):
            order = kinds if r % 2 == 0 else kinds[::-1]
            for kind in order:
                rec = run_fit({"n": n, "K": K, "solver": "iterative", "kind": kind}, timeout)
                recs[kind].append(rec)
                _log(name, kind, r, rec)
        direct = None
        schur = sum(sorted(levels)[:-1])  # the direct solver eliminates the largest factor
        if schur <= direct_max_q2:
            direct = run_fit({"n": n, "K": K, "solver": "direct", "kind": None}, timeout)
            _log(name, "direct", 0, direct)
        out.append({"name": name, "n": n, "K": K, "levels": levels, "formula": formula,
                    "kinds": kinds, "default": DEFAULT_PRECONDITIONER, "recs": recs,
                    "direct": direct, "schur": schur})
    return out


def _log(name, kind, r, rec):
    if "error" in rec:
        msg = rec["error"]
    else:
        msg = (f"{rec['wall']:.2f} s, {rec['n_evaluations']} evals, "
               f"crit {rec['criterion']:.4f}, load {rec['load'][0].split()[0]}")
    print(f"[{time.strftime('%H:%M:%S')}] {name} {kind} round {r + 1}: {msg}", flush=True)


def _ok(recs):
    return [r for r in recs if "error" not in r]


def _rel_theta(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _its(values):
    if not values:
        return "–"
    return f"{statistics.mean(values):.0f} ({min(values)}–{max(values)})"


def tables(results):
    lines = []
    w = lines.append
    headline = []
    for d in results:
        lev = " x ".join(f"{x:,}" for x in d["levels"])
        w(f"\n#### {d['name']}, K = {d['K']}, levels {lev}\n")
        w("| kind | wall s (median) | wall s, each round | evaluations | CG its/eval, "
          "kind's solve: mean (range) | probe CG its/eval | REML criterion | MC se | "
          "max rel. diff theta vs default | load 1m |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        ref = _ok(d["recs"][d["default"]])
        ref_theta = ref[0]["theta"] if ref else None
        med = {}
        for kind in d["kinds"]:
            recs = d["recs"][kind]
            ok = _ok(recs)
            if not ok:
                err = recs[0]["error"] if recs else "not run"
                w(f"| {kind} | – | {err} | | | | | | | |")
                continue
            walls = [r["wall"] for r in ok]
            med[kind] = statistics.median(walls)
            r0 = ok[0]
            evals = sorted({r["n_evaluations"] for r in ok})
            same = all(r["criterion"] == r0["criterion"] for r in ok)
            diff = "–" if ref_theta is None else f"{_rel_theta(r0['theta'], ref_theta):.1e}"
            if kind == d["default"]:
                diff = "(default)"
            loads = [float(x.split()[0]) for r in ok for x in r["load"]]
            label = f"**{kind}**" if kind == d["default"] else kind
            w(f"| {label} | {med[kind]:.2f} | {', '.join(f'{x:.2f}' for x in walls)} | "
              f"{', '.join(map(str, evals))} | {_its(r0['cg_iterations'])} | "
              f"{_its(r0['probe_cg_iterations'])} | {r0['criterion']:.4f}"
              f"{'' if same else ' (differs by round)'} | {r0['criterion_se']:.4f} | {diff} | "
              f"{min(loads):.2f}–{max(loads):.2f} |")
        dr = d["direct"]
        if dr is None:
            w(f"| direct | not run: dense Schur block of {d['schur']:,} levels | | | | | | "
              "| | |")
        elif "error" in dr:
            w(f"| direct | {dr['error']} | | | | | | | | |")
        else:
            diff = "–" if ref_theta is None else f"{_rel_theta(dr['theta'], ref_theta):.1e}"
            loads = [float(x.split()[0]) for x in dr["load"]]
            w(f"| direct (exact) | {dr['wall']:.2f} | one run | {dr['n_evaluations']} | – | – | "
              f"{dr['criterion']:.4f} | 0 | {diff} | {min(loads):.2f}–{max(loads):.2f} |")
        if med:
            ranked = sorted(med, key=med.get)
            fastest = ranked[0]
            dflt = med.get(d["default"])
            ratio = f"{med[fastest] / dflt:.2f}" if dflt else "–"
            runner = ranked[1] if len(ranked) > 1 else None
            second = (runner, med[runner] / med[fastest]) if runner else None
            headline.append((d["name"], fastest, med[fastest], d["default"], dflt, ratio,
                             second))
    return lines, headline


def write(results, args, elapsed, load_start, load_end):
    from lmmops.linalg.preconditioners import AUTO_LEVEL_KIND, LEVEL_KINDS

    body, headline = tables(results)
    default = results[0]["default"] if results else "?"
    lines = []
    w = lines.append
    cmd = ("PYTHONPATH=. python docs/studies/fit_kinds.py " + " ".join(args)).strip()
    w(f"Generated by `{cmd}` on {datetime.date.today().isoformat()} "
      f"({elapsed / 60:.0f} min, {platform.machine()}, {os.cpu_count()} cores shared with "
      f"other jobs). `/proc/loadavg` at the start: `{load_start}`; at the end: "
      f"`{load_end}`. The machine was loaded by other sessions throughout (see the *load 1m* "
      "column: the one-minute load average at the start and end of each fit), so compare "
      "the kinds of one design, measured interleaved, rather than absolute times.\n")
    w(f"Whole REML fits with `lmmops.fit(..., solver=\"iterative\", preconditioner=KIND, "
      f"n_probes={N_PROBES}, seed={SEED})`, every kind the iterative fit accepts "
      f"(`LEVEL_KINDS` = {', '.join(LEVEL_KINDS)}, less `identity`, which the fit does not "
      "take; `spectral` only for K = 2). Data: `simulate_crossed(n, levels, zipf=[1, ...], "
      f"sigma2={list(SIGMA2)}[:K], seed={DATA_SEED})`, the levels of the study's `zipf1` and "
      "`K3_zipf1` designs. Each fit in a fresh process after a warm-up fit of the same kind "
      "on 2,000 rows; wall time around `lmmops.fit` only; the kinds run in rounds, in order "
      "and reversed. *CG its/eval*: `res.solver_info['cg_iterations']`, the solve with the "
      "chosen kind (GLS right-hand sides and the auxiliary solves); *probe CG its/eval*: "
      "`probe_cg_iterations`, the probe block, always on Jacobi. *MC se*: the Monte Carlo "
      "standard error of the criterion (`2 * res.mc_stderr['loglik']`). *max rel. diff "
      f"theta*: `max_k |theta_k - theta_k(default)| / |theta_k(default)|`. The default kind "
      f"(**{default}**, `lmmops.estimation.iterative.DEFAULT_PRECONDITIONER`) is in bold. "
      f"(`solve_V`'s default, `AUTO_LEVEL_KIND`, is `{AUTO_LEVEL_KIND}`; the fit does not "
      "use it.)")
    lines += body
    w("\n**Fastest measured kind per design** (median wall time):\n")
    for name, fastest, t, dflt, td, ratio, second in headline:
        same = "the default" if fastest == dflt else f"not the default ({dflt}: {td:.2f} s)"
        nxt = "" if second is None else f"; next {second[0]}, {second[1]:.2f} x its time"
        w(f"- {name}: **{fastest}**, {t:.2f} s: {same}; fastest/default = {ratio}{nxt}.")
    w("\nThe chosen kind changes only the solve of the GLS and auxiliary columns (the *CG "
      "its/eval* column). The probe block (16 columns, 32 after the "
      "fit's fresh-probe check; the *probe* column) stays on Jacobi "
      "for every kind, because its control variates and Lanczos quadrature are built on "
      "`diag(M)`. With `jacobi` the GLS columns ride in the probe block (one fused block, "
      "one product by M per iteration for all columns). With any other kind they are "
      "solved in a block of their own with that kind, which takes fewer iterations but "
      "runs its own products and preconditioner applications beside the probe block's. "
      "Differences under about 10 % between kinds are within the "
      "round-to-round spread shown in *wall s, each round*.")
    return "\n".join(lines) + "\n", headline


def update_study(section_text, path):
    block = f"{BEGIN}\n## {SECTION}\n\n{section_text}{END}\n"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-1e6", action="store_true", help="skip the 10^6-row design")
    ap.add_argument("--rounds", type=int, default=3, help="rounds at 10^5 (default 3)")
    ap.add_argument("--rounds-1e6", type=int, default=2, help="rounds at 10^6 (default 2)")
    ap.add_argument("--direct-max-schur", type=int, default=3000,
                    help="run the direct fit when its dense Schur block has at most this "
                         "many levels (default 3000)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per fit")
    ap.add_argument("--n", type=int, default=10**5, help="rows of the small designs")
    ap.add_argument("--out", default=str(HERE / "fit_kinds.md"))
    ap.add_argument("--study", default=str(HERE / "solver_study.md"),
                    help="solver study to update ('' to leave it alone)")
    ap.add_argument("--json", help="also save the raw records here")
    ap.add_argument("--from-json", help="write the tables from a --json file, no fits")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        _write_all(saved["results"], saved["argv"], saved["elapsed"], saved["load_start"],
                   saved["load_end"], args)
        return
    n = args.n
    designs = [(f"zipf1, n = {n:,}", n, 2)]
    if not args.no_1e6:
        designs.append((f"zipf1, n = {10 * n:,}", 10 * n, 2))
    designs.append((f"K3_zipf1, n = {n:,}", n, 3))
    rounds = {n: args.rounds, 10 * n: args.rounds_1e6}
    with open("/proc/loadavg", encoding="ascii") as f:
        load_start = f.read().strip()
    t0 = time.perf_counter()
    results = study(designs, rounds, args.direct_max_schur, args.timeout)
    with open("/proc/loadavg", encoding="ascii") as f:
        load_end = f.read().strip()
    elapsed = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": results, "argv": argv, "elapsed": elapsed, "load_start": load_start,
             "load_end": load_end}, indent=1))
    _write_all(results, argv, elapsed, load_start, load_end, args)


def _write_all(results, argv, elapsed, load_start, load_end, args):
    text, _ = write(results, argv, elapsed, load_start, load_end)
    Path(args.out).write_text(f"# {SECTION}\n\n" + text)
    if args.study:
        update_study(text, Path(args.study))
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        main()
