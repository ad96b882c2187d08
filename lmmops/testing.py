"""Reusable checks of linear operators against dense oracles.

:class:`OperatorChecks` is a test mixin in the style of linear_operator's
``LinearOperatorTestCase``: a test class supplies :meth:`~OperatorChecks.create_operator`
and :meth:`~OperatorChecks.dense`, and inherits a set of ``test_*`` methods that pytest
(or unittest) collects. :func:`assert_operator_matches_dense` runs the core checks once,
outside any test class.

Only numpy is needed at import time; checks that do not apply (symmetry of an operator
not declared symmetric, ...) raise :class:`unittest.SkipTest`, which pytest reports as a
skip.
"""

import unittest

import numpy as np
from numpy.testing import assert_allclose
from scipy.sparse.linalg import LinearOperator, aslinearoperator

__all__ = ["OperatorChecks", "assert_operator_matches_dense"]

_DEFAULT_TOLERANCES = {
    "matvec": 1e-12,
    "matmat": 1e-12,
    "adjoint": 1e-12,
    "symmetric": 1e-12,
    "diagonal": 1e-12,
    "todense": 1e-12,
}


def _close(actual, expected, rtol, what):
    # relative to the size of the oracle, so that near-zero entries do not fail
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_operator_matches_dense(op, dense, rtol=1e-12, rng=None, n_cols=3):
    """Check an operator against its dense matrix.

    Checks ``op @ x`` for 1-d and ``(n, 1)`` inputs, ``op.matmat`` and ``op @ X`` for
    ``(n, n_cols)`` blocks, the adjoint (``op.H @ y``, ``op.rmatvec``, ``op.H.matmat``)
    and, when ``op`` has ``todense``, that it equals ``dense``.

    Parameters
    ----------
    op : LinearOperator
    dense : ndarray, shape op.shape
    rtol : float, optional
        Tolerance relative to ``max(1, max|expected|)``.
    rng : numpy.random.Generator or int, optional
        Source of the random test vectors.
    n_cols : int, optional
        Width of the block inputs.

    Raises
    ------
    AssertionError
        On the first mismatch.

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> A = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])
    >>> assert_operator_matches_dense(aslinearoperator(A), A, rng=0)
    """
    rng = np.random.default_rng(rng)
    dense = np.asarray(dense, dtype=np.float64)
    m, n = op.shape
    assert dense.shape == (m, n), f"op.shape {op.shape} != dense.shape {dense.shape}"
    x = rng.standard_normal(n)
    y = op @ x
    assert y.shape == (m,), f"op @ x has shape {y.shape}, expected ({m},)"
    _close(y, dense @ x, rtol, "op @ x (1-d)")
    _close(op.matvec(x), dense @ x, rtol, "op.matvec(x)")
    y1 = op @ x[:, None]
    assert y1.shape == (m, 1), f"op @ x[:, None] has shape {y1.shape}, expected ({m}, 1)"
    _close(y1, (dense @ x)[:, None], rtol, "op @ x (n, 1)")
    X = rng.standard_normal((n, n_cols))
    _close(op.matmat(X), dense @ X, rtol, "op.matmat(X)")
    _close(op @ X, dense @ X, rtol, "op @ X")
    _close(op.matmat(np.asfortranarray(X)), dense @ X, rtol, "op.matmat(X, Fortran order)")
    z = rng.standard_normal(m)
    _close(op.H @ z, dense.T @ z, rtol, "op.H @ z")
    _close(op.rmatvec(z), dense.T @ z, rtol, "op.rmatvec(z)")
    Zb = rng.standard_normal((m, n_cols))
    _close(op.H.matmat(Zb), dense.T @ Zb, rtol, "op.H.matmat(Z)")
    _close(op.rmatmat(Zb), dense.T @ Zb, rtol, "op.rmatmat(Z)")
    if hasattr(op, "todense"):
        _close(op.todense(), dense, rtol, "op.todense()")


