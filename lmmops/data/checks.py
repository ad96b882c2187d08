"""Checks of the method, the response and the prior weights, shared by every solver and operator.

Each raises an :class:`~lmmops.errors.ArgumentError` naming the problem (a non-finite or
complex response, one too large to square twice in float64, weights of the wrong length,
non-positive or misaligned with the data) before any arithmetic.
"""

import warnings

import numpy as np
import pandas as pd

from lmmops.errors import ArgumentError, DisconnectedDesignWarning, LmmopsError

__all__ = ["check_method", "check_response", "check_rows_free", "check_weights",
           "warn_if_disconnected"]


def check_method(method, n=None, p=None):
    """Validate an estimation method: ``"REML"`` or ``"ML"``, in any case.

    Parameters
    ----------
    method : str
    n, p : int, optional
        The numbers of observations and fixed effects: REML then also needs ``n > p``.

    Returns
    -------
    str
        ``"REML"`` or ``"ML"``.

    Raises
    ------
    LmmopsError
        For any other method, or REML with ``n <= p``.

    Examples
    --------
    >>> check_method("reml")
    'REML'
    """
    m = str(method).upper()
    if m not in ("REML", "ML"):
        raise LmmopsError(f"method must be 'REML' or 'ML', got {method!r}")
    if m == "REML" and n is not None and p is not None and n <= p:
        raise LmmopsError(f"REML needs more observations ({n}) than fixed effects ({p})")
    return m


def check_weights(weights, n, index=None):
    """Validate prior weights: ``n`` finite values > 0.

    The residual covariance is ``R = s^2 W^{-1}`` with ``W = diag(weights)``, lme4's
    ``weights=`` (precision weights, not frequencies).

    Parameters
    ----------
    weights : array_like or pandas.Series, shape (n_obs,)
    n : int
        Number of observations.
    index : pandas.Index, optional
        The data's row labels. A Series of weights is then aligned to them by label, as
        pandas aligns columns, and must have a weight for every row and no other labels;
        without ``index`` (or for an array) the weights are taken in row order.

    Returns
    -------
    ndarray of float64, shape (n_obs,)
        The weights in row order (aligned to ``index`` by label when it is given).

    Raises
    ------
    ArgumentError
        For a wrong length, a missing or non-finite value, a weight <= 0, or a Series
        whose index does not match ``index``.

    Examples
    --------
    >>> check_weights([1, 2.5, 0.5], 3)
    array([1. , 2.5, 0.5])
    >>> check_weights(pd.Series([2.0, 1.0], index=["b", "a"]), 2, index=pd.Index(["a", "b"]))
    array([1., 2.])
    >>> check_weights([1, 0, 2], 3)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.ArgumentError: weights must be > 0: 1 weight(s) are <= 0 (first at row 1)
    """
    if index is not None and isinstance(weights, pd.Series):
        weights = _align_to_index(weights, index, "weights")
    try:
        w = np.asarray(weights, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ArgumentError("weights must be numeric") from None
    if w.shape[0] != n:
        raise ArgumentError(f"weights has {w.shape[0]} values for {n} observations")
    bad = ~np.isfinite(w)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ArgumentError(f"weights must be finite: {rows.size} missing or non-finite "
                            f"weight(s) (first at row {rows[0]})")
    bad = w <= 0
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ArgumentError(f"weights must be > 0: {rows.size} weight(s) are <= 0 "
                            f"(first at row {rows[0]})")
    return w


def _align_to_index(series, index, what):
    """``series`` reordered to ``index``; its labels must be exactly those of ``index``."""
    if series.index.equals(index):
        return series.to_numpy()
    if not (series.index.is_unique and index.is_unique):
        raise ArgumentError(
            f"{what} is a Series whose index differs from the data's and has repeated "
            "labels, so it cannot be aligned to the rows; pass an array (row order) instead"
        )
    missing = index.difference(series.index, sort=False)
    extra = series.index.difference(index, sort=False)
    if len(missing) or len(extra):
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} row(s) of the data have no label in it "
                         f"(e.g. {missing[0]!r})")
        if len(extra):
            parts.append(f"{len(extra)} of its labels are not rows of the data "
                         f"(e.g. {extra[0]!r})")
        raise ArgumentError(
            f"{what} is a Series whose index does not match the data's: "
            f"{' and '.join(parts)}. Align it first, or pass an array (row order)"
        )
    return series.reindex(index).to_numpy()


