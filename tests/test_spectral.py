"""Dense-oracle tests of lmmops.paper.spectral: every identity of docs/theory_inverse.rst,
11."""

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import design_from_table, random_table
from numpy.testing import assert_allclose

from lmmops.data.design import CrossedDesign
from lmmops.errors import DesignError, DisconnectedDesignError
from lmmops.paper.spectral import (
    KhatriRaoCovariance,
    ModifiedCovariance,
    ProportionalApproximation,
    asymptotic_inverse,
    balanced_spectrum,
    khatri_rao,
)

S_E2, S_A2, S_B2, S_C2 = 1.3, 0.5, 0.8, 0.4


# ---------------------------------------------------------------------------- designs
def dense_v(design, s_e2, sigma2, s_c2=0.0):
    V = s_e2 * np.eye(design.n_obs)
    for k, s in enumerate(sigma2):
        Z = design.indicator(k).toarray()
        V += s * Z @ Z.T
    if s_c2:
        a, b = design.codes[0].astype(np.int64), design.codes[1].astype(np.int64)
        cell = a * design.n_levels[1] + b
        V += s_c2 * (cell[:, None] == cell[None, :])
    return V


def rel(A, B):
    return np.linalg.norm(A - B) / np.linalg.norm(B)


@pytest.fixture(params=[0, 1, 2])
def unbalanced(request):
    N = random_table(7, 5, rng=request.param)
    return design_from_table(N, rng=request.param)


# ---------------------------------------------------------------------------- Section 3
def test_khatri_rao_definition():
    rng = np.random.default_rng(0)
    A = sp.random(6, 3, density=0.5, random_state=1, format="csr")
    B = sp.random(6, 4, density=0.6, random_state=2, format="csr")
    C = khatri_rao(A, B).toarray()
    expect = np.vstack([np.kron(A[k].toarray(), B[k].toarray()) for k in range(6)])
    assert_allclose(C, expect)
    dense_a = rng.standard_normal((6, 2))
    assert_allclose(khatri_rao(dense_a, B).toarray(), np.vstack(
        [np.kron(dense_a[k], B[k].toarray().ravel()) for k in range(6)]
    ))
    with pytest.raises(ValueError, match="same number of rows"):
        khatri_rao(A, B[:5])


def test_cell_indicator_identities(unbalanced):
    d = unbalanced
    g, h = d.n_levels
    Za, Zb = d.indicator(0), d.indicator(1)
    Zc = khatri_rao(Za, Zb)
    assert_allclose((Zc @ sp.kron(sp.eye(g), np.ones((h, 1)))).toarray(), Za.toarray())
    assert_allclose((Zc @ sp.kron(np.ones((g, 1)), sp.eye(h))).toarray(), Zb.toarray())
    N = d.crosstab(0, 1).toarray()
    assert_allclose((Zc.T @ Zc).toarray(), np.diag(N.ravel()))


@pytest.mark.parametrize("s_c2", [0.0, S_C2])
def test_khatri_rao_covariance_equals_v(unbalanced, s_c2):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2], sigma2_interaction=s_c2 or None)
    Vd = dense_v(d, S_E2, [S_A2, S_B2], s_c2)
    assert_allclose(V.todense(), Vd, rtol=1e-13, atol=1e-13)
    # the literal Khatri-Rao form s_e^2 I + Z_C S Z_C'
    Zc = V.cell_indicator()
    assert_allclose(S_E2 * np.eye(d.n_obs) + Zc @ V.cell_covariance() @ Zc.T.toarray(), Vd,
                    atol=1e-12)
    x = np.random.default_rng(3).standard_normal((d.n_obs, 3))
    assert_allclose(V @ x, Vd @ x, atol=1e-12)
    assert_allclose(V.matvec(x[:, 0]), Vd @ x[:, 0], atol=1e-12)
    assert V.H is V
    assert V.dtype == np.float64


