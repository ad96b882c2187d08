"""Fit time on a busy machine: quiet against two competing CPU-bound processes.

Two fits, as in ``peers/load.py`` (which runs the same comparison interleaved and reports
the ratio with the load average):

- ``insteval``: the exact fit of lme4's InstEval,
  ``y ~ 1 + service + (1|s) + (1|d) + (1|dept)`` (a 1145-row dense Schur block);
- ``iterative``: a matrix-free fit of 10^6 simulated rows with 10^5 and 3000 levels
  (Zipf 0.8 and 1.0), ``y ~ 1 + (1|g1) + (1|g2)``, 16 probes.

``threads`` is the fit's ``threads=``: ``"auto"`` (the default) or ``"cores"``, one
thread per available core for BLAS and Numba (what the libraries do by themselves, so the
behaviour before lmmops controlled its threads). The competitors are pure-Python loops
started in ``setup`` and killed in ``teardown`` (they also stop by themselves after 15
minutes). Under ``LMMOPS_BENCH_TINY=1`` both fits use 1000 simulated rows, and only
``threads="auto"`` and (in ``FitUnderLoad``) two competitors run.
"""

import contextlib
import statistics
import subprocess
import sys
import time

from .bench_fit import THREE_FACTORS, load_insteval
from .common import TINY_N, pick, safe_import, warm_up_jit

with safe_import():
    import lmmops
    from lmmops.data.simulate import simulate_crossed
    from lmmops.threads import available_cores

ITERATIVE_FORMULA = "y ~ 1 + (1|g1) + (1|g2)"
ITERATIVE_N = pick(1_000_000, TINY_N)
ITERATIVE_LEVELS = pick([100_000, 3_000], [50, 20])
FITS = ["insteval", "iterative"]
THREADS = pick(["auto", "cores"], ["auto"])

_SPIN = ("import time\nend = time.monotonic() + {limit}\n"
         "while time.monotonic() < end:\n    sum(range(10000))\n")


@contextlib.contextmanager
def competing_processes(n, limit=900.0, own_session=True):
    """Run ``n`` CPU-bound Python processes (busy loops) for the duration of the block.

    Each stops by itself after ``limit`` seconds if the block is never left. With
    ``own_session`` (the default) they run in a new session, like programs started from
    another terminal: where Linux's autogroup scheduling is on
    (``/proc/sys/kernel/sched_autogroup_enabled``), the CPU is shared fairly between
    sessions first, so competitors in the fit's own session take their share from the
    fit alone (on a machine whose other sessions leave this one a core or less, three
    CPU-bound tasks in one session cannot run better than 3x slower each).
    """
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(limit=float(limit))],
                              start_new_session=own_session)
             for _ in range(int(n))]
    try:
        if procs:
            time.sleep(pick(0.5, 0.05))  # let them start and take the cores
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def fit_data(which):
    """The data and keyword arguments of one of :data:`FITS`."""
    if which == "insteval":
        return load_insteval(), THREE_FACTORS, {}
    df = simulate_crossed(ITERATIVE_N, ITERATIVE_LEVELS, zipf=[0.8, 1.0], sigma2=[0.5, 0.8],
                          seed=1)
    return df, ITERATIVE_FORMULA, {"solver": "iterative", "n_probes": 16}


def threads_arg(threads):
    """The ``threads=`` value of a benchmark parameter (``"cores"``: one per core)."""
    return available_cores() if threads == "cores" else threads


class FitUnderLoad:
    """Wall time of one fit with 0 or 2 competing CPU-bound processes."""

    params = [FITS, pick([0, 2], [2]), THREADS]
    param_names = ["fit", "competitors", "threads"]
    number = 1
    repeat = pick(3, 1)
    timeout = pick(1800, 60)

    def setup_cache(self):
        try:
            lmmops.fit  # noqa: B018
        except NameError:
            return {}
        return {which: fit_data(which) for which in FITS}

    setup_cache.timeout = 600

    def setup(self, data, fit, competitors, threads):
        if fit not in data:
            raise NotImplementedError("lmmops.fit is not available")
        try:
            available_cores  # noqa: B018
        except NameError:
            raise NotImplementedError("lmmops.threads is not available") from None
        warm_up_jit()
        self.df, self.formula, self.kwargs = data[fit]
        self.kwargs = dict(self.kwargs, threads=threads_arg(threads))
        lmmops.fit(self.formula, self.df, **self.kwargs)  # compile and warm the caches
        self._load = competing_processes(competitors)
        self._load.__enter__()

    def teardown(self, data, fit, competitors, threads):
        load = getattr(self, "_load", None)
        if load is not None:
            load.__exit__(None, None, None)

    def time_fit(self, data, fit, competitors, threads):
        lmmops.fit(self.formula, self.df, **self.kwargs)


class LoadSlowdown:
    """Loaded time over quiet time of one fit, measured interleaved (median of rounds)."""

    params = [FITS, THREADS]
    param_names = ["fit", "threads"]
    timeout = pick(3600, 120)
    rounds = pick(2, 1)

    setup_cache = FitUnderLoad.setup_cache

    def setup(self, data, fit, threads):
        FitUnderLoad.setup(self, data, fit, 0, threads)

    def teardown(self, data, fit, threads):
        FitUnderLoad.teardown(self, data, fit, 0, threads)

    def _time(self):
        t0 = time.perf_counter()
        lmmops.fit(self.formula, self.df, **self.kwargs)
        return time.perf_counter() - t0

    def track_slowdown(self, data, fit, threads):
        quiet, loaded = [], []
        for _ in range(self.rounds):
            quiet.append(self._time())
            with competing_processes(2):
                loaded.append(self._time())
        return statistics.median(loaded) / statistics.median(quiet)

    track_slowdown.unit = "loaded / quiet"
