"""Synthetic crossed designs with controlled imbalance, for users, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import LmmopsError

__all__ = ["simulate_codes", "simulate_crossed"]


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def simulate_codes(n_obs, n_levels, zipf=None, seed=None):
    """Level codes of K crossed factors with Zipf-skewed level frequencies.

    Every level is observed at least once: the first ``q_k`` draws of factor k are its
    levels in random order, and the remaining ``n_obs - q_k`` draws have probabilities
    proportional to ``rank^(-s_k)`` (``s_k = 0`` is uniform). Factors are drawn
    independently, so the crossing pattern is haphazard.

    Parameters
    ----------
    n_obs : int
    n_levels : sequence of int
        Levels per factor, each at least 2 and less than ``n_obs``.
    zipf : sequence of float, optional
        Zipf exponents per factor; default all 0 (uniform).
    seed : int or numpy.random.Generator, optional

    Returns
    -------
    ndarray of int32, shape (n_factors, n_obs)

    Examples
    --------
    >>> codes = simulate_codes(1000, [50, 20], zipf=[1.0, 0.0], seed=1)
    >>> codes.shape, [int(c.max()) + 1 for c in codes]
    ((2, 1000), [50, 20])
    """
    rng = _rng(seed)
    n_obs = int(n_obs)
    n_levels = [int(q) for q in n_levels]
    zipf = [0.0] * len(n_levels) if zipf is None else [float(z) for z in zipf]
    if len(zipf) != len(n_levels):
        raise LmmopsError(f"got {len(zipf)} Zipf exponents for {len(n_levels)} factors")
    codes = np.empty((len(n_levels), n_obs), dtype=np.int32)
    for k, (q, s) in enumerate(zip(n_levels, zipf)):
        if q < 2 or q >= n_obs:
            raise LmmopsError(
                f"factor {k + 1}: {q} levels for {n_obs} observations; need 2 <= levels < n_obs"
            )
        if s < 0:
            raise LmmopsError(f"factor {k + 1}: Zipf exponent must be >= 0, got {s}")
        p = np.arange(1, q + 1, dtype=np.float64) ** (-s)
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        rest = np.searchsorted(cdf, rng.random(n_obs - q), side="right")
        np.minimum(rest, q - 1, out=rest)
        c = np.concatenate([np.arange(q), rest]).astype(np.int32)
        codes[k] = c[rng.permutation(n_obs)]
    return codes


def simulate_crossed(n_obs, n_levels, zipf=None, sigma2=None, sigma2_e=1.0, intercept=0.0,
                     seed=None):
    """Simulate ``y = intercept + sum_k u_k[g_k] + e`` on a crossed design.

    Parameters
    ----------
    n_obs : int
    n_levels : sequence of int
    zipf : sequence of float, optional
        Zipf exponents of the level frequencies (see :func:`simulate_codes`).
    sigma2 : sequence of float, optional
        Variances of the random effects; default all 1.
    sigma2_e : float
        Residual variance.
    intercept : float
    seed : int or numpy.random.Generator, optional

    Returns
    -------
    pandas.DataFrame
        Columns ``y``, then ``g1`` ... ``gK`` (integer level codes), in the order given.

    Examples
    --------
    >>> df = simulate_crossed(500, [20, 8], zipf=[0.8, 1.0], seed=2)
    >>> list(df.columns), len(df)
    (['y', 'g1', 'g2'], 500)
    """
    rng = _rng(seed)
    codes = simulate_codes(n_obs, n_levels, zipf, rng)
    K = codes.shape[0]
    sigma2 = [1.0] * K if sigma2 is None else [float(s) for s in sigma2]
    if len(sigma2) != K or any(s < 0 for s in sigma2) or sigma2_e <= 0:
        raise LmmopsError("need one variance >= 0 per factor and a residual variance > 0")
    y = np.full(codes.shape[1], float(intercept))
    for k in range(K):
        u = rng.normal(scale=np.sqrt(sigma2[k]), size=int(n_levels[k]))
        y += u[codes[k]]
    y += rng.normal(scale=np.sqrt(sigma2_e), size=codes.shape[1])
    cols = {"y": y}
    for k in range(K):
        cols[f"g{k + 1}"] = codes[k]
    return pd.DataFrame(cols)