def test_khatri_rao_covariance_matches_covariance_operator(unbalanced):
    operators = pytest.importorskip("lmmops.linalg.operators")
    d = unbalanced
    V = operators.CovarianceOperator(d, S_E2, [S_A2, S_B2])
    x = np.random.default_rng(4).standard_normal((d.n_obs, 2))
    assert_allclose(KhatriRaoCovariance(d, S_E2, [S_A2, S_B2]) @ x, V @ x, atol=1e-12)


def test_partitioned_khatri_rao_and_cell_normalised_form(unbalanced):
    d = unbalanced
    g, h = d.n_levels
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    S = V.cell_covariance()
    cell = d.codes[0].astype(int) * h + d.codes[1]
    # (b) V = s_e^2 I + S * J_[N], blocks S_{c c'} J in cell order
    order = np.argsort(cell, kind="stable")
    blocks = S[np.ix_(cell[order], cell[order])]
    Vd = V.todense()
    assert_allclose(S_E2 * np.eye(d.n_obs) + blocks, Vd[np.ix_(order, order)], atol=1e-12)
    # (c) cell-normalised form over the non-empty cells
    Zc = V.cell_indicator().toarray()
    obs = Zc.sum(axis=0) > 0
    counts = Zc[:, obs].sum(axis=0)
    U = Zc[:, obs] / np.sqrt(counts)
    Dh = np.diag(np.sqrt(counts))
    inner = np.linalg.inv(S_E2 * np.eye(obs.sum()) + Dh @ S[np.ix_(obs, obs)] @ Dh)
    Vinv = (np.eye(d.n_obs) - U @ U.T) / S_E2 + U @ inner @ U.T
    assert_allclose(Vinv @ Vd, np.eye(d.n_obs), atol=1e-10)


# ---------------------------------------------------------------------------- Section 4
@pytest.mark.parametrize(("g", "h", "m"), [(4, 3, 2), (3, 5, 1), (2, 2, 3)])
@pytest.mark.parametrize("s_c2", [0.0, S_C2])
def test_balanced_spectrum(g, h, m, s_c2):
    d = design_from_table(np.full((g, h), m), rng=5)
    spec = balanced_spectrum(d, S_E2, [S_A2, S_B2], sigma2_interaction=s_c2 or None)
    Vd = dense_v(d, S_E2, [S_A2, S_B2], s_c2)
    assert spec.multiplicities.sum() == d.n_obs
    assert_allclose(spec.eigenvalues(), np.linalg.eigvalsh(Vd), rtol=1e-12)
    assert_allclose(spec.inverse().todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-13)
    assert_allclose(spec.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)
    assert spec.labels[-1] == ("E" if s_c2 and m > 1 else "AB" if s_c2 else "AB+E")


def test_balanced_spectrum_interaction_factor():
    d = design_from_table(np.full((3, 4), 2), rng=6, interaction=True)
    spec = balanced_spectrum(d, S_E2, [S_A2, S_B2, S_C2])
    Vd = dense_v(d, S_E2, [S_A2, S_B2, S_C2])  # the a:b indicator is the third factor
    assert_allclose(spec.eigenvalues(), np.linalg.eigvalsh(Vd), rtol=1e-12)
    assert spec.labels == ("1", "A", "B", "AB", "E")


def test_balanced_spectrum_rejects_unbalanced(unbalanced):
    with pytest.raises(DesignError, match="not balanced"):
        balanced_spectrum(unbalanced, S_E2, [S_A2, S_B2])


# ---------------------------------------------------------------------------- Section 6
def modified_dense(d, s_e2, s2, reference="mean"):
    Za, Zb = d.indicator(0).toarray(), d.indicator(1).toarray()
    r, c = Za.sum(0), Zb.sum(0)
    if reference == "mean":
        rbar, cbar = r.mean(), c.mean()
    else:
        rbar, cbar = len(r) / np.sum(1 / r), len(c) / np.sum(1 / c)
    PA = Za @ np.diag(1 / r) @ Za.T
    PB = Zb @ np.diag(1 / c) @ Zb.T
    return s_e2 * np.eye(d.n_obs) + s2[0] * rbar * PA + s2[1] * cbar * PB


