"""Stochastic estimators against exact answers, at fixed seeds, within stated standard errors."""

import numpy as np
import pytest
import scipy.linalg as sla
from scipy.sparse.linalg import aslinearoperator

from lmmops.linalg.trace import (
    diagonal,
    hutchinson,
    hutchpp,
    lanczos_from_cg,
    rademacher,
    slq_logdet,
    slq_quadrature,
    xtrace,
)

# Each stochastic check allows Z_MAX standard errors; at fixed seeds a failure means a bug
# (or a badly calibrated standard error), not bad luck.
Z_MAX = 4.0


@pytest.fixture(scope="module")
def spd():
    rng = np.random.default_rng(42)
    U, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    w = 1.0 / np.arange(1, 201) ** 1.2 + 0.01
    return U @ np.diag(w) @ U.T


@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp", "xtrace"])
def test_estimators_within_standard_errors(spd, estimator):
    exact = np.trace(spd)
    op = aslinearoperator(spd)
    for seed in range(5):
        if estimator == "hutchinson":
            est = hutchinson(op, n_probes=60, rng=seed)
        elif estimator == "hutchpp":
            est = hutchpp(op, 60, rng=seed)
        else:
            est = xtrace(op, 60, rng=seed)
        assert abs(est.estimate - exact) <= Z_MAX * est.stderr, (seed, est)
        assert est.stderr > 0


def test_standard_errors_are_calibrated(spd):
    """Across 300 seeds, |error| / stderr behaves like |N(0,1)|: about 5% beyond 2."""
    exact = np.trace(spd)
    z = np.array([(lambda e: (e.estimate - exact) / e.stderr)(hutchinson(spd, 40, rng=s))
                  for s in range(300)])
    assert abs(np.mean(z)) < 0.25
    assert 0.8 < np.std(z) < 1.25
    assert np.mean(np.abs(z) > 2) < 0.1


def test_error_shrinks_with_more_probes(spd):
    exact = np.trace(spd)
    rmse = []
    for m in (10, 40, 160):
        errs = [hutchinson(spd, m, rng=s).estimate - exact for s in range(60)]
        rmse.append(np.sqrt(np.mean(np.square(errs))))
    assert rmse[0] > 1.6 * rmse[1] > 1.6 * 1.6 * rmse[2]  # ~ 1/sqrt(m): factor 2 per step
    se = [hutchinson(spd, m, rng=0).stderr for m in (10, 40, 160)]
    assert se[0] > se[1] > se[2]


def test_hutchpp_and_xtrace_beat_hutchinson_on_decaying_spectrum(spd):
    exact = np.trace(spd)

    def rmse(f):
        return np.sqrt(np.mean([(f(s).estimate - exact) ** 2 for s in range(40)]))

    h = rmse(lambda s: hutchinson(spd, 60, rng=s))
    hpp = rmse(lambda s: hutchpp(spd, 60, rng=s))
    xt = rmse(lambda s: xtrace(spd, 60, rng=s))
    assert hpp < h / 3
    assert xt < h / 3


def test_exact_cases(spd):
    n = spd.shape[0]
    assert hutchinson(spd, probes=np.eye(n)).estimate == pytest.approx(np.trace(spd), rel=1e-13)
    assert hutchinson(spd, probes=np.eye(n)).stderr == 0.0
    est = hutchpp(spd, 3 * n, rng=0)
    assert est.estimate == pytest.approx(np.trace(spd), rel=1e-10)
    assert est.stderr == 0.0
    d = diagonal(spd, probes=np.eye(n)[:, :1].repeat(1, axis=1))  # e_1 only
    assert d.estimate[0] == pytest.approx(spd[0, 0])


def test_diagonal_within_standard_errors():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(30, 30))
    A = B @ B.T / 30 + np.diag(np.arange(1.0, 31.0))
    est = diagonal(A, n_probes=400, rng=3)
    z = (est.estimate - np.diag(A)) / est.stderr
    assert np.all(np.abs(z) < Z_MAX)
    assert np.mean(np.abs(z) > 2) < 0.2


def test_slq_logdet_exact_with_unit_probes_and_full_lanczos():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(30, 30))
    A = B @ B.T / 30 + 0.5 * np.eye(30)
    est = slq_logdet(A, probes=np.eye(30), steps=30)
    assert est.estimate == pytest.approx(np.linalg.slogdet(A)[1], abs=1e-8)


def test_slq_logdet_within_standard_errors_and_control_variate_helps():
    rng = np.random.default_rng(5)
    n = 300
    B = rng.normal(size=(n, 5))
    D = np.exp(rng.normal(size=n))
    P = np.diag(D) + B @ B.T  # the "preconditioner": exact split P = R R'
    C = rng.normal(size=(n, n)) / np.sqrt(n)
    A = P + 0.05 * (C @ C.T)  # the operator, close to P
    exact = np.linalg.slogdet(A)[1]
    plain = slq_logdet(A, n_probes=30, rng=1, steps=25)
    assert abs(plain.estimate - exact) <= Z_MAX * plain.stderr
    R = np.linalg.cholesky(P)
    Rinv = aslinearoperator(sla.solve_triangular(R, np.eye(n), lower=True))
    cv = slq_logdet(A, n_probes=30, rng=1, steps=25, precond=Rinv,
                    precond_logdet=float(np.linalg.slogdet(P)[1]))
    assert abs(cv.estimate - exact) <= Z_MAX * cv.stderr
    assert cv.stderr < plain.stderr / 5


def test_lanczos_from_cg_reproduces_quadrature():
    """A plain CG run gives the Lanczos tridiagonal: its quadrature equals b'log(A)b/|b|^2."""
    rng = np.random.default_rng(2)
    B = rng.normal(size=(25, 25))
    A = B @ B.T / 25 + np.eye(25)
    b = rademacher(25, 1, rng)[:, 0]
    x, r = np.zeros(25), b.copy()
    p = r.copy()
    alphas, betas = [], []
    for _ in range(25):
        Ap = A @ p
        a = (r @ r) / (p @ Ap)
        x += a * p
        r_new = r - a * Ap
        beta = (r_new @ r_new) / (r @ r)
        alphas.append(a)
        betas.append(beta)
        r = r_new
        if np.linalg.norm(r) < 1e-14:
            break
        p = r + beta * p
    diag, off = lanczos_from_cg(alphas, betas)
    w, V = np.linalg.eigh(A)
    exact = (V.T @ b) ** 2 @ np.log(w) / (b @ b)
    assert slq_quadrature(diag, off) == pytest.approx(exact, rel=1e-8)
    # the Ritz values lie inside the spectrum
    T = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    ritz = sla.eigvalsh(T)
    assert ritz.min() >= w.min() * (1 - 1e-8)
    assert ritz.max() <= w.max() * (1 + 1e-8)


def test_probe_shape_errors():
    A = np.eye(4)
    with pytest.raises(ValueError, match="probes must have shape"):
        hutchinson(A, probes=np.ones((3, 2)))
    with pytest.raises(ValueError, match="n_probes >= 1"):
        hutchinson(A)
    with pytest.raises(ValueError, match="square operator"):
        hutchinson(np.ones((3, 4)), 2, rng=0)
