"""The exact slope solver's optimiser economies against exact oracles: Hutchinson estimates
of the gradient's traces (early AI-Newton steps) within their Monte Carlo error of the
dense inverse, fits that use them reaching the exact optimum, every evaluation counted,
the final criterion-only step, and the Wald covariance reusing the fit's differences."""

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vector import _crossed

from lmmops.estimation import vector as V
from lmmops.estimation.vector import VectorObjective, fit_vector


def _dense_block_sums(obj, theta):
    """Per term, the sum over its levels of the diagonal blocks of ``A^{-1}``, dense."""
    Lam = obj._lambda(theta).toarray()
    A = Lam.T @ obj.C.toarray() @ Lam + np.eye(obj.q)
    Ai = np.linalg.inv(A)
    out = []
    for k, t in enumerate(obj.terms):
        lo = obj.offsets[k]
        S = np.zeros((t.dim, t.dim))
        for j in range(t.n_levels):
            r = lo + j * t.dim
            S += Ai[r:r + t.dim, r:r + t.dim]
        out.append(S)
    return out


THETA = np.array([0.8, 0.3, 0.6, 0.5, -0.2, 0.4])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), probes=st.sampled_from([32, 64]))
def test_estimated_traces_within_their_monte_carlo_error(seed, probes):
    """The estimate is the mean of per-probe estimates; it lies within 5 standard errors
    (their sd / sqrt(P)) of the dense inverse's block sums, entry by entry."""
    terms, X, y, _ = _crossed(seed % 7)
    obj = VectorObjective(terms, X, y)
    fac = obj._factor(THETA)
    exact = _dense_block_sums(obj, THETA)
    for k, S in enumerate(obj._selected_inverse(fac)):  # the exact path, as a check
        np.testing.assert_allclose(S.sum(axis=0), exact[k], rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(seed)
    Z = rng.integers(0, 2, size=(obj.q, probes)) * 2.0 - 1.0
    column = {}
    obj._probes = lambda rows, P: Z if P == probes else Z[:, [column["i"]]]
    est = obj._term_inverse_sums_estimate(fac, probes)
    per = []
    for i in range(probes):
        column["i"] = i
        per.append(obj._term_inverse_sums_estimate(fac, 1))
    for k in range(len(obj.terms)):
        samples = np.array([p[k] for p in per])
        np.testing.assert_allclose(samples.mean(axis=0), est[k], rtol=1e-12, atol=1e-12)
        se = samples.std(axis=0, ddof=1) / np.sqrt(probes)
        # term 1's first part is exact: entries with no variance must be equal
        assert np.all(np.abs(est[k] - exact[k]) <= 5.0 * se + 1e-10 * np.abs(exact[k]))


def test_estimated_gradient_is_marked_and_near_the_exact_one():
    terms, X, y, _ = _crossed(3)
    obj = VectorObjective(terms, X, y)
    exact = obj.evaluate(THETA)
    est = obj.evaluate(THETA, probes=64)
    assert exact.gradient_probes == 0
    assert est.gradient_probes == 64
    assert est.objective == exact.objective  # the criterion is exact either way
    assert not np.array_equal(est.gradient, exact.gradient)
    # the 64-probe traces move the gradient by a few per cent of its size at most here
    assert np.max(np.abs(est.gradient - exact.gradient)) < 0.2 * np.max(np.abs(
        exact.gradient))


def test_early_probes_rule_follows_the_cost_of_the_exact_traces():
    rule = VectorObjective.early_gradient_probes.fget

    def obj(m, nnz_k, pair_reads):
        return types.SimpleNamespace(m=m, _trace_costs=(nnz_k, pair_reads))

    P = V.EARLY_GRADIENT_PROBES
    # InstEval's slope model: m = 2256, nnz(K) = 105,204 (measured): the inverse
    assert rule(obj(2256, 105204, 1.8e6)) == P
    # 4e5 users x items, two slope terms: m = 1600, nnz(K) = 1.58e6, 40 columns a user:
    # the pair reads of the first term's blocks
    assert rule(obj(1600, 1_580_140, 20000 * 40**2 / 2)) == P
    assert rule(obj(300, 2000, 1000)) == 0  # small: the inverse is cheap
    assert VectorObjective.early_gradient_probes.fget(types.SimpleNamespace(m=0)) == 0
    # a K so dense that its products cost more than the inverse and the pair reads
    assert rule(obj(1600, 5_000_000, 1e5)) == 0


def test_early_probes_rule_reads_the_costs_off_the_pattern():
    terms, X, y, _ = _crossed(1, n=300)
    obj = VectorObjective(terms, X, y)
    assert obj.early_gradient_probes == 0
    nnz_k, pairs = obj._trace_costs
    C12 = obj.C.tocsr()[:obj.q1, obj.q1:]
    assert nnz_k == C12.nnz
    n_j = np.diff(C12.indptr)[::obj.d1]
    assert pairs == pytest.approx(float(np.sum(n_j.astype(float) ** 2)) / 2.0)


class _Forced(VectorObjective):
    """An objective that uses estimated traces early whatever its size."""

    early_gradient_probes = 32


def _counting(obj):
    """Record ``(gradient, probes)`` of every call that factorised (a gradient completed
    from the factor of the criterion-only call just before is not a new evaluation)."""
    seen = []
    orig = obj.evaluate

    def evaluate(theta, gradient=True, probes=0):
        n0 = obj.n_evaluations
        ev = orig(theta, gradient=gradient, probes=probes)
        if obj.n_evaluations > n0:
            seen.append((gradient, probes))
        return ev

    obj.evaluate = evaluate
    return seen


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_fits_with_early_estimates_reach_the_exact_optimum(seed):
    terms, X, y, _ = _crossed(seed, n=200)
    plain, forced = VectorObjective(terms, X, y), _Forced(terms, X, y)
    assert plain.early_gradient_probes == 0  # small: the inverse is the cheaper
    seen = _counting(forced)
    ev0, opt0 = fit_vector(plain)
    ev1, opt1 = fit_vector(forced)
    assert opt0.converged
    assert opt1.converged
    assert any(p for _, p in seen), "no estimated evaluation was made"
    # the Newton check and everything after it are exact
    assert ev1.gradient is None or ev1.gradient_probes == 0
    assert ev1.objective == pytest.approx(ev0.objective, rel=1e-10, abs=1e-8)
    np.testing.assert_allclose(ev1.theta, ev0.theta, atol=2e-4)
    assert opt1.n_evaluations == len(seen)  # every evaluation is counted


def test_every_evaluation_is_counted_and_the_covariance_reuses_the_fit():
    terms, X, y, _ = _crossed(4, n=200)
    obj = VectorObjective(terms, X, y)
    seen = _counting(obj)
    ev, opt = fit_vector(obj)
    assert opt.converged
    # the Newton check's differences are evaluations too
    assert opt.n_evaluations == len(seen) > len(opt.fitlog)
    n = len(seen)
    # ScaledTheta's ev is in the user's theta; the objective's differences are kept there
    cov = obj.theta_covariance(ev)
    assert len(seen) == n, "theta_covariance differenced again"
    fresh = VectorObjective(terms, X, y)
    want = fresh.theta_covariance(ev)  # new (central) differences
    np.testing.assert_allclose(cov, want, rtol=1e-3)


def test_final_step_is_a_criterion_only_evaluation():
    """When the verified point is followed by one more step, that step's evaluation has
    no gradient, the result reports the verified point's gradient, and the criterion did
    not increase."""
    terms, X, y, _ = _crossed(6, n=200)
    obj = VectorObjective(terms, X, y)
    seen = _counting(obj)
    ev, opt = fit_vector(obj)
    if "then one more step" not in opt.message:
        pytest.skip("this design's check needed no final step")
    assert seen[-1] == (False, 0)
    assert ev.gradient is None
    assert opt.converged
    assert np.isfinite(opt.gradient_norm)
    assert ev.objective <= min(f for _, f in opt.fitlog[:-1])


def test_a_gradient_after_a_criterion_only_call_reuses_its_factor():
    """The line search evaluates trials for the criterion only; the accepted one's
    gradient comes from the same factor: bit for bit a fresh evaluation's, and one
    evaluation counted, not two."""
    terms, X, y, _ = _crossed(2)
    obj, fresh = VectorObjective(terms, X, y), VectorObjective(terms, X, y)
    n0 = obj.n_evaluations
    crit = obj.evaluate(THETA, gradient=False)
    assert crit.gradient is None
    full = obj.evaluate(THETA)
    assert obj.n_evaluations == n0 + 1
    want = fresh.evaluate(THETA)
    np.testing.assert_array_equal(full.gradient, want.gradient)
    assert full.objective == want.objective == crit.objective
    # another theta, or a second gradient call, factorises again
    obj.evaluate(THETA)
    obj.evaluate(THETA * 0.9)
    assert obj.n_evaluations == n0 + 3