@pytest.mark.parametrize("reference", ["mean", "harmonic"])
def test_modified_covariance_exact(unbalanced, reference):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    D1 = ModifiedCovariance(V, reference=reference)
    Vc = modified_dense(d, S_E2, [S_A2, S_B2], reference)
    assert_allclose(D1.as_operator().todense(), Vc, atol=1e-12)
    assert_allclose(D1.eigenvalues(), np.linalg.eigvalsh(Vc), rtol=1e-11)
    vals, counts = D1.eigenvalues(return_counts=True)
    assert counts.sum() == d.n_obs
    assert_allclose(D1.inverse().todense(), np.linalg.inv(Vc), rtol=1e-10, atol=1e-12)
    assert_allclose(D1.logdet(margin_correction=False), np.linalg.slogdet(Vc)[1], rtol=1e-12)


def test_modified_canonical_basis_properties(unbalanced):
    d = unbalanced
    D1 = ModifiedCovariance(KhatriRaoCovariance(d, S_E2, [S_A2, S_B2]))
    Za, Zb = d.indicator(0).toarray(), d.indicator(1).toarray()
    r, c = Za.sum(0), Zb.sum(0)
    X = Za / np.sqrt(r) @ D1.svd.Phi
    Y = Zb / np.sqrt(c) @ D1.svd.Psi
    assert_allclose(X.T @ Y, np.diag(D1.rho), atol=1e-12)  # x_k'y_l = rho_k delta_kl
    assert_allclose(D1.rho[0], 1.0, atol=1e-12)
    assert D1.rho[1] < 1 - 1e-6
    x1 = np.ones(d.n_obs) / np.sqrt(d.n_obs)
    assert_allclose(np.abs(X[:, 0]), x1, atol=1e-12)
    assert_allclose(np.abs(Y[:, 0]), x1, atol=1e-12)


def test_modified_closed_form_inverse_formula(unbalanced):
    """The sum over canonical pairs of docs/theory_inverse.rst (D1), written out densely."""
    d = unbalanced
    g, h = d.n_levels
    D1 = ModifiedCovariance(KhatriRaoCovariance(d, S_E2, [S_A2, S_B2]))
    Za, Zb = d.indicator(0).toarray(), d.indicator(1).toarray()
    r, c = Za.sum(0), Zb.sum(0)
    KN = np.diag(r**-0.5) @ d.crosstab(0, 1).toarray() @ np.diag(c**-0.5)
    Phi, rho, PsiT = np.linalg.svd(KN)
    m = min(g, h)
    X, Y = Za / np.sqrt(r) @ Phi, Zb / np.sqrt(c) @ PsiT.T
    a, b = S_A2 * r.mean(), S_B2 * c.mean()
    al, be = 1 + S_E2 / a, 1 + S_E2 / b
    T = np.eye(d.n_obs)
    for k in range(m):
        x, y = X[:, k], Y[:, k]
        T -= (be * np.outer(x, x) - rho[k] * (np.outer(x, y) + np.outer(y, x))
              + al * np.outer(y, y)) / (al * be - rho[k] ** 2)
    for k in range(m, g):
        T -= np.outer(X[:, k], X[:, k]) / al
    for k in range(m, h):
        T -= np.outer(Y[:, k], Y[:, k]) / be
    assert_allclose(D1.inverse().todense(), T / S_E2, atol=1e-12)
    ld = (d.n_obs * np.log(S_E2) + g * np.log(a / S_E2) + h * np.log(b / S_E2)
          + (g - m) * np.log(al) + (h - m) * np.log(be) + np.sum(np.log(al * be - rho[:m] ** 2)))
    assert_allclose(D1.logdet(margin_correction=False), ld, rtol=1e-12)


def test_modified_margin_correction_improves_logdet():
    N = random_table(12, 10, rng=7, missing=0.2)
    d = design_from_table(N, rng=7)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    exact = np.linalg.slogdet(V.todense())[1]
    D1 = ModifiedCovariance(V)
    raw = abs(D1.logdet(margin_correction=False) - exact)
    corr = abs(D1.logdet() - exact)
    assert corr < raw
    assert corr < 0.05


