"""Run every asv benchmark once at a tiny size, so the benchmarks cannot rot.

The benchmark modules are imported with ``LMMOPS_BENCH_TINY=1`` (n = 10^3, a simulated
stand-in for InstEval). For each class and parameter combination this calls
``setup_cache`` (once per class), ``setup``, then every ``time_``, ``peakmem_`` and
``track_`` method once, and ``teardown``; ``track_`` results must be finite numbers.
"""

import importlib
import itertools
import math
import os
import pkgutil
import sys
from pathlib import Path

import pytest

ASV_DIR = Path(__file__).resolve().parents[1] / "asv_benchmarks"
PREFIXES = ("time_", "peakmem_", "track_", "mem_")


def _import_tiny():
    old = os.environ.get("LMMOPS_BENCH_TINY")
    os.environ["LMMOPS_BENCH_TINY"] = "1"
    sys.path.insert(0, str(ASV_DIR))
    try:
        pkg = importlib.import_module("benchmarks")
        names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
        modules = []
        for name in ["common"] + [n for n in names if n != "common"]:
            full = f"benchmarks.{name}"
            mod = sys.modules.get(full)
            mod = importlib.reload(mod) if mod is not None else importlib.import_module(full)
            modules.append(mod)
        return modules
    finally:
        sys.path.remove(str(ASV_DIR))
        if old is None:
            del os.environ["LMMOPS_BENCH_TINY"]
        else:
            os.environ["LMMOPS_BENCH_TINY"] = old


MODULES = _import_tiny()


def _param_lists(obj):
    params = getattr(obj, "params", [])
    if not params:
        return []
    if not all(isinstance(p, (list, tuple)) for p in params):
        return [list(params)]  # asv: a flat list is one parameter
    return [list(p) for p in params]


def _cases():
    cases = []
    for mod in MODULES:
        for name, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if isinstance(obj, type):
                if any(m.startswith(PREFIXES) for m in dir(obj)):
                    cases.append(pytest.param(obj, id=f"{mod.__name__}.{name}"))
            elif callable(obj) and name.startswith(PREFIXES):
                cases.append(pytest.param(obj, id=f"{mod.__name__}.{name}"))
    return cases


CASES = _cases()


def test_every_module_has_benchmarks():
    bench_modules = [m for m in MODULES if m.__name__ != "benchmarks.common"]
    assert bench_modules
    ids = " ".join(str(c.id) for c in CASES)
    for mod in bench_modules:
        assert mod.__name__ in ids, f"{mod.__name__} defines no benchmark"


def _check(kind, value):
    if kind == "track_":
        assert isinstance(value, (int, float)) or hasattr(value, "__float__")
        assert math.isfinite(float(value)), value


@pytest.mark.parametrize("bench", CASES)
def test_benchmark_runs_once(bench):
    if not isinstance(bench, type):  # a module-level benchmark function
        for combo in itertools.product(*_param_lists(bench)):
            _check(bench.__name__[: bench.__name__.index("_") + 1], bench(*combo))
        return
    methods = sorted(m for m in dir(bench) if m.startswith(PREFIXES))
    ran = 0
    cache_args = ()
    if hasattr(bench, "setup_cache"):
        cache_args = (bench().setup_cache(),)
    for combo in itertools.product(*_param_lists(bench)):
        obj = bench()
        args = cache_args + tuple(combo)
        if hasattr(obj, "setup"):
            try:
                obj.setup(*args)
            except NotImplementedError:
                continue
        try:
            for m in methods:
                value = getattr(obj, m)(*args)
                _check(m[: m.index("_") + 1], value)
                ran += 1
        finally:
            if hasattr(obj, "teardown"):
                obj.teardown(*args)
    assert ran, f"{bench.__name__}: every parameter combination was skipped"
