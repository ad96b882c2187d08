"""Tests of lmmops.linalg.preconditioners: SPD, exactness where claimed, errors, interoperability.

Every kind is checked for symmetry and positive definiteness from its dense form on small
designs and by quadratic forms on a larger one; closed forms are compared with the
constructions of lmmops.paper.spectral / lmmops.paper.lowrank; loose iteration counts on a seeded
medium Zipf design catch regressions (the study measures the real numbers).
"""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from conftest import SEED, random_design
from numpy.testing import assert_allclose

from lmmops.data.design import CrossedDesign
from lmmops.data.simulate import simulate_codes
from lmmops.errors import DesignError
from lmmops.linalg.krylov import cg
from lmmops.linalg.operators import CovarianceOperator
from lmmops.linalg.preconditioners import LEVEL_KINDS, build

SIGMAS = {2: [0.5, 2.0], 3: [0.5, 2.0, 1.0]}


def _V(design, s2e=1.3):
    return CovarianceOperator(design, s2e, SIGMAS[design.n_factors])


def _level_kinds(K, q):
    kinds = [("identity", {}), ("jacobi", {}), ("proportional", {}),
             ("block_gauss_seidel", {}), ("amg", {}), ("amg", {"max_coarse": 10}),
             ("amg", {"max_coarse": 10, "cycle": "pyamg"}),
             ("amg", {"max_coarse": 10, "smooth": "jacobi"}),
             ("lowrank", {"rank": 3}), ("lowrank", {"rank": 3, "base": "jacobi"})]
    if K == 2:
        kinds += [("spectral", {"rank": 2}), ("spectral", {"margins": "reference"}),
                  ("lowrank", {"rank": 3, "base": "spectral", "margins": "reference"})]
    return kinds


def _dense(P):
    n = P.shape[0]
    return P.aspreconditioner().matmat(np.eye(n))


def _assert_spd(D, what):
    assert_allclose(D, D.T, rtol=1e-9, atol=1e-9 * np.abs(D).max(), err_msg=what)
    ev = np.linalg.eigvalsh(0.5 * (D + D.T))
    assert ev.min() > 0, f"{what}: smallest eigenvalue {ev.min()}"


@pytest.fixture
def small(rng):
    """Connected K = 2 design with missing cells and single-observation levels."""
    while True:
        d = random_design(rng, n_levels=(9, 6), n_obs=90, missing=0.4)
        if d.is_connected:
            return d


@pytest.fixture(scope="module")
def medium():
    """Seeded medium Zipf design, n = 30,000, 3,000 x 400 levels."""
    codes = simulate_codes(30_000, [3000, 400], zipf=[1.0, 1.0], seed=SEED)
    return CrossedDesign.from_codes(codes)


# ------------------------------------------------------------------ SPD and exactness
def test_every_level_kind_is_spd(design):
    M = _V(design).level_space()
    for kind, opts in _level_kinds(design.n_factors, M.shape[0]):
        if (kind == "spectral" or opts.get("base") == "spectral") and not design.is_connected:
            continue
        P = build(M, kind=kind, **opts)
        _assert_spd(_dense(P), f"{kind} {opts}")
        assert isinstance(P.describe(), str)
        assert kind in P.describe()


@pytest.mark.parametrize("kind", ["identity", "spectral", "exact", "lowrank"])
def test_every_observation_kind_is_spd(small, kind):
    V = _V(small)
    _assert_spd(_dense(build(V, kind=kind)), kind)


