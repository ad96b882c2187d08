"""Dense-oracle tests of lmmops.paper.lowrank.ExactInverse (docs/theory_inverse.rst)."""

import warnings

import numpy as np
import pytest
from conftest import design_from_table, random_table
from numpy.testing import assert_allclose

from lmmops.data.design import CrossedDesign
from lmmops.errors import DenseTooLargeError, DisconnectedDesignError
from lmmops.paper.lowrank import CorrectionRankWarning, ExactInverse, reml_criterion
from lmmops.paper.spectral import KhatriRaoCovariance, ModifiedCovariance

S_E2, S_A2, S_B2, S_C2 = 1.3, 0.5, 0.8, 0.4


def relerr(A, B):
    return np.linalg.norm(A - B) / np.linalg.norm(B)


DESIGNS = {
    "poisson": lambda: design_from_table(random_table(8, 6, rng=0, missing=0.0), rng=0),
    "missing50": lambda: design_from_table(random_table(9, 7, rng=1, missing=0.5), rng=1),
    "band": lambda: design_from_table(
        np.array([[2 if abs(i - j) <= 1 else 0 for j in range(8)] for i in range(8)]) + np.diag(
            np.arange(8) % 3), rng=2),
    "single_obs": lambda: design_from_table(
        np.array([[1, 0, 0, 0], [2, 1, 0, 3], [1, 4, 2, 0], [0, 0, 3, 1], [0, 1, 0, 0]]), rng=3),
}


@pytest.fixture(params=sorted(DESIGNS))
def design(request):
    return DESIGNS[request.param]()


@pytest.mark.parametrize("base", ["modified", "proportional"])
def test_exact_inverse_matches_dense(design, base):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    Vd = V.todense()
    Vinv = ExactInverse(V, base=base)
    inv = np.linalg.inv(Vd)
    assert relerr(Vinv.todense(), inv) < 1e-10
    assert_allclose(Vinv.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-11)
    b = np.random.default_rng(5).standard_normal((design.n_obs, 3))
    assert_allclose(Vinv.solve(b), np.linalg.solve(Vd, b), rtol=1e-9, atol=1e-11)
    assert_allclose(Vinv.solve(b[:, 0]), np.linalg.solve(Vd, b[:, 0]), rtol=1e-9, atol=1e-11)
    assert_allclose(V @ Vinv.solve(b), b, atol=1e-10)
    assert Vinv.H is Vinv
    assert Vinv.dtype == np.float64


def test_correction_rank_modified(design):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    r, c = design.counts(0), design.counts(1)
    t = np.sum(r != r.mean()) + np.sum(c != c.mean())
    assert ExactInverse(V, base="modified").correction_rank == t


def test_correction_rank_proportional(design):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    N = design.crosstab(0, 1).toarray()
    E = N - np.outer(N.sum(1), N.sum(0)) / N.sum()
    assert ExactInverse(V, base="proportional").correction_rank == 2 * np.linalg.matrix_rank(E)


def test_equireplicate_needs_no_correction():
    g = 6
    N = np.zeros((g, g), int)
    for i in range(g):
        N[i, i] = N[i, (i + 1) % g] = 3
    d = design_from_table(N, rng=6)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    Vinv = ExactInverse(V, base="modified")
    assert Vinv.correction_rank == 0
    assert relerr(Vinv.todense(), np.linalg.inv(V.todense())) < 1e-12


def test_proportional_design_needs_no_correction():
    d = design_from_table(np.outer([1, 2, 3], [2, 1, 1, 2]), rng=7)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    assert ExactInverse(V, base="proportional").correction_rank == 0