def test_modified_equireplicate_is_exact():
    """Cyclic design with missing cells and equal totals: V check = V (t = 0)."""
    g = 7
    N = np.zeros((g, g), int)
    for i in range(g):
        for s in range(3):
            N[i, (i + s) % g] = 2
    d = design_from_table(N, rng=8)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    D1 = ModifiedCovariance(V)
    Vd = V.todense()
    assert_allclose(D1.as_operator().todense(), Vd, atol=1e-12)
    assert_allclose(D1.inverse().todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-13)
    assert_allclose(D1.eigenvalues(), np.linalg.eigvalsh(Vd), rtol=1e-11)
    assert_allclose(D1.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)
    assert D1.margin_correction() == pytest.approx(0.0, abs=1e-12)


def test_modified_with_variances_reuses_svd(unbalanced):
    d = unbalanced
    D1 = ModifiedCovariance(KhatriRaoCovariance(d, S_E2, [S_A2, S_B2]))
    D1b = D1.with_variances(0.7, [1.1, 0.2])
    assert D1b.svd is D1.svd
    Vc = modified_dense(d, 0.7, [1.1, 0.2])
    assert_allclose(D1b.inverse().todense(), np.linalg.inv(Vc), rtol=1e-10, atol=1e-12)
    # a fresh object on the same design also hits the per-design cache
    assert ModifiedCovariance(KhatriRaoCovariance(d, 2.0, [1.0, 1.0])).svd is D1.svd


@pytest.mark.parametrize("svd", ["lanczos", "randomized"])
def test_modified_truncated(svd):
    N = random_table(30, 25, rng=9, missing=0.3)
    d = design_from_table(N)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    full = ModifiedCovariance(V, svd="full")
    tr = ModifiedCovariance(V, rank=8, svd=svd, rng=1)
    assert tr.rank == 8
    assert tr.svd.truncated
    assert_allclose(tr.rho, full.rho[:8], rtol=1e-6)
    # meaning: Kc with K_N replaced by its rank-8 truncation
    g = d.n_levels[0]
    wr, wc = full.model.w_k(0), full.model.w_k(1)
    KN8 = (full.svd.Phi[:, :8] * full.rho[:8]) @ full.svd.Psi[:, :8].T
    Dh = np.diag(np.sqrt(np.concatenate([wr, wc])))
    core = np.block([[tr.alpha * np.eye(g), KN8], [KN8.T, tr.beta * np.eye(25)]])
    Kc8 = Dh @ core @ Dh
    assert_allclose(tr.level_space_inverse().todense(), np.linalg.inv(Kc8), rtol=1e-6,
                    atol=1e-9)
    # the truncated log-det (with the tail term) is close to the full one
    ab = full.alpha * full.beta
    tail = np.sum(np.log1p(-full.rho[8:] ** 2 / ab))  # what dropping the tail would cost
    err = abs(tr.logdet(False) - full.logdet(False))
    assert err < 0.2 * abs(tail)
    with pytest.raises(ValueError, match="full SVD"):
        tr.eigenvalues()
    assert ModifiedCovariance(V, rank=full.rank, svd="full").rank == full.rank


def test_modified_single_observation_levels():
    N = random_table(6, 5, rng=10, missing=0.4)
    N[0] = 0
    N[0, 2] = 1  # row 0 has a single observation
    N[:, 4] = 0
    N[3, 4] = 1  # column 4 too
    d = design_from_table(N, rng=10)
    assert d.counts(0)[0] == 1
    assert d.counts(1)[4] == 1
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    D1 = ModifiedCovariance(V)
    Vc = modified_dense(d, S_E2, [S_A2, S_B2])
    assert_allclose(D1.inverse().todense(), np.linalg.inv(Vc), rtol=1e-10, atol=1e-12)
    assert_allclose(D1.eigenvalues(), np.linalg.eigvalsh(Vc), rtol=1e-11)


