"""Thread control (:mod:`lmmops.threads`): BLAS and Numba thread counts set and restored,
the ``threads=`` / ``--threads`` validation, the ``"auto"`` policy, and fits that give the
same numbers whatever the thread counts. No test here is timed; the speed under load is
measured by ``asv_benchmarks/peers/load.py``.
"""

import json
import threading

import numba
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_info, threadpool_limits

import lmmops
import lmmops.linalg.operators as ops
import lmmops.threads as thr
from lmmops.cli import main
from lmmops.data.simulate import simulate_crossed
from lmmops.errors import LmmopsError
from lmmops.estimation.direct import DirectObjective

NMAX = int(numba.config.NUMBA_NUM_THREADS)
needs_two = pytest.mark.skipif(NMAX < 2, reason="needs NUMBA_NUM_THREADS >= 2")
FORMULA = "y ~ 1 + (1|g1) + (1|g2)"


def blas_counts():
    """Thread counts of every loaded BLAS library, from threadpoolctl's own scan."""
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """BLAS at two threads around the test (the default on a two-core machine)."""
    with threadpool_limits(2, user_api="blas"):
        assert set(blas_counts()) == {2}
        yield
    assert not thr._BLAS_REQUESTS


@pytest.fixture
def cholesky_threads(monkeypatch):
    """Record the BLAS thread counts at every Cholesky factorisation of the direct solver."""
    seen = []
    dpotrf = scipy.linalg.lapack.dpotrf

    def spy(*args, **kwargs):
        seen.append(tuple(blas_counts()))
        return dpotrf(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg.lapack, "dpotrf", spy)
    return seen


@pytest.fixture(scope="module")
def frame():
    return simulate_crossed(4000, [300, 120], zipf=[0.8, 0.5], sigma2=[0.5, 0.8], seed=12)


# ------------------------------------------------------------------ the context manager
@needs_two
def test_limit_sets_and_restores_blas_and_numba(two_blas_threads):
    numba.set_num_threads(2)
    with thr.limit_threads(1) as plan:
        assert (plan.blas, plan.numba) == (1, 1)
        assert set(blas_counts()) == {1}
        assert numba.get_num_threads() == 1
        with thr.limit_threads(2):  # nested: the innermost wins in its thread
            assert set(blas_counts()) == {2}
            assert numba.get_num_threads() == 2
        assert set(blas_counts()) == {1}
        assert numba.get_num_threads() == 1
        with thr.limit_threads("auto", dense_size=10, inner=True) as deferred:
            assert deferred is None  # an inner block defers to the enclosing one
            assert set(blas_counts()) == {1}
    assert set(blas_counts()) == {2}
    assert numba.get_num_threads() == 2
    assert thr.blas_threads() == blas_counts()


@needs_two
def test_limit_restores_when_the_block_raises(two_blas_threads):
    numba.set_num_threads(2)
    seen = []

    def fail():
        with thr.limit_threads(1):
            seen.append((tuple(blas_counts()), numba.get_num_threads()))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail()
    assert seen == [((1,) * len(blas_counts()), 1)]
    assert set(blas_counts()) == {2}
    assert numba.get_num_threads() == 2


@needs_two
def test_concurrent_blocks_share_the_smallest_blas_count(two_blas_threads):
    inside = threading.Barrier(2)
    leave = threading.Barrier(2)
    seen = {}

    def worker(n):
        with thr.limit_threads(n):
            inside.wait(timeout=30)
            seen[n] = (tuple(blas_counts()), numba.get_num_threads())
            leave.wait(timeout=30)

    workers = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    # both see BLAS at 1 (process-wide, the smaller request); Numba is per thread
    assert seen == {1: ((1,) * len(blas_counts()), 1), 2: ((1,) * len(blas_counts()), 2)}
    assert set(blas_counts()) == {2}  # the original restored after the last block


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("bad", [0, -1, "x", "", "0", "-2", 1.5, True, None, [2], "2.0"])
def test_invalid_threads_raise(bad, frame):
    with pytest.raises(LmmopsError, match="threads must be 'auto' or a positive integer"):
        thr.check_threads(bad)
    if bad is None:  # fit(threads=None) means "not given": options.threads ("auto")
        assert lmmops.fit(FORMULA, frame, threads=bad).options.threads == "auto"
        return
    with pytest.raises(LmmopsError, match="threads must be"):
        lmmops.fit(FORMULA, frame, threads=bad)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.one_of(st.integers(-10**6, 10**6), st.text(max_size=6),
                 st.floats(allow_nan=True, allow_infinity=True)))
def test_check_threads_accepts_exactly_auto_and_positive_integers(value):
    if isinstance(value, str):
        text = value.strip()
        ok = text.lower() == "auto" or (text.isdecimal() and int(text) >= 1)
        expected = "auto" if text.lower() == "auto" else (int(text) if ok else None)
    else:
        ok = value == value and abs(value) != float("inf") and value == int(value) \
            and value >= 1
        expected = int(value) if ok else None
    if ok:
        assert thr.check_threads(value) == expected
    else:
        with pytest.raises(LmmopsError):
            thr.check_threads(value)


