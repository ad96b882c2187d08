"""Synthetic crossed designs with controlled imbalance, for users, tests and benchmarks."""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from lmmops.data.terms import RandomEffectsTerm
from lmmops.errors import ArgumentError

__all__ = ["simulate_codes", "simulate_crossed", "simulate_slopes"]


def _rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (not isinstance(seed, numbers.Integral) or seed < 0):
        raise ArgumentError(
            f"seed must be a non-negative integer, a numpy Generator or None, got {seed!r}"
        )
    return np.random.default_rng(seed)


def _count(value, what, low):
    """An integer count >= ``low`` (an integral float is accepted, a fraction is not)."""
    ok = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and float(value).is_integer())
    if not ok or int(value) < low:
        raise ArgumentError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _reals(values, what, count, low, strict=False):
    """``count`` finite floats, each >= ``low`` (> ``low`` with ``strict``)."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ArgumentError(f"{what} must be real numbers, got {values!r}") from None
    if len(out) != count:
        raise ArgumentError(f"got {len(out)} {what} for {count} factor(s)")
    for k, v in enumerate(out):
        if not np.isfinite(v) or v < low or (strict and v == low):
            rel = "" if low == -np.inf else f" and {'>' if strict else '>='} {low}"
            raise ArgumentError(f"{what}: value {k + 1} must be finite{rel}, got {v}")
    return out


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

    Raises
    ------
    ArgumentError
        For no factors, a count that is not an integer, a factor with fewer than 2 or at
        least ``n_obs`` levels, a negative or non-finite exponent, or a negative seed.

    Examples
    --------
    >>> codes = simulate_codes(1000, [50, 20], zipf=[1.0, 0.0], seed=1)
    >>> codes.shape, [int(c.max()) + 1 for c in codes]
    ((2, 1000), [50, 20])
    """
    rng = _rng(seed)
    n_obs = _count(n_obs, "n_obs", 1)
    n_levels = [_count(q, "a level count", 2) for q in n_levels]
    if not n_levels:
        raise ArgumentError("n_levels is empty: give the number of levels of each factor")
    zipf = [0.0] * len(n_levels) if zipf is None else _reals(zipf, "Zipf exponents",
                                                              len(n_levels), 0.0)
    for k, q in enumerate(n_levels):
        if q >= n_obs:
            raise ArgumentError(
                f"factor {k + 1}: {q} levels for {n_obs} observations; need 2 <= levels < n_obs"
            )
    try:
        codes = np.empty((len(n_levels), n_obs), dtype=np.int32)
    except ValueError:  # numpy's "array is too big", beyond any memory
        raise ArgumentError(f"n_obs = {n_obs} rows are too many to hold in memory") from None
    for k, (q, s) in enumerate(zip(n_levels, zipf)):
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

    Raises
    ------
    ArgumentError
        As :func:`simulate_codes`, and for variances that are negative or non-finite, a
        residual variance <= 0 or a non-finite intercept.

    Examples
    --------
    >>> df = simulate_crossed(500, [20, 8], zipf=[0.8, 1.0], seed=2)
    >>> list(df.columns), len(df)
    (['y', 'g1', 'g2'], 500)
    """
    rng = _rng(seed)
    K = len(n_levels)
    sigma2 = [1.0] * K if sigma2 is None else _reals(sigma2, "variances", K, 0.0)
    sigma2_e, = _reals([sigma2_e], "residual variances", 1, 0.0, strict=True)
    intercept, = _reals([intercept], "intercepts", 1, -np.inf)
    codes = simulate_codes(n_obs, n_levels, zipf, rng)
    y = np.full(codes.shape[1], intercept)
    for k in range(K):
        u = rng.normal(scale=np.sqrt(sigma2[k]), size=int(n_levels[k]))
        y += u[codes[k]]
    y += rng.normal(scale=np.sqrt(sigma2_e), size=codes.shape[1])
    cols = {"y": y}
    for k in range(K):
        cols[f"g{k + 1}"] = codes[k]
    return pd.DataFrame(cols)


#: The default covariance of a simulated ``(1 + x | g)`` term's (intercept, slope).
SLOPE_COVARIANCE = ((0.5, 0.1), (0.1, 0.2))


def simulate_slopes(n_obs, n_levels, slopes=None, zipf=None, sigma2=None, seed=None):
    """Simulate a random-slope model on a crossed design and return its terms.

    ``y = 1 + 0.5 x + sum_k (u_k[g_k] + v_k[g_k] x) + e`` with ``x ~ N(0, 1)``,
    ``e ~ N(0, 1)``: factor ``k`` is a ``(1 + x | g_k)`` term when ``slopes[k]`` (its
    ``(u, v)`` with covariance :data:`SLOPE_COVARIANCE`), else a ``(1 | g_k)`` term with
    variance ``sigma2[k]``.

    Parameters
    ----------
    n_obs : int
    n_levels : sequence of int
    slopes : sequence of bool, optional
        Default: a slope on the first factor only.
    zipf : sequence of float, optional
        Zipf exponents of the level frequencies (see :func:`simulate_codes`).
    sigma2 : sequence of float, optional
        Variances of the intercept-only terms (default 0.8).
    seed : int or numpy.random.Generator, optional

    Returns
    -------
    (list of RandomEffectsTerm, ndarray, ndarray)
        The terms (lme4's order is the caller's: here factor order), ``X = [1, x]`` and
        ``y``.

    Examples
    --------
    >>> terms, X, y = simulate_slopes(400, [20, 8], seed=1)
    >>> [t.dim for t in terms], X.shape, y.shape
    ([2, 1], (400, 2), (400,))
    """
    rng = _rng(seed)
    K = len(n_levels)
    slopes = [k == 0 for k in range(K)] if slopes is None else [bool(s) for s in slopes]
    if len(slopes) != K:
        raise ArgumentError(f"got {len(slopes)} slope flags for {K} factor(s)")
    sigma2 = [0.8] * K if sigma2 is None else _reals(sigma2, "variances", K, 0.0)
    codes = simulate_codes(n_obs, n_levels, zipf, rng).astype(np.int32)
    n = codes.shape[1]
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=n)
    L = np.linalg.cholesky(np.asarray(SLOPE_COVARIANCE))
    terms = []
    for k in range(K):
        q = int(n_levels[k])
        name = f"g{k + 1}"
        levels = pd.Index(np.arange(q), name=name)
        if slopes[k]:
            uv = rng.normal(size=(q, 2)) @ L.T
            y += uv[codes[k], 0] + uv[codes[k], 1] * x
            terms.append(RandomEffectsTerm(name, codes[k], levels, ("(Intercept)", "x"),
                                           np.column_stack([np.ones(n), x])))
        else:
            y += rng.normal(scale=np.sqrt(sigma2[k]), size=q)[codes[k]]
            terms.append(RandomEffectsTerm(name, codes[k], levels))
    return terms, np.column_stack([np.ones(n), x]), y
