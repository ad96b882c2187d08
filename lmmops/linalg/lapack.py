"""Thin LAPACK calls for the exact solvers' small dense blocks.

:func:`scipy.linalg.solve_triangular` and :func:`scipy.linalg.cho_solve` validate their
arguments and dispatch over batches on every call: about 30 microseconds each, more than
the solve itself on the blocks of a small data set (lme4's Penicillin or Pastes, where a
fit makes a hundred such calls). :func:`tri_solve` and :func:`chol_solve` make the same
LAPACK call (``trtrs``, ``potrs``) with the same arguments and memory layout as those
functions, so the result is the same to the last bit, without the checks: the inputs
must be finite float64 arrays of matching shapes (the solvers' own factors are).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.linalg import lapack as _lapack

from lmmops.errors import NumericalFailure

__all__ = ["chol_factor", "chol_inverse", "chol_solve", "mirror_triangle", "tri_solve"]

# the LAPACK routines are looked up at each call (scipy.linalg.lapack.dtrtrs, ...), so
# that a test's spy on them sees these calls too


@functools.lru_cache(maxsize=64)
def _upper_indices(m):
    """``np.triu_indices(m, 1)``, computed once per size (read-only)."""
    iu = np.triu_indices(m, 1)
    for a in iu:
        a.setflags(write=False)
    return iu


def tri_solve(a, b, lower=False, trans=0):
    """Solve the triangular system ``a x = b`` (``trans=1``: ``a' x = b``).

    The same LAPACK ``dtrtrs`` call as ``scipy.linalg.solve_triangular(a, b, trans=trans,
    lower=lower)`` (a C-ordered ``a`` is passed transposed, as scipy does), without its
    validation.

    Parameters
    ----------
    a : ndarray, shape (m, m), float64
        Triangular, finite.
    b : ndarray, shape (m,) or (m, k), float64
    lower : bool
        Whether ``a`` is lower triangular.
    trans : {0, 1}
        Solve with ``a`` (0) or its transpose (1).

    Returns
    -------
    ndarray
        Shaped as ``b``.

    Raises
    ------
    NumericalFailure
        If ``a`` has a zero on its diagonal.

    Examples
    --------
    >>> import scipy.linalg as sla
    >>> a = np.array([[2.0, 0.0], [1.0, 3.0]])
    >>> b = np.array([1.0, 2.0])
    >>> bool(np.array_equal(tri_solve(a, b, lower=True),
    ...                     sla.solve_triangular(a, b, lower=True)))
    True
    """
    if np.size(b) == 0:  # scipy's quick return
        return np.empty(np.shape(b))
    if a.flags.f_contiguous:
        x, info = _lapack.dtrtrs(a, b, lower=int(lower), trans=int(trans))
    else:
        x, info = _lapack.dtrtrs(a.T, b, lower=int(not lower), trans=int(not trans))
    if info != 0:
        raise NumericalFailure(f"triangular solve failed (LAPACK trtrs info {info})")
    return x


def chol_factor(a, lower=True):
    """The Cholesky factor of a symmetric positive definite ``a``.

    The same LAPACK ``dpotrf`` call as ``scipy.linalg.cholesky(a, lower=lower)`` (the
    other triangle zeroed), without its validation.

    Parameters
    ----------
    a : ndarray, shape (m, m), float64
        Finite; only the ``lower`` (or upper) triangle is read.
    lower : bool

    Returns
    -------
    ndarray, shape (m, m)

    Raises
    ------
    NumericalFailure
        If ``a`` is not numerically positive definite.

    Examples
    --------
    >>> import scipy.linalg as sla
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> bool(np.array_equal(chol_factor(A), sla.cholesky(A, lower=True)))
    True
    """
    if np.size(a) == 0:  # scipy's quick return
        return np.empty(np.shape(a))
    c, info = _lapack.dpotrf(a, lower=int(lower), overwrite_a=0, clean=1)
    if info != 0:
        raise NumericalFailure(f"the matrix is not positive definite (LAPACK potrf info "
                               f"{info})")
    return c


def chol_solve(c, b, lower=True):
    """Solve ``A x = b`` from the Cholesky factor ``c`` of ``A``.

    The same LAPACK ``dpotrs`` call as ``scipy.linalg.cho_solve((c, lower), b)``, without
    its validation.

    Parameters
    ----------
    c : ndarray, shape (m, m), float64
        The factor (lower triangle if ``lower``, else the upper one), finite.
    b : ndarray, shape (m,) or (m, k), float64
    lower : bool

    Returns
    -------
    ndarray
        Shaped as ``b``.

    Raises
    ------
    NumericalFailure
        If LAPACK reports an illegal argument.

    Examples
    --------
    >>> import scipy.linalg as sla
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> c = sla.cholesky(A, lower=True)
    >>> b = np.array([1.0, 2.0])
    >>> bool(np.array_equal(chol_solve(c, b), sla.cho_solve((c, True), b)))
    True
    """
    if np.size(b) == 0:  # scipy's quick return
        return np.empty(np.shape(b))
    x, info = _lapack.dpotrs(c, b, lower=int(lower))
    if info != 0:
        raise NumericalFailure(f"Cholesky solve failed (LAPACK potrs info {info})")
    return x


def chol_inverse(c, lower=True, full=True):
    """The inverse of ``A = c c'`` from its Cholesky factor.

    LAPACK ``dpotri``, which fills one triangle (``lower``'s); with ``full`` the other
    triangle is copied from it (:func:`mirror_triangle`).

    Parameters
    ----------
    c : ndarray, shape (m, m), float64
        The lower (``lower=True``) or upper Cholesky factor, finite; only that triangle
        is read.
    lower : bool
    full : bool, optional
        Fill both triangles (default); ``False`` leaves the other triangle as LAPACK
        leaves it (the factor's).

    Returns
    -------
    ndarray, shape (m, m)

    Raises
    ------
    NumericalFailure
        If ``c`` has a zero on its diagonal.

    Examples
    --------
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> c = np.linalg.cholesky(A)
    >>> bool(np.allclose(chol_inverse(c), np.linalg.inv(A)))
    True
    >>> half = chol_inverse(c, full=False)
    >>> bool(np.allclose(np.tril(half), np.tril(np.linalg.inv(A))))
    True
    """
    inv, info = _lapack.dpotri(c, lower=int(lower))
    if info != 0:
        raise NumericalFailure(f"could not invert the Cholesky factor (LAPACK potri info "
                               f"{info})")
    if full:
        mirror_triangle(inv, lower)
    return inv


def mirror_triangle(a, lower=True):
    """Copy the ``lower`` (or upper) triangle of the square ``a`` onto the other, in
    place.

    Parameters
    ----------
    a : ndarray, shape (m, m)
    lower : bool

    Returns
    -------
    ndarray
        ``a``.

    Examples
    --------
    >>> a = np.array([[1.0, 9.0], [2.0, 3.0]])
    >>> mirror_triangle(a).tolist()
    [[1.0, 2.0], [2.0, 3.0]]
    """
    iu = _upper_indices(a.shape[0])
    if lower:
        a[iu] = a.T[iu]
    else:
        a.T[iu] = a[iu]
    return a