def test_modified_interaction():
    """Section 8: effective counts Omega; D1 is V check of the whitened problem."""
    N = random_table(6, 5, rng=11, missing=0.3)
    d = design_from_table(N, rng=11, interaction=True)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2, S_C2])
    Vd = dense_v(d, S_E2, [S_A2, S_B2, S_C2])
    assert_allclose(V.todense(), Vd, atol=1e-12)
    D1 = ModifiedCovariance(V)
    Vc = D1.as_operator().todense()
    # R* whitening: eigenvalues of R^{-1/2} Vc R^{-1/2}
    R = S_E2 * np.eye(d.n_obs) + S_C2 * d.indicator(2).toarray() @ d.indicator(2).toarray().T
    ev, Q = np.linalg.eigh(R)
    Rih = Q @ np.diag(ev**-0.5) @ Q.T
    assert_allclose(D1.eigenvalues(), np.linalg.eigvalsh(Rih @ Vc @ Rih), rtol=1e-10)
    assert_allclose(D1.inverse().todense(), np.linalg.inv(Vc), rtol=1e-10, atol=1e-12)
    assert_allclose(D1.logdet(False), np.linalg.slogdet(Vc)[1], rtol=1e-12)
    # R*^{-1} and log|R*| closed forms
    m = D1.model
    assert_allclose(m.rinv(np.eye(d.n_obs)), np.linalg.inv(R), atol=1e-12)
    assert_allclose(m.logdet_r(), np.linalg.slogdet(R)[1], rtol=1e-12)
    # the same model through sigma2_interaction on the two-factor design
    d2 = design_from_table(N, rng=11)
    V2 = KhatriRaoCovariance(d2, S_E2, [S_A2, S_B2], sigma2_interaction=S_C2)
    assert_allclose(V2.todense(), dense_v(d2, S_E2, [S_A2, S_B2], S_C2), atol=1e-12)


def test_modified_disconnected_raises():
    N = np.zeros((6, 6), int)
    N[:3, :3] = 2
    N[3:, 3:] = 1
    d = design_from_table(N)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    with pytest.raises(DisconnectedDesignError, match="disconnected"):
        ModifiedCovariance(V)
    with pytest.raises(DisconnectedDesignError):
        ProportionalApproximation(V)
    with pytest.raises(DisconnectedDesignError):
        asymptotic_inverse(V)


def test_modified_needs_two_factors():
    d = CrossedDesign.from_codes(prop3_codes())
    with pytest.raises(DesignError, match="two crossed factors"):
        ModifiedCovariance(KhatriRaoCovariance(d, 1.0, [1.0, 1.0, 1.0]))


# ---------------------------------------------------------------------------- Section 7
def prop_dense_inverse(d, s_e2, s2):
    """Section 7(a) observation-space formula, written out."""
    Za, Zb = d.indicator(0).toarray(), d.indicator(1).toarray()
    r, c = Za.sum(0), Zb.sum(0)
    n = d.n_obs
    la, lb = s_e2 / s2[0], s_e2 / s2[1]
    WA, WB = np.diag(1 / (r + la)), np.diag(1 / (c + lb))
    av, bv = Za @ WA @ r, Zb @ WB @ c
    Al, Be = r @ (r / (r + la)), c @ (c / (c + lb))
    Dt = n**2 - Al * Be
    inner = (n * (np.outer(av, bv) + np.outer(bv, av)) - Be * np.outer(av, av)
             - Al * np.outer(bv, bv)) / Dt
    return (np.eye(n) - Za @ WA @ Za.T - Zb @ WB @ Zb.T + inner) / s_e2