def test_sherman_morrison_recursion_equals_block_woodbury(design):
    """Section 6: t Sherman-Morrison steps on V check = block Woodbury = V^{-1}."""
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    Vd = V.todense()
    D1 = ModifiedCovariance(V)
    Vc_inv = D1.inverse().todense()
    r, c = design.counts(0).astype(float), design.counts(1).astype(float)
    rbar, cbar = r.mean(), c.mean()
    Za, Zb = design.indicator(0).toarray(), design.indicator(1).toarray()
    qs, deltas = [], []
    for i in np.flatnonzero(r != rbar):
        qs.append(Za[:, i] / np.sqrt(r[i]))
        deltas.append(S_A2 * (r[i] - rbar))
    for j in np.flatnonzero(c != cbar):
        qs.append(Zb[:, j] / np.sqrt(c[j]))
        deltas.append(S_B2 * (c[j] - cbar))
    # Sherman-Morrison recursion; every denominator is positive
    Vi = Vc_inv.copy()
    for q, dl in zip(qs, deltas):
        u = Vi @ q
        den = 1 + dl * q @ u
        assert den > 0
        Vi -= dl * np.outer(u, u) / den
    # block Woodbury
    Q = np.column_stack(qs)
    Dl = np.diag(deltas)
    core = np.linalg.inv(Dl) + Q.T @ Vc_inv @ Q
    Vw = Vc_inv - Vc_inv @ Q @ np.linalg.solve(core, Q.T @ Vc_inv)
    inv = np.linalg.inv(Vd)
    assert relerr(Vi, inv) < 1e-10
    assert relerr(Vw, inv) < 1e-10
    # V = V check + Q Delta Q'
    assert_allclose(D1.as_operator().todense() + Q @ Dl @ Q.T, Vd, atol=1e-11)
    # determinant lemma
    ld = D1.logdet(margin_correction=False) + np.linalg.slogdet(np.eye(len(qs)) + Dl @ Q.T
                                                                 @ Vc_inv @ Q)[1]
    assert_allclose(ld, np.linalg.slogdet(Vd)[1], rtol=1e-11)


def test_proportional_rank_2s_woodbury_identity(design):
    """Section 7a: K = K~ + F Om F' with F = blkdiag(L, R), Om = [[0, S], [S, 0]]."""
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    ex = ExactInverse(V, base="proportional")
    model = ex.model
    M = model.level_matrix().toarray()
    Mp = ex.approximation.level_space_operator().todense()
    s = ex.singular_values
    k = s.size
    g = design.n_levels[0]
    E = M - Mp
    assert_allclose(E[:g, :g], 0, atol=1e-12)
    assert_allclose(np.linalg.svd(E[:g, g:], compute_uv=False)[:k], s, rtol=1e-10)
    assert_allclose(ex.level_space_inverse().todense(), np.linalg.inv(M), rtol=1e-9,
                    atol=1e-12)


@pytest.mark.parametrize("base", ["modified", "proportional"])
def test_exact_inverse_interaction(base):
    N = random_table(6, 5, rng=8, missing=0.3)
    d = design_from_table(N, rng=8, interaction=True)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2, S_C2])
    Vd = V.todense()
    Vinv = ExactInverse(V, base=base)
    assert relerr(Vinv.todense(), np.linalg.inv(Vd)) < 1e-10
    assert_allclose(Vinv.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-11)


def test_exact_inverse_three_factors():
    rng = np.random.default_rng(9)
    codes = np.vstack([rng.integers(0, 4, 70), rng.integers(0, 5, 70), rng.integers(0, 3, 70)])
    d = CrossedDesign.from_codes(codes)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2, 0.3])
    Vd = V.todense()
    Vinv = ExactInverse(V, base="proportional")
    assert relerr(Vinv.todense(), np.linalg.inv(Vd)) < 1e-10
    assert_allclose(Vinv.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-11)
    with pytest.raises(Exception, match="two crossed factors"):
        ExactInverse(V, base="modified")


def test_exact_inverse_disconnected():
    N = np.zeros((4, 4), int)
    N[:2, :2] = 1
    N[2:, 2:] = 2
    V = KhatriRaoCovariance(design_from_table(N), S_E2, [S_A2, S_B2])
    for base in ("modified", "proportional"):
        with pytest.raises(DisconnectedDesignError):
            ExactInverse(V, base=base)


def test_exact_inverse_size_guard(monkeypatch, design):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    monkeypatch.setenv("LMMOPS_MAX_DENSE_GIB", "1e-9")
    with pytest.raises(DenseTooLargeError, match="ExactInverse|SVD"):
        ExactInverse(V)


