"""Before/after comparison of the asv benchmarks of two lmmops checkouts, interleaved.

Each side is a repository path (a checkout or git worktree). A side's benchmarks are its
own ``asv_benchmarks/benchmarks`` package run against its own ``lmmops``
(``PYTHONPATH=<repo>``), because benchmark modules import names that move between
versions. Every ``time_`` and ``peakmem_`` benchmark (per parameter combination) that
exists on both sides is measured; the ones present on only one side are listed.

How it measures, close to what ``asv run`` does but interleaved:

- ``setup_cache`` runs once per class and side, in its own process; its result is pickled
  and loaded by every later process of that side (asv does the same).
- In each round, for each (class, parameter combination) one fresh process per side runs
  ``setup``, then for each ``time_`` method one warm-up call and samples of ``number``
  calls (the class's ``number``, or enough calls for 10 ms, as asv chooses) until
  ``--max-samples`` samples or ``--max-time`` seconds (the class's ``repeat``, if set, caps
  the samples; a call longer than ``--max-time`` gives one sample, like ``asv --quick``).
  Each ``peakmem_`` method runs in a process of its own after ``setup``; its value is the
  process's peak RSS (``ru_maxrss``), which includes setup, as in asv.
- The two sides alternate within a round (base, new) and swap order every other round
  (new, base), so slow drifts of the machine's load hit both.
- The figure per benchmark and side is the median over all samples of all rounds; the
  ratio is new/base. Benchmarks whose ratio exceeds ``1 + --threshold`` are measured again
  for ``--remeasure`` more interleaved rounds, and the re-measured ratio is reported too.
- ``/proc/loadavg`` is read at the start and end of every process; the table gives the
  range of the one-minute load average over a benchmark's processes.

The markdown report (``--out``) keeps any text below the line ``<!-- analysis -->`` of an
existing file, so hand-written analysis survives a re-run. ``--json`` saves the raw
samples.

Examples::

    python asv_benchmarks/peers/before_after.py /work/wt/base /work/wt/measure
    python asv_benchmarks/peers/before_after.py OLD NEW --bench 'InstEvalFit|SolveV' \\
        --rounds 3 --out /tmp/ba.md
    python asv_benchmarks/peers/before_after.py OLD NEW --list
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import itertools
import json
import os
import pickle
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import timeit
import traceback

PREFIXES = ("time_", "peakmem_")
MARKER = "<!-- analysis -->"
SAMPLE_TIME = 0.01  # asv's default sample_time: a sample lasts at least this long


# ----------------------------------------------------------------------------- child side
def _import_modules(asv_dir):
    sys.path.insert(0, asv_dir)
    pkg = importlib.import_module("benchmarks")
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
    return {n: importlib.import_module(f"benchmarks.{n}") for n in names if n != "common"}


def _param_lists(cls):
    params = getattr(cls, "params", [])
    if not params:
        return []
    if not all(isinstance(p, (list, tuple)) for p in params):
        return [list(params)]  # asv: a flat list is one parameter
    return [list(p) for p in params]


def _classes(modules):
    for mname, mod in modules.items():
        for cname, obj in sorted(vars(mod).items()):
            if isinstance(obj, type) and getattr(obj, "__module__", None) == mod.__name__:
                methods = sorted(m for m in dir(obj) if m.startswith(PREFIXES))
                if methods:
                    yield mname, cname, obj, methods


def _loadavg():
    with open("/proc/loadavg", encoding="ascii") as f:
        return f.read().strip()


def child_list(asv_dir):
    modules = _import_modules(asv_dir)
    out = []
    for mname, cname, cls, methods in _classes(modules):
        plists = _param_lists(cls)
        combos = list(itertools.product(*plists)) if plists else [()]
        for i, combo in enumerate(combos):
            for m in methods:
                out.append({"module": mname, "cls": cname, "method": m, "index": i,
                            "params": [repr(p) for p in combo],
                            "param_names": list(getattr(cls, "param_names", [])),
                            "has_cache": hasattr(cls, "setup_cache"),
                            "timeout": getattr(cls, "timeout", 60)})
    import lmmops

    return {"benchmarks": out, "lmmops": os.path.dirname(lmmops.__file__)}


def _get_class(asv_dir, mname, cname):
    modules = _import_modules(asv_dir)
    return getattr(modules[mname], cname)


def _combo(cls, index):
    plists = _param_lists(cls)
    combos = list(itertools.product(*plists)) if plists else [()]
    return list(combos[index])


def child_cache(asv_dir, mname, cname, path):
    cls = _get_class(asv_dir, mname, cname)
    t0 = time.perf_counter()
    value = cls.setup_cache(cls())
    with open(path, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"seconds": time.perf_counter() - t0}


def _prepare(asv_dir, mname, cname, index, cache_path):
    cls = _get_class(asv_dir, mname, cname)
    args = _combo(cls, index)
    if cache_path:
        with open(cache_path, "rb") as f:
            args = [pickle.load(f)] + args
    inst = cls()
    return cls, inst, args


def _run_setup(inst, args):
    if hasattr(inst, "setup"):
        inst.setup(*args)


def _teardown(inst, args):
    if hasattr(inst, "teardown"):
        try:
            inst.teardown(*args)
        except Exception:  # noqa: BLE001 - reported, not fatal
            traceback.print_exc()


def child_time(asv_dir, mname, cname, index, cache_path, methods, max_samples, max_time):
    load0 = _loadavg()
    cls, inst, args = _prepare(asv_dir, mname, cname, index, cache_path)
    t0 = time.perf_counter()
    try:
        _run_setup(inst, args)
    except NotImplementedError as e:
        return {"skipped": f"setup raised NotImplementedError: {e}", "load": [load0]}
    setup_s = time.perf_counter() - t0
    results = {}
    for m in methods:
        fn = getattr(inst, m)

        def call(fn=fn):
            fn(*args)

        number = getattr(fn, "number", getattr(cls, "number", 0))
        cap = getattr(fn, "repeat", getattr(cls, "repeat", 0))
        cap = cap if isinstance(cap, int) and cap > 0 else max_samples
        timer = timeit.Timer(call, timer=time.perf_counter)
        w0 = time.perf_counter()
        call()  # warm-up
        once = time.perf_counter() - w0
        if not number:
            number = max(1, int(SAMPLE_TIME / max(once, 1e-9)))
        samples = []
        start = time.perf_counter()
        while len(samples) < cap:
            samples.append(timer.timeit(number) / number)
            if time.perf_counter() - start + samples[-1] * number > max_time:
                break
        results[m] = {"samples": samples, "number": number, "warmup_s": once}
    _teardown(inst, args)
    return {"results": results, "setup_s": setup_s, "load": [load0, _loadavg()]}


def child_peakmem(asv_dir, mname, cname, index, cache_path, method):
    load0 = _loadavg()
    cls, inst, args = _prepare(asv_dir, mname, cname, index, cache_path)
    try:
        _run_setup(inst, args)
    except NotImplementedError as e:
        return {"skipped": f"setup raised NotImplementedError: {e}", "load": [load0]}
    gc.collect()
    getattr(inst, method)(*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    _teardown(inst, args)
    return {"results": {method: {"samples": [float(peak)]}}, "load": [load0, _loadavg()]}


def child_main(argv):
    spec = json.loads(argv[0])
    kind = spec.pop("kind")
    fn = {"list": child_list, "cache": child_cache, "time": child_time,
          "peakmem": child_peakmem}[kind]
    try:
        out = fn(**spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    sys.stdout.write("\n@@RESULT@@" + json.dumps(out) + "\n")


# ---------------------------------------------------------------------------- parent side
class Side:
    def __init__(self, label, repo, workdir):
        self.label = label
        self.repo = os.path.abspath(repo)
        self.asv_dir = os.path.join(self.repo, "asv_benchmarks")
        self.workdir = os.path.join(workdir, label)
        os.makedirs(self.workdir, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = self.repo
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        # the Numba cache outside the checkout (leaves the trees untouched)
        self.env["NUMBA_CACHE_DIR"] = os.path.join(self.workdir, "numba-cache")
        self.commit = _git(self.repo, "rev-parse", "--short", "HEAD")

    def run(self, spec, timeout):
        spec = dict(spec, asv_dir=self.asv_dir)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
        try:
            p = subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        marker = p.stdout.rfind("@@RESULT@@")
        if marker < 0:
            return {"error": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}"}
        return json.loads(p.stdout[marker + len("@@RESULT@@"):].strip())


def _git(repo, *args):
    try:
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _key(b):
    return (b["module"], b["cls"], b["method"], tuple(b["params"]))


def _group_key(b):
    return (b["module"], b["cls"], b["index"])


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


class Comparison:
    def __init__(self, args, argv=None):
        self.args = args
        self.sides = [Side("base", args.base, args.workdir), Side("new", args.new, args.workdir)]
        self.listing = {}
        self.lmmops_paths = {}
        for s in self.sides:
            r = s.run({"kind": "list"}, timeout=600)
            if "error" in r:
                raise SystemExit(f"listing the benchmarks of {s.repo} failed: {r['error']}\n"
                                 + r.get("traceback", ""))
            self.listing[s.label] = {_key(b): b for b in r["benchmarks"]}
            self.lmmops_paths[s.label] = r["lmmops"]
        pat = re.compile(args.bench) if args.bench else None
        ppat = re.compile(args.params) if args.params else None

        def wanted(k):
            return ((pat is None or pat.search(".".join(k[:3])))
                    and (ppat is None or ppat.search(self._params(k))))

        base, new = self.listing["base"], self.listing["new"]
        self.common = [k for k in new if k in base and wanted(k)]
        self.only_new = [k for k in new if k not in base]
        self.only_base = [k for k in base if k not in new]
        # index of the parameter combination on each side (same params, maybe other order)
        self.samples = {k: {"base": [], "new": []} for k in self.common}
        self.loads = {k: [] for k in self.common}
        self.rounds = {k: [] for k in self.common}  # per round: (base median, new median)
        self.notes = {k: [] for k in self.common}
        self.cache_paths = {"base": {}, "new": {}}
        self.cache_seconds = {}
        self.command = " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
        self.load_start = _loadavg()
        self.started = time.time()

    # groups: (module, cls, index on the new side) -> keys
    def groups(self, keys):
        out = {}
        for k in keys:
            b = self.listing["new"][k]
            out.setdefault(_group_key(b), []).append(k)
        return out

    def build_caches(self, keys):
        classes = sorted({(k[0], k[1]) for k in keys})
        for mname, cname in classes:
            for s in self.sides:
                some = next(self.listing[s.label][k] for k in keys if k[:2] == (mname, cname))
                if not some["has_cache"] or (mname, cname) in self.cache_paths[s.label]:
                    continue
                path = os.path.join(s.workdir, f"cache-{mname}.{cname}.pkl")
                _log(f"setup_cache {mname}.{cname} [{s.label}]")
                r = s.run({"kind": "cache", "mname": mname, "cname": cname, "path": path},
                          timeout=3600)
                if "error" in r:
                    _log(f"  setup_cache failed: {r['error']}")
                    self.cache_paths[s.label][mname, cname] = None
                else:
                    self.cache_paths[s.label][mname, cname] = path
                    self.cache_seconds[s.label, mname, cname] = r["seconds"]

    def measure_round(self, keys, order):
        for (mname, cname, _), gkeys in self.groups(keys).items():
            tkeys = [k for k in gkeys if k[2].startswith("time_")]
            pkeys = [k for k in gkeys if k[2].startswith("peakmem_")]
            for s in order:
                info = self.listing[s.label][gkeys[0]]
                cache = None
                if info["has_cache"]:
                    cache = self.cache_paths[s.label].get((mname, cname))
                    if cache is None:
                        for k in gkeys:
                            self.notes[k].append(f"{s.label}: setup_cache failed")
                        continue
                index = info["index"]
                timeout = max(60.0, 3.0 * float(info["timeout"] or 60))
                jobs = []
                if tkeys:
                    jobs.append((tkeys, {"kind": "time", "mname": mname, "cname": cname,
                                         "index": index, "cache_path": cache,
                                         "methods": [k[2] for k in tkeys],
                                         "max_samples": self.args.max_samples,
                                         "max_time": self.args.max_time}))
                for k in pkeys:
                    jobs.append(([k], {"kind": "peakmem", "mname": mname, "cname": cname,
                                       "index": index, "cache_path": cache,
                                       "method": k[2]}))
                for ks, spec in jobs:
                    _log(f"{s.label}: {mname}.{cname}{list(ks[0][3])} "
                         + ", ".join(k[2] for k in ks))
                    r = s.run(spec, timeout=timeout)
                    self._record(s.label, ks, r)

    def _record(self, side, keys, r):
        for k in keys:
            if "error" in r or "skipped" in r:
                msg = r.get("error") or r.get("skipped")
                self.notes[k].append(f"{side}: {msg.splitlines()[0][:200]}")
                _log(f"  {side} {k[2]}: {msg.splitlines()[0][:200]}")
                continue
            res = r["results"][k[2]]
            self.samples[k][side].append(res["samples"])
            self.loads[k].extend(float(x.split()[0]) for x in r["load"])
            if len(res["samples"]) == 1 and k[2].startswith("time_"):
                note = "one sample per process"
                if note not in self.notes[k]:
                    self.notes[k].append(note)
            _log(f"  {side} {k[2]}: median {statistics.median(res['samples']):.4g} "
                 f"({len(res['samples'])} samples)")

    def run(self):
        keys = self.common
        self.build_caches(keys)
        for r in range(self.args.rounds):
            order = self.sides if r % 2 == 0 else self.sides[::-1]
            _log(f"round {r + 1}/{self.args.rounds} ({order[0].label} first)")
            self.measure_round(keys, order)
        self.first = {k: self.summary(k) for k in keys}
        self.slow = [k for k in keys
                     if self.first[k]["ratio"] is not None
                     and self.first[k]["ratio"] > 1 + self.args.threshold]
        self.remeasured = {}
        if self.slow and self.args.remeasure:
            _log(f"re-measuring {len(self.slow)} benchmarks slower by more than "
                 f"{self.args.threshold:.0%}")
            saved = {k: self.samples[k] for k in self.slow}
            for k in self.slow:
                self.samples[k] = {"base": [], "new": []}
                self.loads[k] = []
            for r in range(self.args.remeasure):
                order = self.sides if r % 2 == 0 else self.sides[::-1]
                _log(f"re-measure round {r + 1}/{self.args.remeasure}")
                self.measure_round(self.slow, order)
            for k in self.slow:
                self.remeasured[k] = self.summary(k)
                self.samples[k] = {"first": saved[k], **self.samples[k]}
        self.load_end = _loadavg()
        self.elapsed = time.time() - self.started

    def summary(self, k):
        s = self.samples[k]
        flat = {side: [x for proc in s[side] for x in proc] for side in ("base", "new")}
        med = {side: statistics.median(v) if v else None for side, v in flat.items()}
        ratio = (med["new"] / med["base"]) if med["base"] and med["new"] else None
        per_round = []
        for b, n in zip(s["base"], s["new"]):
            if b and n:
                per_round.append(statistics.median(n) / statistics.median(b))
        loads = self.loads[k]
        return {"base": med["base"], "new": med["new"], "ratio": ratio,
                "per_round": per_round, "n": {side: len(v) for side, v in flat.items()},
                "load": (min(loads), max(loads)) if loads else None}

    # ------------------------------------------------------------------------- report
    def report(self):
        a = self.args
        lines = []
        w = lines.append
        w("# asv benchmarks before and after\n")
        w(f"Generated by `python asv_benchmarks/peers/before_after.py {self.command}` on "
          f"{datetime.date.today().isoformat()} ({self.elapsed / 60:.0f} min; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          "shared with other jobs).\n")
        w(f"- **base**: `{a.base}` at {self.sides[0].commit} (lmmops from "
          f"`{self.lmmops_paths['base']}`, its own `asv_benchmarks/benchmarks`)")
        w(f"- **new**: `{a.new}` at {self.sides[1].commit} (lmmops from "
          f"`{self.lmmops_paths['new']}`, its own `asv_benchmarks/benchmarks`)")
        w(f"- `/proc/loadavg` at the start: `{self.load_start}`; at the end: "
          f"`{self.load_end}`\n")
        w(f"Each round runs every benchmark once per side in fresh processes, base and new "
          f"alternating (order swapped every other round); {a.rounds} rounds. *base*, *new*: "
          f"median over all samples (a sample is the mean of `number` calls; up to "
          f"{a.max_samples} samples or {a.max_time:g} s per process, after a warm-up call); "
          "time in seconds, peakmem in MiB (peak RSS of the process, setup included). "
          "*ratio* = new/base; *per round*: the ratio of each round's medians. *load 1m*: "
          "range of the one-minute load average read at the start and end of the "
          "benchmark's processes. Benchmarks slower by more than "
          f"{a.threshold:.0%} were re-measured in {a.remeasure} further interleaved rounds "
          "(second table).\n")
        w("| benchmark | params | base | new | ratio | per round | samples b/n | load 1m "
          "| notes |")
        w("|---|---|---|---|---|---|---|---|---|")
        for k in self.common:
            w(self._row(k, self.first[k]))
        if self.slow and not self.remeasured:
            w(f"\n{len(self.slow)} benchmarks above {1 + a.threshold:.2f}, not re-measured "
              "(`--remeasure 0`).")
        elif self.slow:
            w(f"\n## Re-measured (first ratio above {1 + a.threshold:.2f})\n")
            if self.remeasured:
                w("| benchmark | params | base | new | ratio | per round | samples b/n | "
                  "load 1m | notes |")
                w("|---|---|---|---|---|---|---|---|---|")
                for k in self.slow:
                    w(self._row(k, self.remeasured[k]))
            still = [k for k in self.slow
                     if k in self.remeasured and (self.remeasured[k]["ratio"] or 0)
                     > 1 + a.threshold]
            w("\nStill slower after re-measuring: "
              + (", ".join(f"`{self._name(k)}` {self._params(k)}" for k in still)
                 if still else "none") + ".")
        else:
            w(f"\nNo benchmark was slower by more than {a.threshold:.0%}.")
        w("\n## Not compared\n")
        if self.only_new:
            w("New (in the new tree only, not run here): "
              + ", ".join(sorted({f"`{self._name(k)}`" for k in self.only_new})) + ".")
        if self.only_base:
            w("\nIn the base tree only: "
              + ", ".join(sorted({f"`{self._name(k)}`" for k in self.only_base})) + ".")
        if not self.only_new and not self.only_base:
            w("Both trees have the same time_/peakmem_ benchmarks.")
        w("\n`track_` benchmarks (iteration counts, criteria, errors) are values, not "
          "timings, and are not compared by this script.")
        if self.cache_seconds:
            w("\n`setup_cache` seconds (once per class and side, not compared): "
              + ", ".join(f"{c} {s}: {v:.1f}" for (s, _, c), v in
                          sorted(self.cache_seconds.items(), key=lambda x: x[0][::-1])) + ".")
        text = "\n".join(lines) + "\n"
        if os.path.exists(a.out):
            with open(a.out, encoding="utf-8") as f:
                old = f.read()
            if MARKER in old:
                text += "\n" + MARKER + old.split(MARKER, 1)[1]
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump({".".join(k[:3]) + repr(list(k[3])): self.samples[k]
                           for k in self.common}, f, indent=1)
        print(text)

    def _name(self, k):
        return f"{k[0]}.{k[1]}.{k[2]}"

    def _params(self, k):
        b = self.listing["new"][k]
        if not b["params"]:
            return ""
        names = b["param_names"] or [f"p{i}" for i in range(len(b["params"]))]
        return ", ".join(f"{n}={v}" for n, v in zip(names, b["params"]))

    def _row(self, k, s):
        mem = k[2].startswith("peakmem_")

        def fmt(x):
            if x is None:
                return "–"
            return f"{x / 2**20:.0f}" if mem else f"{x:.4g}"

        ratio = "–" if s["ratio"] is None else f"{s['ratio']:.3f}"
        if s["ratio"] is not None and s["ratio"] > 1 + self.args.threshold:
            ratio = f"**{ratio}**"
        pr = ", ".join(f"{x:.2f}" for x in s["per_round"]) or "–"
        load = "–" if s["load"] is None else f"{s['load'][0]:.2f}–{s['load'][1]:.2f}"
        notes = "; ".join(self.notes[k])
        return (f"| `{self._name(k)}` | {self._params(k)} | {fmt(s['base'])} | "
                f"{fmt(s['new'])} | {ratio} | {pr} | {s['n']['base']}/{s['n']['new']} | "
                f"{load} | {notes} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="repository path of the 'before' checkout")
    ap.add_argument("new", help="repository path of the 'after' checkout")
    ap.add_argument("--bench", help="regex on module.Class.method (as asv --bench)")
    ap.add_argument("--params", help="regex on the parameters as the table prints them "
                                     "(e.g. 'n=10000000, K=3')")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--remeasure", type=int, default=5,
                    help="extra interleaved rounds for benchmarks over the threshold")
    ap.add_argument("--threshold", type=float, default=0.10,
                    help="relative slowdown that triggers a re-measure (default 0.10)")
    ap.add_argument("--max-samples", type=int, default=7)
    ap.add_argument("--max-time", type=float, default=4.0,
                    help="seconds of samples per method and process (default 4)")
    ap.add_argument("--workdir", default="/tmp/before_after",
                    help="caches, Numba caches and child working directories")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "BEFORE_AFTER.md"))
    ap.add_argument("--json", help="also save the raw samples here")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    comp = Comparison(args, argv)
    if args.list:
        for k in comp.common:
            print("both    ", comp._name(k), list(k[3]))
        for k in comp.only_new:
            print("new only", comp._name(k), list(k[3]))
        for k in comp.only_base:
            print("base only", comp._name(k), list(k[3]))
        return
    comp.run()
    comp.report()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