@pytest.mark.parametrize("bad", ["0", "-1", "x"])
def test_cli_invalid_threads_exit_2(bad, tmp_path, capsys):
    path = tmp_path / "nonexistent.csv"  # validated before the data are read
    assert main(["fit", str(path), "--formula", FORMULA, f"--threads={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmmops: error: threads must be 'auto' or a positive integer")
    assert "Traceback" not in err


def test_cli_threads_option_fits_and_reports(frame, tmp_path, capsys):
    path = tmp_path / "sim.csv"
    frame.to_csv(path, index=False)
    assert main(["fit", str(path), "--formula", FORMULA, "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    assert any(n.startswith("threads=1: BLAS 1, Numba 1") for n in out["notes"])
    ref = lmmops.fit(FORMULA, frame)
    assert out["variances"]["g1"] == pytest.approx(ref.variances["g1"], rel=1e-12)


# ------------------------------------------------------------------ the auto policy
def test_auto_fit_runs_single_threaded_blas_for_a_small_schur_block(
        frame, two_blas_threads, cholesky_threads):
    res = lmmops.fit(FORMULA, frame)
    assert res.solver == "direct"
    assert cholesky_threads
    assert set(cholesky_threads) == {(1,) * len(blas_counts())}  # 2 before the fix
    assert set(blas_counts()) == {2}  # restored
    assert any(n.startswith("threads='auto': BLAS 1") for n in res.notes)


def test_objective_evaluation_outside_a_fit_is_single_threaded(
        frame, two_blas_threads, cholesky_threads):
    model = lmmops.LMM.from_formula(FORMULA, frame)
    obj = model.objective().conditioned  # the solver's objective (on conditioned data)
    assert isinstance(obj, DirectObjective)
    assert obj.m < thr.AUTO_BLAS_MIN_DENSE
    ev = obj.evaluate(np.array([0.7, 0.9]))
    assert set(cholesky_threads) == {(1,) * len(blas_counts())}
    assert set(blas_counts()) == {2}
    obj.threads = 2  # an explicit choice on the objective is honoured
    ev2 = obj.evaluate(np.array([0.7, 0.9]))
    assert cholesky_threads[-1] == (2,) * len(blas_counts())
    assert ev2.objective == pytest.approx(ev.objective, rel=1e-12, abs=0)


@needs_two
@pytest.mark.parametrize(("runnable", "idle"), [([0, 0, 0], 1), ([3, 0, 2], 1),
                                                  ([1, 1, 4], 0), ([6, 5, 7], 0)])
def test_auto_plan_uses_threads_only_on_idle_cores(runnable, idle, monkeypatch):
    monkeypatch.setattr(thr, "available_cores", lambda: 2)
    reads = iter(runnable)
    monkeypatch.setattr(thr, "_runnable_others", lambda: next(reads))
    assert thr.idle_cores(interval=0) == idle  # minimum over the samples
    reads = iter(runnable)
    big = thr.plan_threads("auto", dense_size=thr.AUTO_BLAS_MIN_DENSE, parallel=True)
    assert (big.blas, big.numba) == (1 + idle, 1 + idle)
    small = thr.plan_threads("auto", dense_size=thr.AUTO_BLAS_MIN_DENSE - 1)
    assert (small.blas, small.numba) == (1, None)  # no probe, Numba left alone


def test_idle_cores_fallbacks(monkeypatch):
    monkeypatch.setattr(thr, "available_cores", lambda: 4)
    monkeypatch.setattr(thr, "_runnable_others", lambda: None)
    monkeypatch.setattr(thr.os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    assert thr.idle_cores() == 1  # 3 other cores, 1.5 busy on average
    monkeypatch.delattr(thr.os, "getloadavg")
    assert thr.idle_cores() == 3  # nothing known: every other core counts as idle


def test_explicit_threads_cap_numba_and_say_so():
    plan = thr.plan_threads(NMAX + 3)
    assert (plan.blas, plan.numba) == (NMAX + 3, NMAX)
    assert f"NUMBA_NUM_THREADS={NMAX}" in plan.note


# ------------------------------------------------------------------ same numbers
def _numbers(res):
    return np.concatenate([res.theta, [res.objective, res.sigma],
                           res.fixef.to_numpy(), res.ranef["g1"].to_numpy().ravel()])


@needs_two
def test_direct_fit_same_numbers_with_one_and_two_threads(frame):
    one = lmmops.fit(FORMULA, frame, threads=1)
    two = lmmops.fit(FORMULA, frame, threads=2)
    auto = lmmops.fit(FORMULA, frame)
    assert one.converged
    assert two.converged
    np.testing.assert_allclose(_numbers(two), _numbers(one), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_numbers(auto), _numbers(one), rtol=1e-12, atol=1e-14)


@needs_two
def test_iterative_fit_same_numbers_serial_and_parallel_kernels(monkeypatch):
    monkeypatch.setattr(ops, "PARALLEL_MIN_ROWS", 0)  # parallel kernels at this size
    df = simulate_crossed(1500, [80, 30], zipf=[0.8, 0.5], sigma2=[0.5, 0.8], seed=5)
    kw = {"solver": "iterative", "n_probes": 8, "seed": 3}
    one = lmmops.fit(FORMULA, df, threads=1, **kw)
    two = lmmops.fit(FORMULA, df, threads=2, **kw)
    assert one._objective._ZtZ.parallel is True  # the same kernels, one thread or two
    assert two._objective._ZtZ.parallel is True
    # the row blocks (and so the summation order) do not depend on the running thread
    # count, so a fit's numbers do not depend on the load that threads="auto" sees
    np.testing.assert_array_equal(_numbers(two), _numbers(one))
