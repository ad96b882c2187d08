"""Run compare.py over simulated sizes and InstEval; write a table, a JSON and a plot.

One command fits the same data with lmmops and every installed peer (lme4, mixedlm,
statsmodels, GPBoost with its Cholesky and its iterative solver) at each simulated size
and on lme4's InstEval, each size through ``compare.py --json`` in its own subprocess
(and each program in its own process there). By default it fits by ML, the only method
GPBoost has, so every criterion is comparable with lmmops' ML deviance.

The simulated designs are two crossed Zipf(1.0)-skewed factors (``lmmops simulate``,
variances 0.5 and 0.8, residual 1, ``y ~ 1 + (1|g1) + (1|g2)``) with the level counts used
in SCALE.md: 10^5 rows with 10^4 x 10^3 levels, 10^6 with 10^5 x 3 x 10^3 and 10^7 with
10^6 x 3 x 10^4 (other sizes: n / 10 levels for the first factor, the second interpolated
log-linearly in n between those, e.g. 1000 x 316 at 10^4; or give them as
``N:L1xL2``).

Outputs, in ``--out-dir``:

- ``sweep.md``: n, system, warm and first time, peak RSS, criterion, criterion minus
  lmmops', whether lmmops' likelihood is equal or better, time ratio to lmmops, and the
  load average before and after each run; a peer that is not installed, not supported,
  failed or timed out says so in its row.
- ``sweep.json``: every compare.py report, plus the rows of the table.
- ``sweep.png``: time against n on log-log axes, one line per system over the simulated
  sizes, InstEval as separate star markers, runs that timed out as open markers at the
  timeout. It needs matplotlib (the ``plot`` extra); without it the table says so.

Examples
--------
python asv_benchmarks/peers/sweep.py                    # 1e5,1e6,1e7 + InstEval, all peers
python asv_benchmarks/peers/sweep.py --sizes 1e4,1e5 --peers lme4,gpboost,gpboost-iterative
python asv_benchmarks/peers/sweep.py --sizes 2e5:2e4x1500 --no-insteval --timeout 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(HERE, "compare.py")
sys.path.insert(0, HERE)
from compare import ALL_PEERS, add_run_options  # noqa: E402

#: level counts of the simulated K = 2 designs used so far (SCALE.md)
LEVELS = {10**5: (10**4, 10**3), 10**6: (10**5, 3 * 10**3), 10**7: (10**6, 3 * 10**4)}
INSTEVAL_N = 73421


def levels_for(n):
    """Level counts of the simulated design with ``n`` rows.

    Parameters
    ----------
    n : int
        Number of rows.

    Returns
    -------
    tuple of (int, int)
        ``LEVELS[n]`` when tabulated; else ``n // 10`` and the second factor's count
        interpolated (or extrapolated) log-linearly in ``n`` from the tabulated sizes.
    """
    if n in LEVELS:
        return LEVELS[n]
    pts = sorted(LEVELS.items())
    x = math.log10(n)
    xs = [math.log10(k) for k, _ in pts]
    ys = [math.log10(v[1]) for _, v in pts]
    i = 0 if x < xs[1] else 1  # the segment below 10^6 or the one above
    y = ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    return max(2, n // 10), max(2, round(10**y))


def parse_sizes(text):
    """Sizes as ``[(n, (levels1, levels2)), ...]``.

    Parameters
    ----------
    text : str
        Comma-separated ``N`` or ``N:L1xL2`` items, e.g. ``"1e5,1e6:1e5x3e3"``.

    Returns
    -------
    list of tuple
    """
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            n, lv = item.split(":", 1)
            n = int(float(n))
            l1, l2 = (int(float(v)) for v in lv.lower().split("x"))
            out.append((n, (l1, l2)))
        else:
            n = int(float(item))
            out.append((n, levels_for(n)))
    return out


def loadavg():
    """The 1, 5 and 15 minute load averages as text.

    Returns
    -------
    str
    """
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_compare(data_args, args, peers):
    """One compare.py run (``--json``) in a subprocess.

    Parameters
    ----------
    data_args : list of str
        compare.py's data options (``--simulate ...`` or ``--dataset insteval``).
    args : argparse.Namespace
        The sweep's options.
    peers : list of str
        Peers to run.

    Returns
    -------
    dict
        compare.py's report, or ``{"error": ...}`` when it failed as a whole.
    """
    cmd = [sys.executable, COMPARE, *data_args, "--method", args.method,
           "--peers", ",".join(peers) or "none", "--timeout", str(args.timeout),
           "--repeat", str(args.repeat), "--mem-limit-gb", str(args.mem_limit_gb),
           "--no-cold", "--json"]
    if args.no_single_blas:
        cmd.append("--no-single-blas")
    # every run inside compare.py has its own timeout; this is only a backstop
    backstop = args.timeout * (len(peers) + 3) + 600
    before = loadavg()
    print(f"[sweep] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=backstop)
    except subprocess.TimeoutExpired:
        return {"error": f"compare.py did not finish in {backstop:g} s",
                "loadavg": before, "loadavg_after": loadavg()}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": (err[-1] if err else f"exit code {proc.returncode}")[:300],
                "loadavg": before, "loadavg_after": loadavg()}


def _status(r):
    if "error" not in r:
        return "ok"
    if r.get("timed_out"):
        return "timed out"
    if r.get("not_installed"):
        return "not installed"
    if r.get("not_supported"):
        return "not supported"
    return "failed"


def _warm(r):
    ws = r.get("times_warm") or []
    return min(ws) if ws else r.get("time_first")


def rows_of(label, n, report):
    """The table rows of one compare.py report.

    Parameters
    ----------
    label : str
        The data set's label (``simulated`` or ``InstEval``).
    n : int
        Rows of the data.
    report : dict
        compare.py's report.

    Returns
    -------
    list of dict
    """
    if "results" not in report:
        return [{"data": label, "n": n, "system": "(all)", "status": "failed",
                 "error": report.get("error"), "loadavg_before": report.get("loadavg"),
                 "loadavg_after": report.get("loadavg_after")}]
    res = report["results"]
    base = res.get("lmmops", {})
    t0 = _warm(base) if "error" not in base else None
    rows = []
    for name, r in res.items():
        t = _warm(r) if "error" not in r else None
        rss = r.get("peak_rss_kib")
        rows.append({
            "data": label, "n": report.get("n_obs", n), "system": name,
            "status": _status(r), "error": r.get("error"),
            "version": r.get("version"), "time_warm_s": t, "time_first_s": r.get("time_first"),
            "timeout_s": r.get("timeout_s"), "peak_rss_mib": None if rss is None else rss / 1024,
            "criterion": r.get("criterion"),
            "criterion_minus_lmmops": 0.0 if name == "lmmops" and t is not None
            else r.get("criterion_minus_lmmops"),
            "criterion_compared": r.get("criterion_compared"),
            "lmmops_equal_or_better": r.get("lmmops_equal_or_better"),
            "time_ratio_to_lmmops": t / t0 if t is not None and t0 else None,
            "iterations": r.get("iterations"),
            "loadavg_before": r.get("loadavg_before"), "loadavg_after": r.get("loadavg_after"),
        })
    return rows


def _f(x, digits=4):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(sweep):
    """The sweep's markdown table.

    Parameters
    ----------
    sweep : dict
        The sweep's JSON.

    Returns
    -------
    str
    """
    lines = [f"## Peer sweep ({sweep['method']})", "",
             f"Command: `{sweep['command']}`", "",
             f"Machine: {sweep['machine']}; date: {sweep['date']}; load average before the "
             f"sweep: {sweep['loadavg_before']}, after: {sweep['loadavg_after']}; per-run "
             f"timeout {sweep['timeout_s']:g} s.", "",
             "| data | n | system | version | warm fit (s) | first fit (s) | peak RSS (MiB) | "
             "criterion | criterion - lmmops | lmmops equal or better | time / lmmops | "
             "load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        load = f"{r.get('loadavg_before') or '-'} / {r.get('loadavg_after') or '-'}"
        if r["status"] != "ok":
            err = r.get("error") or ""
            msg = err if err.startswith(r["status"]) else f"{r['status']}: {err}"
            lines.append(f"| {r['data']} | {r['n']} | {r['system']} | - | {msg} "
                         f"| | | | | | | {load} |")
            continue
        if r["system"] == "lmmops":
            dcrit, better = "0", "-"
        elif r.get("criterion_compared") is False:
            dcrit, better = "ML only (not compared)", "-"
        else:
            dcrit, better = _f(r["criterion_minus_lmmops"]), _f(r["lmmops_equal_or_better"])
        lines.append(
            f"| {r['data']} | {r['n']} | {r['system']} | {r.get('version') or ''} | "
            f"{_f(r['time_warm_s'])} | {_f(r['time_first_s'])} | {_f(r['peak_rss_mib'])} | "
            f"{_f(r['criterion'], 12)} | {dcrit} | {better} | "
            f"{_f(r['time_ratio_to_lmmops'], 3)} | {load} |")
    lines += ["", "Times: wall seconds around the fit call only (warm: best of the repeated "
              "fits; gpboost, lme4 and mixedlm with `--repeat 1` have no separate warm fit). "
              "Peak RSS: the worker process, data reading included (lme4: the R process). "
              "criterion: -2 log-likelihood (ML deviance) or the REML criterion; "
              "'equal or better': lmmops' criterion at most the peer's, to a relative 1e-9. "
              "GPBoost's iterative solver reports a stochastic estimate of its likelihood."]
    skipped = sorted({(r["system"], r.get("error")) for r in sweep["rows"]
                      if r["status"] == "not installed"})
    for name, err in skipped:
        lines.append(f"- skipped {name}: {err}")
    lines += ["", f"Plot: {sweep.get('plot') or 'none'}"]
    return "\n".join(lines)


def plot(sweep, path):
    """Time against n on log-log axes, one line per system.

    Parameters
    ----------
    sweep : dict
        The sweep's JSON.
    path : str
        PNG file to write.

    Returns
    -------
    str
        ``path``, or the reason no plot was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not written: matplotlib is not installed (pip install 'lmmops[plot]')"
    systems = []
    for r in sweep["rows"]:
        if r["system"] != "(all)" and r["system"] not in systems:
            systems.append(r["system"])
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = False
    for k, name in enumerate(systems):
        color = f"C{k % 10}"
        sim = sorted((r for r in sweep["rows"] if r["system"] == name
                      and r["data"] == "simulated"), key=lambda r: r["n"])
        ok = [(r["n"], r["time_warm_s"]) for r in sim if r["status"] == "ok"]
        late = [(r["n"], r["timeout_s"]) for r in sim if r["status"] == "timed out"]
        ins = [r for r in sweep["rows"] if r["system"] == name and r["data"] == "InstEval"]
        if ok:
            ax.plot(*zip(*ok), "o-", color=color, label=name)
            drawn = True
        if late:
            ax.plot(*zip(*late), "o", mfc="none", color=color,
                    label=None if ok else f"{name} (timed out)")
            drawn = True
        for r in ins:
            if r["status"] == "ok":
                ax.plot(r["n"], r["time_warm_s"], "*", ms=11, color=color)
                drawn = True
            elif r["status"] == "timed out":
                ax.plot(r["n"], r["timeout_s"], "*", ms=11, mfc="none", color=color)
                drawn = True
    if not drawn:
        plt.close(fig)
        return "not written: no finished run"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows n")
    ax.set_ylabel("fit time (s)")
    ax.set_title(f"{sweep['method']} fit time; stars: InstEval; open: timed out "
                 f"({sweep['timeout_s']:g} s)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7",
                   help="simulated sizes, N or N:L1xL2, comma-separated ('' for none)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of both factors")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-insteval", action="store_true", help="skip InstEval")
    add_run_options(p, method="ML", repeat=2)
    p.add_argument("--out-dir", default="sweep-results",
                   help="folder for sweep.md, sweep.json and sweep.png")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    peers = [] if args.peers.strip().lower() == "none" else [
        p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {ALL_PEERS}")
    sizes = parse_sizes(args.sizes)
    os.makedirs(args.out_dir, exist_ok=True)
    sweep = {
        "command": " ".join(["python", os.path.relpath(__file__)] + list(
            sys.argv[1:] if argv is None else argv)),
        "method": args.method, "peers": peers, "timeout_s": args.timeout,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}",
        "loadavg_before": loadavg(), "runs": [], "rows": [],
    }
    for n, (l1, l2) in sizes:
        data = ["--simulate", f"{n},{l1},{l2}", "--zipf", f"{args.zipf},{args.zipf}",
                "--seed", str(args.seed)]
        report = run_compare(data, args, peers)
        sweep["runs"].append({"data": "simulated", "n": n, "levels": [l1, l2],
                              "report": report})
        sweep["rows"] += rows_of("simulated", n, report)
    if not args.no_insteval:
        report = run_compare(["--dataset", "insteval"], args, peers)
        sweep["runs"].append({"data": "InstEval", "n": INSTEVAL_N, "report": report})
        sweep["rows"] += rows_of("InstEval", INSTEVAL_N, report)
    sweep["loadavg_after"] = loadavg()
    sweep["plot"] = "not written (--no-plot)" if args.no_plot else plot(
        sweep, os.path.join(args.out_dir, "sweep.png"))
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as fh:
        json.dump(sweep, fh, indent=2)
    text = markdown(sweep)
    with open(os.path.join(args.out_dir, "sweep.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