def test_exact_inverse_rank_warning(design):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    with pytest.warns(CorrectionRankWarning, match="correction rank"):
        ExactInverse(V, warn_min_rank=1, warn_fraction=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExactInverse(V)  # small: no warning by default


def test_exact_inverse_bad_base(design):
    with pytest.raises(ValueError, match="base"):
        ExactInverse(KhatriRaoCovariance(design, 1.0, [1.0, 1.0]), base="nope")


def test_exact_inverse_matches_covariance_operator(design):
    operators = pytest.importorskip("lmmops.linalg.operators")
    V = operators.CovarianceOperator(design, S_E2, [S_A2, S_B2])
    b = np.random.default_rng(10).standard_normal(design.n_obs)
    assert_allclose(V @ ExactInverse(V).solve(b), b, atol=1e-10)


# ---------------------------------------------------------------------------- REML
def dense_reml(Vd, X, y):
    Vi = np.linalg.inv(Vd)
    XtViX = X.T @ Vi @ X
    P = Vi - Vi @ X @ np.linalg.solve(XtViX, X.T @ Vi)
    return -0.5 * (np.linalg.slogdet(Vd)[1] + np.linalg.slogdet(XtViX)[1] + y @ P @ y)


@pytest.mark.parametrize("base", ["modified", "proportional"])
def test_reml_exact_inverse_matches_exact_solver(design, base):
    """REML criterion with ExactInverse equals the exact value to 1e-8.

    The reference is a dense numpy REML computation. When ``lmmops.estimation.direct`` (the exact
    level-space solver) is final, extend this test to compare with its REML criterion too
    (mind its profiled scale and constant: compare at the same (s_e^2, s_A^2, s_B^2)).
    """
    rng = np.random.default_rng(11)
    n = design.n_obs
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    y = X @ [1.0, -0.5] + rng.standard_normal(n)
    for theta in [(S_E2, S_A2, S_B2), (0.4, 2.0, 0.1)]:
        V = KhatriRaoCovariance(design, theta[0], theta[1:])
        exact = dense_reml(V.todense(), X, y)
        got = reml_criterion(ExactInverse(V, base=base), X, y)
        assert abs(got - exact) < 1e-8 * max(1.0, abs(exact))


def test_reml_approximation_uses_given_logdet(design):
    V = KhatriRaoCovariance(design, S_E2, [S_A2, S_B2])
    D1 = ModifiedCovariance(V)
    X = np.ones((design.n_obs, 1))
    y = np.random.default_rng(12).standard_normal(design.n_obs)
    exact = dense_reml(V.todense(), X, y)
    approx = reml_criterion(D1.inverse(), X, y, logdet=D1.logdet())
    assert np.isfinite(approx)
    assert abs(approx - exact) < 0.1 * abs(exact)


@pytest.mark.parametrize("base", ["modified", "proportional"])
def test_reml_exact_inverse_matches_direct_solver(design, base):
    """ExactInverse's REML criterion equals lmmops.estimation.direct's at the profiled s_e^2 (to
    1e-8).

    lme4's profiled REML objective is ``-2 l_R + (n - p) log(2 pi)`` evaluated at
    ``s_e^2 = sigma2_hat`` and ``s_k^2 = theta_k^2 sigma2_hat``.
    """
    direct = pytest.importorskip("lmmops.estimation.direct")
    if not hasattr(direct, "DirectObjective"):
        pytest.skip("lmmops.estimation.direct has no DirectObjective")
    rng = np.random.default_rng(13)
    n = design.n_obs
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    y = X @ [0.5, 1.0] + rng.standard_normal(n)
    obj = direct.DirectObjective(design, X, y, method="REML")
    for theta in (np.array([0.7, 1.2]), np.array([2.0, 0.3])):
        ev = obj.evaluate(theta, gradient=False)
        V = KhatriRaoCovariance(design, ev.sigma2, theta**2 * ev.sigma2)
        ours = -2 * reml_criterion(ExactInverse(V, base=base), X, y) + (n - 2) * np.log(
            2 * np.pi)
        assert abs(ours - ev.objective) < 1e-8 * max(1.0, abs(ev.objective))


@pytest.mark.parametrize("base", ["modified", "proportional"])
def test_exact_inverse_of_covariance_operator_with_interaction_factor(base):
    """CovarianceOperator over (a, b, a:b): the a:b factor is recognised as the interaction."""
    operators = pytest.importorskip("lmmops.linalg.operators")
    d = design_from_table(random_table(5, 4, rng=14, missing=0.3), rng=14, interaction=True)
    V = operators.CovarianceOperator(d, S_E2, [S_A2, S_B2, S_C2])
    Vinv = ExactInverse(V, base=base)
    b = np.random.default_rng(15).standard_normal((d.n_obs, 2))
    assert_allclose(V @ Vinv.solve(b), b, atol=1e-10)
    assert_allclose(Vinv.logdet(), np.linalg.slogdet(V.todense())[1], rtol=1e-11)
