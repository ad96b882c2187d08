"""Shared helpers of the lmmops asv benchmarks.

- :func:`safe_import` lets a benchmark module import on older commits that lack a
  feature (the scipy pattern): a failed import inside the ``with`` block leaves the
  names undefined, and the benchmark's ``setup`` raises ``NotImplementedError``.
- :data:`TINY` is true when the environment variable ``LMMOPS_BENCH_TINY`` is set to
  anything but ``""``/``"0"``. Benchmark classes then swap their parameters for tiny
  ones (n = 10^3), so ``tests/test_benchmarks.py`` can run every benchmark once quickly.
- :func:`crossed_codes` builds (and memoises per process) the level codes of a
  synthetic crossed design with Zipf-skewed level frequencies.
"""

import contextlib
import os

__all__ = [
    "LEVELS",
    "TINY",
    "TINY_N",
    "ZIPF",
    "crossed_codes",
    "evaluation_benchmarks",
    "pick",
    "safe_import",
    "warm_up_jit",
]

TINY = os.environ.get("LMMOPS_BENCH_TINY", "") not in ("", "0")

#: Observations in tiny mode.
TINY_N = 1_000

#: Levels and Zipf exponents of the synthetic factors (the CLI's documented example
#: ``--levels 20000,3000 --zipf 0.8,1.0`` plus a third, smaller factor).
LEVELS = (20_000, 3_000, 500)
ZIPF = (0.8, 1.0, 0.5)
_TINY_LEVELS = (50, 20, 5)


@contextlib.contextmanager
def safe_import():
    """Import optional names; on ImportError leave them undefined instead of failing."""
    try:
        yield
    except ImportError:
        pass


def pick(full, tiny):
    """Return ``tiny`` under ``LMMOPS_BENCH_TINY=1`` and ``full`` otherwise."""
    return tiny if TINY else full


def levels_for(n_obs, K):
    """Level counts of the first ``K`` synthetic factors for ``n_obs`` observations."""
    base = _TINY_LEVELS if n_obs <= 10 * TINY_N else LEVELS
    return list(base[:K])


_CODES = {}


def crossed_codes(n_obs, K=3, seed=20240601):
    """Codes (int32, shape (K, n_obs)) of K crossed factors, memoised per process.

    The first factors of the K = 3 design are the K = 2 design, so callers can slice
    ``crossed_codes(n, 3)[:2]``.
    """
    from lmmops.data.simulate import simulate_codes

    key = (int(n_obs), int(K), seed)
    if key not in _CODES:
        _CODES[key] = simulate_codes(
            int(n_obs), levels_for(n_obs, K), zipf=list(ZIPF[:K]), seed=seed
        )
    return _CODES[key]


def warm_up_jit():
    """Compile (or load from the Numba cache) the kernels of the exact fit on a tiny model."""
    from lmmops.estimation.direct import warm_up

    warm_up()


def evaluation_benchmarks(cls):
    """Class decorator: the benchmarks of one stochastic criterion evaluation, for a class
    whose ``setup`` leaves the objective in ``self.obj``, the point in ``self.theta`` and
    a first evaluation (compiled outside the timing) in ``self.ev``: ``time_evaluate``,
    ``track_cg_iterations`` and ``track_criterion_mc_stderr``."""

    def time_evaluate(self, n):
        self.obj.evaluate(self.theta)

    def track_cg_iterations(self, n):
        return int(self.ev.cg_iterations)

    def track_criterion_mc_stderr(self, n):
        return float(self.ev.objective_se)

    for f in (time_evaluate, track_cg_iterations, track_criterion_mc_stderr):
        f.__qualname__ = f"{cls.__name__}.{f.__name__}"
        setattr(cls, f.__name__, f)
    return cls