def test_proportional_formula_and_logdet(unbalanced):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    D2 = ProportionalApproximation(V)
    assert_allclose(D2.inverse().todense(), prop_dense_inverse(d, S_E2, [S_A2, S_B2]),
                    atol=1e-12)
    # level space: M_prop = P + B (J - I) B'/n, whitened by s_e^2
    Mp = D2.level_space_operator().todense()
    assert_allclose(D2.level_space_inverse().todense(), np.linalg.inv(Mp), rtol=1e-10,
                    atol=1e-12)
    r, c = d.counts(0), d.counts(1)
    la, lb = S_E2 / S_A2, S_E2 / S_B2
    Al, Be = r @ (r / (r + la)), c @ (c / (c + lb))
    n = d.n_obs
    logK = np.sum(np.log(r + la)) + np.sum(np.log(c + lb)) + np.log(1 - Al * Be / n**2)
    g, h = d.n_levels
    ld = (n - g - h) * np.log(S_E2) + g * np.log(S_A2) + h * np.log(S_B2) + logK
    assert_allclose(D2.logdet(), ld, rtol=1e-12)


def test_proportional_exact_for_proportional_design():
    N = np.outer([1, 2, 3, 1, 2], [2, 1, 3, 1])
    d = design_from_table(N, rng=12)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    Vd = V.todense()
    D2 = ProportionalApproximation(V)
    assert_allclose(D2.inverse().todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-13)
    assert_allclose(D2.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)
    # rho_k = 0 for k >= 2 exactly when N is proportional
    D1 = ModifiedCovariance(V)
    assert_allclose(D1.rho[1:], 0.0, atol=1e-12)


def test_proportional_exact_for_balanced_design():
    d = design_from_table(np.full((4, 3), 2), rng=13)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    D2 = ProportionalApproximation(V)
    spec = balanced_spectrum(d, S_E2, [S_A2, S_B2])
    assert_allclose(D2.inverse().todense(), spec.inverse().todense(), atol=1e-12)
    assert_allclose(D2.logdet(), spec.logdet(), rtol=1e-12)


def prop3_codes(u=(1, 2, 1), v=(2, 1, 1, 3), w=(1, 2)):
    t = np.einsum("i,j,k->ijk", u, v, w)
    idx = np.argwhere(t > 0)
    reps = t[tuple(idx.T)]
    return np.repeat(idx.T, reps, axis=1)


def test_proportional_three_factors_exact():
    d = CrossedDesign.from_codes(prop3_codes(), names=["a", "b", "c"])
    s2 = [S_A2, S_B2, 0.3]
    V = KhatriRaoCovariance(d, S_E2, s2)
    Vd = dense_v(d, S_E2, s2)
    assert_allclose(V.todense(), Vd, atol=1e-12)
    D2 = ProportionalApproximation(V)
    assert_allclose(D2.inverse().todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-13)
    assert_allclose(D2.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)


def test_proportional_three_factors_formula():
    """Section 11 closed forms against the dense M_prop for a non-proportional K = 3 design."""
    rng = np.random.default_rng(14)
    codes = np.vstack([rng.integers(0, 4, 80), rng.integers(0, 5, 80), rng.integers(0, 3, 80)])
    d = CrossedDesign.from_codes(codes)
    s2 = np.array([S_A2, S_B2, 0.3])
    D2 = ProportionalApproximation(KhatriRaoCovariance(d, S_E2, s2))
    counts = [d.counts(k).astype(float) for k in range(3)]
    n = d.n_obs
    P = np.diag(np.concatenate([counts[k] + S_E2 / s2[k] for k in range(3)]))
    B = sp.block_diag([c[:, None] for c in counts]).toarray()
    Mp = P + B @ (np.ones((3, 3)) - np.eye(3)) @ B.T / n
    assert_allclose(D2.level_space_operator().todense() * S_E2, Mp, atol=1e-10)
    assert np.linalg.eigvalsh(Mp).min() > 0
    q = Mp.shape[0]
    ld = (n - q) * np.log(S_E2) + sum(d.n_levels[k] * np.log(s2[k]) for k in range(3))
    assert_allclose(D2.logdet(), ld + np.linalg.slogdet(Mp)[1], rtol=1e-12)