class OperatorChecks:
    """Mixin of generic operator tests against a dense oracle.

    A concrete test class (named ``Test...``) inherits from this mixin and provides:

    - ``create_operator(self)`` returning the operator under test;
    - ``dense(self, op)`` returning its dense matrix, computed independently;
    - optionally ``symmetric = True``, ``positive_definite = True``, ``seed`` and a
      ``tolerances`` dict overriding entries of the defaults (keys ``matvec``,
      ``matmat``, ``adjoint``, ``symmetric``, ``diagonal``, ``todense``).

    Examples
    --------
    >>> from scipy.sparse.linalg import aslinearoperator
    >>> class CheckIdentity(OperatorChecks):
    ...     symmetric = True
    ...     positive_definite = True
    ...     def create_operator(self):
    ...         return aslinearoperator(np.eye(3))
    ...     def dense(self, op):
    ...         return np.eye(3)
    >>> CheckIdentity().test_matmat()
    >>> CheckIdentity().test_positive_definite()
    """

    symmetric = False
    positive_definite = False
    seed = 0
    n_cols = 3
    tolerances = {}

    # ------------------------------------------------------------------ supplied by tests
    def create_operator(self):
        """Return the operator under test."""
        raise NotImplementedError

    def dense(self, op):
        """Return the dense matrix of ``op``, computed without ``op``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _tol(self, key):
        return {**_DEFAULT_TOLERANCES, **self.tolerances}[key]

    def _rng(self):
        return np.random.default_rng(self.seed)

    def _pair(self):
        op = self.create_operator()
        dense = np.asarray(self.dense(op), dtype=np.float64)
        assert dense.shape == op.shape, f"op.shape {op.shape} != dense.shape {dense.shape}"
        return op, dense

    # ------------------------------------------------------------------ checks
    def test_is_linear_operator(self):
        op = self.create_operator()
        assert isinstance(op, LinearOperator)
        assert op.dtype == np.float64
        assert aslinearoperator(op) is op

    def test_matvec_1d(self):
        op, dense = self._pair()
        x = self._rng().standard_normal(op.shape[1])
        y = op @ x
        assert y.shape == (op.shape[0],)
        _close(y, dense @ x, self._tol("matvec"), "op @ x")
        _close(op.matvec(x), dense @ x, self._tol("matvec"), "op.matvec(x)")
        _close(op.dot(x), dense @ x, self._tol("matvec"), "op.dot(x)")

    def test_matvec_column(self):
        op, dense = self._pair()
        x = self._rng().standard_normal((op.shape[1], 1))
        y = op @ x
        assert y.shape == (op.shape[0], 1)
        _close(y, dense @ x, self._tol("matvec"), "op @ x[:, None]")
        _close(op.matvec(x), dense @ x, self._tol("matvec"), "op.matvec(x[:, None])")

    def test_matvec_integer_input(self):
        op, dense = self._pair()
        x = self._rng().integers(-3, 4, op.shape[1])
        _close(op @ x, dense @ x, self._tol("matvec"), "op @ integer x")

    def test_matmat(self):
        op, dense = self._pair()
        X = self._rng().standard_normal((op.shape[1], self.n_cols))
        expected = dense @ X
        _close(op.matmat(X), expected, self._tol("matmat"), "op.matmat(X)")
        _close(op @ X, expected, self._tol("matmat"), "op @ X")
        _close(op.matmat(np.asfortranarray(X)), expected, self._tol("matmat"), "Fortran X")
        cols = np.column_stack([op @ X[:, c] for c in range(X.shape[1])])
        _close(op.matmat(X), cols, self._tol("matmat"), "matmat vs column loop")

    def test_matmat_complex(self):
        op, dense = self._pair()
        rng = self._rng()
        X = rng.standard_normal((op.shape[1], 2)) + 1j * rng.standard_normal((op.shape[1], 2))
        _close(op.matmat(X), dense @ X, self._tol("matmat"), "op.matmat(complex X)")

    def test_adjoint(self):
        op, dense = self._pair()
        rng = self._rng()
        z = rng.standard_normal(op.shape[0])
        Z = rng.standard_normal((op.shape[0], self.n_cols))
        tol = self._tol("adjoint")
        assert op.H.shape == (op.shape[1], op.shape[0])
        _close(op.H @ z, dense.T @ z, tol, "op.H @ z")
        _close(op.rmatvec(z), dense.T @ z, tol, "op.rmatvec(z)")
        _close(op.H.matmat(Z), dense.T @ Z, tol, "op.H.matmat(Z)")
        _close(op.rmatmat(Z), dense.T @ Z, tol, "op.rmatmat(Z)")
        _close(op.T @ z, dense.T @ z, tol, "op.T @ z")
        x = rng.standard_normal(op.shape[1])
        lhs, rhs = z @ (op @ x), (op.H @ z) @ x
        assert abs(lhs - rhs) <= tol * max(1.0, abs(lhs)) * 10, "<z, A x> != <A' z, x>"

    def test_symmetric(self):
        if not self.symmetric:
            raise unittest.SkipTest("operator not declared symmetric")
        op, dense = self._pair()
        assert op.shape[0] == op.shape[1]
        _close(dense, dense.T, self._tol("symmetric"), "dense oracle symmetric")
        rng = self._rng()
        x, y = rng.standard_normal(op.shape[0]), rng.standard_normal(op.shape[0])
        a, b = y @ (op @ x), x @ (op @ y)
        assert abs(a - b) <= self._tol("symmetric") * max(1.0, abs(a)) * 10

    def test_diagonal(self):
        op = self.create_operator()
        if not hasattr(op, "diagonal"):
            raise unittest.SkipTest("operator has no diagonal()")
        dense = np.asarray(self.dense(op), dtype=np.float64)
        d = op.diagonal()
        assert d.shape == (min(op.shape),)
        _close(d, np.diagonal(dense), self._tol("diagonal"), "op.diagonal()")

    def test_positive_definite(self):
        if not self.positive_definite:
            raise unittest.SkipTest("operator not declared positive definite")
        op, dense = self._pair()
        X = self._rng().standard_normal((op.shape[1], 8))
        quad = np.einsum("ij,ij->j", X, op @ X)
        assert np.all(quad > 0), f"x'Ax not positive: {quad}"
        assert np.linalg.eigvalsh((dense + dense.T) / 2).min() > 0

    def test_todense(self):
        op = self.create_operator()
        if not hasattr(op, "todense"):
            raise unittest.SkipTest("operator has no todense()")
        dense = np.asarray(self.dense(op), dtype=np.float64)
        _close(op.todense(), dense, self._tol("todense"), "op.todense()")

    def test_aslinearoperator(self):
        op, dense = self._pair()
        wrapped = aslinearoperator(op)
        x = self._rng().standard_normal(op.shape[1])
        _close(wrapped @ x, dense @ x, self._tol("matvec"), "aslinearoperator(op) @ x")
        _close((2.0 * wrapped + wrapped) @ x, 3.0 * (dense @ x), self._tol("matvec"), "algebra")

    def test_matches_dense(self):
        op, dense = self._pair()
        assert_operator_matches_dense(
            op, dense, rtol=max(self._tol("matvec"), self._tol("adjoint")), rng=self.seed
        )