#: Largest and smallest ``max |y|`` the fits accept: they square the response and its
#: variances (``s^4 ~ |y|^4``), which must stay inside float64's range with a margin.
_Y_MAX = float(np.finfo(np.float64).max) ** 0.25 / 100.0
_Y_MIN = float(np.finfo(np.float64).tiny) ** 0.25 * 100.0


def check_response(y, name=None):
    """Validate a response: real, finite, and of a scale whose squares float64 holds.

    Parameters
    ----------
    y : array_like, shape (n_obs,)
    name : str, optional
        The response's name, for messages.

    Returns
    -------
    ndarray of float64, shape (n_obs,)

    Raises
    ------
    ArgumentError
        For a complex or non-numeric response, a missing or non-finite value, or a
        response so large (``max |y|`` above about 1e75) or so small (non-zero but below
        about 1e-75) that its variance's square overflows or underflows float64.

    Examples
    --------
    >>> check_response([1.0, 2.5, -3.0])
    array([ 1. ,  2.5, -3. ])
    >>> check_response([1e200, 2e200])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.ArgumentError: the scale of the response overflows float64 when squared ...
    """
    what = f"the response '{name}'" if name else "the response"
    arr = np.asarray(y)
    if np.iscomplexobj(arr):
        raise ArgumentError(
            f"{what} is complex (dtype {arr.dtype}); a linear mixed model needs a real "
            "response: pass its real part or modulus explicitly if that is what is meant"
        )
    try:
        arr = np.ascontiguousarray(arr, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ArgumentError(f"{what} must be numeric") from None
    if not np.all(np.isfinite(arr)):
        raise ArgumentError(f"{what} has missing or non-finite values")
    big = float(np.max(np.abs(arr), initial=0.0))
    if big > _Y_MAX or 0.0 < big < _Y_MIN:
        how, op = ("overflows", "divide") if big > _Y_MAX else ("underflows", "multiply")
        exponent = abs(round(float(np.log10(big))))
        raise ArgumentError(
            f"the scale of {what} {how} float64 when squared: max |y| is {big:.3g}, and the fit "
            f"squares the response's variance (about |y|^4), which float64 holds "
            f"only for {_Y_MIN:.2g} <= max |y| <= {_Y_MAX:.2g}. Rescale it ({op} it by "
            f"1e{exponent}, say) and scale the variances back by the square of that factor"
        )
    return arr


def warn_if_disconnected(design, stacklevel=2):
    """Warn (:class:`~lmmops.errors.DisconnectedDesignWarning`) when the level graph of
    the crossed factors of ``design`` has more than one connected component.

    A factor nested in another (every level of it meets one level of a factor with
    fewer levels) is not crossed and is left out. ``design`` is any design with
    ``n_factors``, ``n_levels``, ``crosstab``, ``subset_factors``,
    ``connected_components`` and ``names`` (the in-memory
    :class:`~lmmops.data.design.CrossedDesign` or the Dask backend's level-space one).
    """
    d = design
    if d.n_factors < 2:
        return
    crossed = [k for k in range(d.n_factors)
               if not any(l != k and d.n_levels[l] < d.n_levels[k]
                          and np.all(np.diff(d.crosstab(k, l).indptr) == 1)
                          for l in range(d.n_factors))]
    if len(crossed) < 2:
        return
    sub = d.subset_factors(crossed) if len(crossed) < d.n_factors else d
    ncomp, _ = sub.connected_components()
    if ncomp > 1:
        warnings.warn(
            f"the design is disconnected: the level graph of the crossed factors "
            f"{', '.join(sub.names)} has {ncomp} connected components. REML and ML are "
            "still well defined, but the components share information only through the "
            "variance parameters; check that this is intended",
            DisconnectedDesignWarning, stacklevel=stacklevel + 1)


def check_rows_free(owner, stats, X, y, weights):
    """The inputs of an objective built without rows (a distributed backend's level-space
    statistics): ``stats`` given and none of ``X``, ``y``, ``weights`` (they are in the
    statistics)."""
    if stats is None or X is not None or y is not None or weights is not None:
        raise LmmopsError(f"{owner} without rows needs stats= and neither X, y nor weights "
                          "(they are in the statistics)")