@pytest.mark.parametrize("transpose", [False, True])
def test_observation_spectral_is_exactly_d1(small, transpose):
    """Full rank: the Schur-complement form equals lmmops.paper.spectral's V check^{-1}."""
    from lmmops.paper.spectral import ModifiedCovariance

    d = CrossedDesign.from_codes(small.codes[::-1]) if transpose else small
    V = _V(d)
    P = build(V, kind="spectral")
    assert P.rank == min(d.n_levels)
    assert "exact V check" in P.describe()
    D1 = ModifiedCovariance(V)
    assert_allclose(_dense(P), D1.inverse().todense(), rtol=1e-10, atol=1e-12)
    assert_allclose(P.logdet(), D1.logdet(margin_correction=False), rtol=1e-12)
    P_h = build(V, kind="spectral", reference="harmonic")
    D1_h = ModifiedCovariance(V, reference="harmonic")
    assert_allclose(_dense(P_h), D1_h.inverse().todense(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opts", [{"rank": 1}, {"rank": 3}, {"max_full": 2}])
def test_truncated_observation_spectral_is_spd_and_dominates_d1(small, opts):
    """Dropping tail rho_k^2 from K'K gives B >= Kc: P is SPD, P >= V check^{-1}, and
    P <= s_e^{-2} I (the safe truncation; truncating K itself can be indefinite)."""
    V = _V(small)
    P = build(V, kind="spectral", **opts)
    assert P.rank < min(small.n_levels)
    D = _dense(P)
    _assert_spd(D, str(opts))
    full = _dense(build(V, kind="spectral"))
    assert np.linalg.eigvalsh(D - full).min() > -1e-12
    assert np.linalg.eigvalsh(D).max() <= 1 / V.sigma2_e + 1e-12
    with pytest.raises(NotImplementedError, match="every SVD triplet"):
        P.logdet()


def test_lifted_is_symmetric_but_poor(small):
    V = _V(small)
    P = build(V, kind="lifted", base="jacobi")
    D = _dense(P)
    assert_allclose(D, D.T, atol=1e-10)
    assert P.kind == "lifted_jacobi"
    assert "negative result" in P.describe()


def test_quadratic_forms_at_scale(medium):
    V = CovarianceOperator(medium, 1.0, [1.0, 1.0])
    M = V.level_space()
    X = np.random.default_rng(3).standard_normal((M.shape[0], 8))
    for kind in ["jacobi", "proportional", "spectral", "block_gauss_seidel", "amg", "lowrank"]:
        PX = build(M, kind=kind).aspreconditioner().matmat(X)
        assert np.all(np.einsum("ij,ij->j", X, PX) > 0), kind
        assert_allclose(X.T @ PX, (X.T @ PX).T, rtol=1e-8, atol=1e-10, err_msg=kind)
    Y = np.random.default_rng(4).standard_normal((medium.n_obs, 8))
    for kind, opts in [("spectral", {}), ("exact", {}), ("exact", {"inner": "jacobi"}),
                       ("lowrank", {})]:
        PY = build(V, kind=kind, **opts).aspreconditioner().matmat(Y)
        assert np.all(np.einsum("ij,ij->j", Y, PY) > 0), kind
        assert_allclose(Y.T @ PY, (Y.T @ PY).T, rtol=1e-8, atol=1e-10, err_msg=kind)
    Xn = np.random.default_rng(4).standard_normal((V.shape[0], 3))
    for kind in ["spectral", "exact"]:
        PX = build(V, kind=kind).aspreconditioner().matmat(Xn)
        assert np.all(np.einsum("ij,ij->j", Xn, PX) > 0), kind


def test_proportional_matches_spectral_module(design):
    from lmmops.paper.spectral import ProportionalApproximation

    if not design.is_connected:
        pytest.skip("lmmops.paper.spectral needs a connected design")
    V = _V(design)
    M = V.level_space()
    ours = _dense(build(M, kind="proportional"))
    theirs = ProportionalApproximation(V).level_space_inverse().todense() / V.sigma2_e
    assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_spectral_reference_margins_is_d1(small):
    from lmmops.paper.spectral import ModifiedCovariance

    V = _V(small)
    M = V.level_space()
    P = build(M, kind="spectral", rank=6, margins="reference")
    theirs = ModifiedCovariance(V).level_space_inverse().todense() / V.sigma2_e
    assert_allclose(_dense(P), theirs, rtol=1e-9, atol=1e-12)


def test_full_rank_spectral_and_lowrank_are_exact(small):
    V = _V(small)
    M = V.level_space()
    Minv = np.linalg.inv(M.todense())
    P = build(M, kind="spectral", rank=min(small.n_levels))
    assert_allclose(_dense(P), Minv, rtol=1e-8, atol=1e-10)
    for base in ["proportional", "spectral", "jacobi"]:
        P = build(M, kind="lowrank", rank=M.shape[0], base=base)
        assert_allclose(_dense(P), Minv, rtol=1e-8, atol=1e-10, err_msg=base)
        b = np.random.default_rng(0).standard_normal(M.shape[0])
        res = []
        cg(M, b, rtol=1e-10, M=P.aspreconditioner(), residuals=res)
        assert len(res) - 1 <= 2, base


def test_observation_exact_and_lowrank_are_inverses(small):
    V = _V(small)
    Vinv = np.linalg.inv(V.todense())
    direct = build(V, kind="exact")
    assert "Schur complement" in direct.describe()
    assert_allclose(_dense(direct), Vinv, rtol=1e-10, atol=1e-12)
    inner = build(V, kind="exact", inner="block_gauss_seidel")
    assert_allclose(_dense(inner), Vinv, rtol=1e-7, atol=1e-9)
    assert max(inner.inner_iterations) > 1
    assert_allclose(_dense(build(V, kind="exact", max_dense=2)), Vinv, rtol=1e-7, atol=1e-9)
    lowrank = build(V, kind="lowrank")
    assert "D1 + its complete correction" in lowrank.describe()
    assert_allclose(_dense(lowrank), Vinv, rtol=1e-10, atol=1e-12)
    woodbury = build(V, kind="lowrank", form="woodbury")
    assert_allclose(_dense(woodbury), Vinv, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_direct_exact_any_k_and_factor_order(rng, order):
    """The dense Schur complement on all factors but the largest is V^{-1} exactly, with
    the largest factor first, in the middle or last (index sets, not slices), and
    log|V| from the Cholesky factor is exact."""
    codes = np.vstack([rng.integers(0, 30, 200), rng.integers(0, 7, 200),
                       rng.integers(0, 5, 200)])[list(order)]
    V = CovarianceOperator(CrossedDesign.from_codes(codes), 0.7, [0.5, 2.0, 1.0])
    P = build(V, kind="exact")
    assert P.q_R == 12
    assert P.V.design.n_levels[P._L] == 30
    Vd = V.todense()
    assert_allclose(_dense(P), np.linalg.inv(Vd), rtol=1e-10, atol=1e-12)
    assert_allclose(P.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)
    Y = rng.standard_normal((200, 3))
    assert_allclose(Vd @ P.solve(Y), Y, atol=1e-10)
    assert_allclose(Vd @ P.solve(Y[:, 0]), Y[:, 0], atol=1e-10)


def test_direct_exact_is_one_outer_iteration_and_falls_back(medium):
    V = CovarianceOperator(medium, 1.0, [1.0, 1.0])
    b = np.random.default_rng(6).standard_normal(medium.n_obs)
    P = build(V, kind="exact")
    assert isinstance(P.logdet(), float)
    assert "Schur" in P.describe()
    assert _iterations(V, b, P, rtol=1e-10) <= 1
    # above the setup budget the default is the inner PCG, which still converges
    Q = build(V, kind="exact", max_gram_flops=1.0)
    assert "inner level-space PCG" in Q.describe()
    assert _iterations(V, b, Q) <= 3
    with pytest.raises(ValueError, match="max_dense"):
        build(V, kind="exact", inner="direct", max_dense=10)


def test_logdet_of_each_kind(design):
    V = _V(design)
    M = V.level_space()
    for kind, opts in _level_kinds(design.n_factors, M.shape[0]):
        if (kind == "spectral" or opts.get("base") == "spectral") and not design.is_connected:
            continue
        P = build(M, kind=kind, **opts)
        if kind in ("amg", "lowrank"):
            with pytest.raises(NotImplementedError, match="slq_logdet"):
                P.logdet()
            continue
        ld = P.logdet()
        assert_allclose(ld, -np.linalg.slogdet(_dense(P))[1], rtol=1e-8, atol=1e-8,
                        err_msg=kind)


def test_observation_logdets(small):
    V = _V(small)
    ld_V = np.linalg.slogdet(V.todense())[1]
    assert_allclose(build(V, kind="lowrank").logdet(), ld_V, rtol=1e-10)
    P = build(V, kind="spectral")
    assert_allclose(P.logdet(), -np.linalg.slogdet(_dense(P))[1], rtol=1e-9)
    assert_allclose(build(V, kind="exact").logdet(), ld_V, rtol=1e-12)
    with pytest.raises(NotImplementedError, match="slq_logdet"):
        build(V, kind="exact", inner="jacobi").logdet()


# ------------------------------------------------------------------ errors
def test_kinds_that_do_not_apply_say_why(design_k3, small):
    M3 = _V(design_k3).level_space()
    with pytest.raises(DesignError, match="two crossed factors"):
        build(M3, kind="spectral")
    with pytest.raises(DesignError, match="two crossed factors"):
        build(_V(design_k3), kind="spectral")
    V = _V(small)
    with pytest.raises(ValueError, match="level-space preconditioner.*level_space"):
        build(V, kind="jacobi")
    with pytest.raises(ValueError, match="observation-space"):
        build(V.level_space(), kind="exact")
    with pytest.raises(ValueError, match="has no rank"):
        build(V.level_space(), kind="jacobi", rank=3)
    with pytest.raises(ValueError, match="unknown kind"):
        build(V.level_space(), kind="ilu")
    with pytest.raises(ValueError, match="max_rank"):
        build(V, kind="lowrank", max_rank=3)
    with pytest.raises(ValueError, match="max_rank"):
        build(V, kind="lowrank", form="woodbury", max_rank=3)
    with pytest.raises(ValueError, match="form must be"):
        build(V, kind="lowrank", form="svd")
    with pytest.raises(ValueError, match="takes no options"):
        build(V, kind="exact", inner="direct", inner_rtol=1e-3)
    with pytest.raises(TypeError, match="LevelSpaceOperator"):
        build(np.eye(3), kind="jacobi")


# ------------------------------------------------------------------ iteration counts
def _iterations(A, b, P, rtol=1e-6):
    res = []
    x, info = cg(A, b, rtol=rtol, M=None if P is None else P.aspreconditioner(),
                 residuals=res, maxiter=5000)
    assert info == 0
    return len(res) - 1


def test_level_iteration_counts_on_medium_zipf(medium):
    V = CovarianceOperator(medium, 1.0, [1.0, 1.0])
    M = V.level_space()
    rhs = M.rhs(np.random.default_rng(1).standard_normal(medium.n_obs))
    limits = {"jacobi": 25, "proportional": 15, "spectral": 15, "lowrank": 15,
              "block_gauss_seidel": 12, "amg": 10}
    its = {kind: _iterations(M, rhs, build(M, kind=kind)) for kind in limits}
    for kind, lim in limits.items():
        assert its[kind] <= lim, its
    assert its["proportional"] < its["jacobi"]
    assert its["block_gauss_seidel"] < its["jacobi"]
    assert _iterations(M, rhs, None) > 3 * its["jacobi"]


def test_observation_iteration_counts(medium):
    V = CovarianceOperator(medium, 1.0, [1.0, 1.0])
    b = np.random.default_rng(2).standard_normal(medium.n_obs)
    assert _iterations(V, b, build(V, kind="exact")) <= 3


def test_d1_halves_iterations_on_mild_imbalance():
    rng = np.random.default_rng(SEED)
    g, h = 120, 80
    reps = 1 + rng.poisson(1.5, size=(g, h))
    a, c = np.meshgrid(np.arange(g), np.arange(h), indexing="ij")
    codes = np.repeat(np.vstack([a.ravel(), c.ravel()]), reps.ravel(), axis=1)
    V = CovarianceOperator(CrossedDesign.from_codes(codes), 1.0, [1.0, 1.0])
    b = rng.standard_normal(V.shape[0])
    none = _iterations(V, b, None)
    d1 = _iterations(V, b, build(V, kind="spectral"))
    assert d1 <= none / 2, (d1, none)


# ------------------------------------------------------------------ interoperability
def test_scipy_interoperability_lines(small):
    V = _V(small)
    b = np.random.default_rng(5).standard_normal(V.shape[0])
    x_ref = np.linalg.solve(V.todense(), b)
    M = V.level_space()
    for kind in LEVEL_KINDS:
        u, info = spla.cg(M, V.level_space().rhs(b), rtol=1e-12,
                          M=build(M, kind=kind).aspreconditioner())
        assert info == 0, kind
        assert_allclose(M.lift(u, b), x_ref, rtol=1e-8, atol=1e-10, err_msg=kind)
    for kind in ["exact", "spectral"]:
        x, info = spla.cg(V, b, rtol=1e-10, M=build(V, kind=kind).aspreconditioner())
        assert info == 0
        assert_allclose(x, x_ref, rtol=1e-7, atol=1e-9, err_msg=kind)


def test_pyamg_krylov_accepts_our_operators(small):
    pyamg = pytest.importorskip("pyamg")
    V = _V(small)
    M = V.level_space()
    b = np.random.default_rng(6).standard_normal(V.shape[0])
    x_ref = np.linalg.solve(V.todense(), b)
    u, info = pyamg.krylov.cg(M, M.rhs(b), tol=1e-12,
                              M=build(M, kind="proportional").aspreconditioner())
    assert info == 0
    assert_allclose(M.lift(u, b), x_ref, rtol=1e-7, atol=1e-9)
    x, info = pyamg.krylov.cg(V, b, tol=1e-10, M=build(V, kind="exact").aspreconditioner())
    assert info == 0
    assert_allclose(x, x_ref, rtol=1e-7, atol=1e-9)


def test_apply_cost_interleaves_and_takes_minima(monkeypatch):
    """With a fake clock, apply takes 3 ticks and matvec 2 (1 on its fastest call): the
    ratio of the minima is 3.0, each callable runs reps + 1 times, alternately."""
    from lmmops.linalg.preconditioners import registry as pc

    clock = {"t": 0.0}
    calls = []

    def apply(x):
        calls.append("P")
        clock["t"] += 3.0

    def matvec(x):
        calls.append("A")
        clock["t"] += 1.0 if len(calls) == 6 else 2.0

    monkeypatch.setattr(pc.time, "perf_counter", lambda: clock["t"])
    assert pc.apply_cost(apply, matvec, None, reps=3) == 3.0
    assert calls == ["P", "A"] * 4
    with pytest.raises(ValueError, match="reps"):
        pc.apply_cost(apply, matvec, None, reps=0)


def test_schur_setup_flops_and_one_factor(rng):
    """The setup estimate is sum over the largest factor's levels of (cells)^2; with one
    factor M is diagonal, the complement is empty, and both routes give V^{-1}."""
    from lmmops.linalg.preconditioners.observation import _schur_gram_flops

    codes = np.vstack([rng.integers(0, 25, 300), rng.integers(0, 6, 300),
                       rng.integers(0, 4, 300)])
    d = CrossedDesign.from_codes(codes)
    cells = sum((np.asarray(d.crosstab(0, k).todense()) > 0).sum(axis=1) for k in (1, 2))
    assert _schur_gram_flops(d) == float(np.sum(cells**2))
    V1 = CovarianceOperator(CrossedDesign.from_codes(codes[:1]), 1.0, [2.0])
    Vd = V1.todense()
    P = build(V1, kind="exact")
    assert P.q_R == 0
    assert_allclose(_dense(P), np.linalg.inv(Vd), rtol=1e-12, atol=1e-14)
    assert_allclose(P.logdet(), np.linalg.slogdet(Vd)[1], rtol=1e-12)
    Q = build(V1, kind="exact", inner="jacobi")
    assert "inner level-space PCG" in Q.describe()
    assert_allclose(_dense(Q), np.linalg.inv(Vd), rtol=1e-8, atol=1e-10)


def test_amg_default_is_plain_aggregation_and_smoothing_is_an_option(medium):
    """The default hierarchy's prolongators are plain aggregates (one unit entry per row);
    smooth='jacobi' gives classical smoothed aggregation (denser prolongators); both are
    SPD and converge on the medium design within the loose bound."""
    V = _V(medium)
    M = V.level_space()
    b = M.rhs(np.random.default_rng(2).normal(size=medium.n_obs))
    plain = build(M, "amg", max_coarse=50)
    smooth = build(M, "amg", max_coarse=50, smooth="jacobi")
    assert len(plain.ml.levels) >= 2
    assert len(smooth.ml.levels) >= 2
    P0 = plain.ml.levels[0].P.tocsr()
    assert np.all(np.diff(P0.indptr) <= 1)
    assert smooth.ml.levels[0].P.nnz > P0.nnz
    assert "plain aggregation" in plain.describe()
    assert "smoothed aggregation" in smooth.describe()
    for P in (plain, smooth):
        its = []
        x, info = cg(M, b, rtol=1e-8, M=P.aspreconditioner(), callback=its.append)
        assert info == 0
        assert len(its) <= 15
        np.testing.assert_allclose(M.matvec(x), b, rtol=0, atol=1e-6 * np.linalg.norm(b))