def test_proportional_interaction_effective_counts():
    """With (1|a:b) and a proportional Omega, D2 is exact (Section 8)."""
    N = np.outer([1, 3, 2], [1, 1, 1, 1])  # counts constant along rows => Omega proportional
    d = design_from_table(N, rng=15, interaction=True)
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2, S_C2])
    Vd = V.todense()
    D2 = ProportionalApproximation(V)
    # Omega = n/(s_e^2 + n s_C^2) is proportional iff each row has one count value pattern
    assert_allclose(D2.inverse().todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-13)
    assert_allclose(D2.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)


def test_asymptotic_formula(unbalanced):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    n = d.n_obs
    Za, Zb = d.indicator(0).toarray(), d.indicator(1).toarray()
    VA = S_E2 * np.eye(n) + S_A2 * Za @ Za.T
    VB = S_E2 * np.eye(n) + S_B2 * Zb @ Zb.T
    expect = np.linalg.inv(VA) + np.linalg.inv(VB) - (np.eye(n) - np.ones((n, n)) / n) / S_E2
    A = asymptotic_inverse(V)
    assert_allclose(A.todense(), expect, atol=1e-12)
    assert A.H is A


def test_asymptotic_balanced_error_small():
    d = design_from_table(np.full((25, 25), 2), rng=16)
    V = KhatriRaoCovariance(d, 1.0, [0.5, 0.5])
    Vinv = balanced_spectrum(d, 1.0, [0.5, 0.5]).inverse().todense()
    assert rel(asymptotic_inverse(V).todense(), Vinv) < 3e-3


def test_approximation_errors_are_ordered():
    """On a mildly unbalanced design D1 is far more accurate than D2 and the asymptotic form."""
    N = random_table(15, 15, rng=17, missing=0.0, lam=3.0)
    d = design_from_table(N, rng=17)
    V = KhatriRaoCovariance(d, 1.0, [0.5, 0.5])
    Vinv = np.linalg.inv(V.todense())
    e_asym = rel(asymptotic_inverse(V).todense(), Vinv)
    e_d2 = rel(ProportionalApproximation(V).inverse().todense(), Vinv)
    e_d1 = rel(ModifiedCovariance(V).inverse().todense(), Vinv)
    assert e_d1 < 0.1 * e_d2
    assert e_d2 < 0.1
    assert e_asym < 0.1


# ---------------------------------------------------------------------------- operator contract
def test_operators_matmat_matches_matvec(unbalanced):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    x = np.random.default_rng(18).standard_normal((d.n_obs, 4))
    D1 = ModifiedCovariance(V)
    ops = [V, D1.inverse(), D1.as_operator(), ProportionalApproximation(V).inverse(),
           asymptotic_inverse(V)]
    for op in ops:
        assert op.dtype == np.float64
        Y = op.matmat(x)
        cols = np.column_stack([op.matvec(x[:, k]) for k in range(4)])
        assert_allclose(Y, cols, atol=1e-13)
        assert_allclose(op.rmatvec(x[:, 0]), op.matvec(x[:, 0]))
        assert op.matvec(x[:, :1]).shape == (d.n_obs, 1)


def test_bad_variances():
    d = design_from_table(random_table(4, 3, rng=0))
    with pytest.raises(ValueError, match="positive"):
        KhatriRaoCovariance(d, 0.0, [1.0, 1.0])
    with pytest.raises(ValueError, match="one variance per factor"):
        KhatriRaoCovariance(d, 1.0, [1.0])
    with pytest.raises(TypeError, match="covariance operator"):
        ModifiedCovariance(np.eye(3))


def test_modified_given_reference_totals(unbalanced):
    d = unbalanced
    V = KhatriRaoCovariance(d, S_E2, [S_A2, S_B2])
    r, c = d.counts(0), d.counts(1)
    given = ModifiedCovariance(V, reference=(r.mean(), c.mean()))
    assert_allclose(given.inverse().todense(), ModifiedCovariance(V).inverse().todense(),
                    atol=1e-13)
    with pytest.raises(ValueError, match="reference"):
        ModifiedCovariance(V, reference="median")
