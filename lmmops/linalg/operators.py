"""Matrix-free operators of a crossed design, as scipy LinearOperators.

- :class:`RandomEffectsOperator`: the indicator ``Z_k`` (n x q_k) of one factor, or
  ``Z = [Z_1 ... Z_K]`` (n x q); its adjoint :class:`RandomEffectsAdjointOperator`.
- :class:`CovarianceOperator`: ``V = sigma2_e I + sum_k sigma2_k Z_k Z_k'`` (n x n).
- :class:`LevelSpaceOperator`: ``M = Z'Z + Lambda`` (q x q), the q-space form of V
  (:ref:`theory-level-space`), with :meth:`~LevelSpaceOperator.rhs`,
  :meth:`~LevelSpaceOperator.lift` and :meth:`~LevelSpaceOperator.logdet_V`.

Every operator follows scipy's contract: an explicit float64 dtype, ``_matvec`` and
``_matmat`` (a real block path) and ``_adjoint``, so ``scipy.sparse.linalg.cg(V, b)``
works unchanged. Inputs may be 1-d, ``(n, 1)`` or ``(n, m)``; complex inputs are applied
to their real and imaginary parts. The work is done by :mod:`lmmops.linalg.kernels`; this
module validates, allocates and picks the serial or parallel kernel
(``parallel=None`` means parallel when ``n_obs >= PARALLEL_MIN_ROWS`` and numba has more
than one thread). Dense forms (``todense``) are for tests and small problems only and are
guarded by :func:`lmmops.guard.check_dense`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from lmmops.data.checks import check_weights
from lmmops.data.statistics import cell_table, level_sums
from lmmops.errors import ArgumentError
from lmmops.guard import check_dense
from lmmops.linalg import kernels

__all__ = [
    "PARALLEL_MIN_ROWS",
    "CovarianceOperator",
    "GramOperator",
    "LevelSpaceOperator",
    "RandomEffectsAdjointOperator",
    "RandomEffectsOperator",
    "gram_arrays",
]

#: ``parallel=None`` uses the parallel kernels from this many observations on.
PARALLEL_MIN_ROWS = 200_000

#: Column blocks of a matmat are chosen so that the scatter scratch stays below this.
_WORK_LIMIT_BYTES = 64 * 2**20


def _resolve_parallel(parallel, n):
    if parallel is None:
        return n >= PARALLEL_MIN_ROWS and kernels.n_blocks(True) > 1
    return bool(parallel)


class _Workspace:
    """Scratch arrays reused across calls, keyed by shape.

    Kernels overwrite their scratch completely before reading it, and a numba call holds
    the GIL for its whole duration, so sharing the buffers between calls is safe.
    """

    def __init__(self):
        self._arrays = {}

    def get(self, shape):
        arr = self._arrays.get(shape)
        if arr is None:
            if len(self._arrays) > 8:
                self._arrays.clear()
            arr = self._arrays[shape] = np.empty(shape)
        return arr


def _check_factor_values(design, values, what, *, positive):
    """Validate per-factor values given as a sequence or a name -> value mapping."""
    names = list(design.names)
    K = len(names)
    if isinstance(values, Mapping):
        keys = [str(key) for key in values]
        unknown = [key for key in keys if key not in names]
        if unknown:
            raise ArgumentError(f"{what} names unknown factor(s) {unknown}; factors are {names}")
        missing = [nm for nm in names if nm not in keys]
        if missing:
            raise ArgumentError(
                f"{what} has no value for factor(s) {missing}; factors are {names}"
            )
        lookup = {str(key): val for key, val in values.items()}
        values = [lookup[nm] for nm in names]
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ArgumentError(f"{what} must be real numbers, got {values!r}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size != K:
        raise ArgumentError(
            f"{what} must have one value per factor: got {arr.size} value(s) for {K} "
            f"factor(s) {names}"
        )
    for k in range(K):
        v = arr[k]
        if not np.isfinite(v):
            raise ArgumentError(f"{what} must be finite; got {v} for factor '{names[k]}'")
        if positive and v <= 0:
            raise ArgumentError(f"{what} must be > 0; got {v} for factor '{names[k]}'")
        if not positive and v < 0:
            raise ArgumentError(f"{what} must be >= 0; got {v} for factor '{names[k]}'")
    arr.setflags(write=False)
    return arr


def _check_sigma2_e(sigma2_e):
    try:
        s2e = float(sigma2_e)
    except (TypeError, ValueError):
        raise ArgumentError(f"sigma2_e must be a real number, got {sigma2_e!r}") from None
    if not np.isfinite(s2e) or s2e <= 0:
        raise ArgumentError(f"sigma2_e must be finite and > 0, got {s2e}")
    return s2e


def _fmt(values):
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


class _SelfAdjoint:
    """Mixin of the symmetric operators: the adjoint and the transpose are the operator."""

    def _adjoint(self):
        return self

    _transpose = _adjoint


class _KernelOperator(LinearOperator):
    """Shared plumbing: input normalisation, column blocking and scratch space.

    Subclasses set ``_codes`` ((K, n) int32), ``_offsets`` ((K + 1,) int64) and implement
    ``_vec(x)`` for C-contiguous float64 1-d ``x`` and ``_mat(X)`` for C-contiguous
    float64 2-d ``X``, plus ``_scratch_cols_bytes`` (scratch bytes per column of X), and
    ``_dense()`` for :meth:`todense`, which checks the size first.
    """

    _scratch_per_col = 0  # q-space length of the scatter scratch, 0 if none

    def _setup(self, design, shape, parallel, workspace=None):
        super().__init__(dtype=np.float64, shape=shape)
        self.design = design
        self.parallel = _resolve_parallel(parallel, design.n_obs)
        self._ws = _Workspace() if workspace is None else workspace

    def _repr(self, name, size, *fields):
        """``name(size, factors={...}, fields..., parallel=...)``."""
        facs = dict(zip(self.design.names, self.design.n_levels))
        return f"{name}({size}, factors={facs}, {', '.join(fields)}, parallel={self.parallel})"

    def _kernel(self, name):
        return kernels.get_kernel(name, self.parallel)

    def _work(self, *tail):
        return self._ws.get((kernels.n_blocks(self.parallel), *tail))

    def todense(self):
        """This operator as a dense array (tests and small problems only).

        Returns
        -------
        ndarray of float64, of the operator's shape

        Raises
        ------
        DenseTooLargeError
            If the array would exceed the dense size limit.
        """
        check_dense(self.shape, f"{type(self).__name__}.todense()")
        return self._dense()

    def _matvec(self, x):
        x = np.asarray(x)
        if np.iscomplexobj(x):
            return self._matvec(x.real) + 1j * self._matvec(x.imag)
        return self._vec(np.ascontiguousarray(x.reshape(-1), dtype=np.float64))

    def _matmat(self, X):
        X = np.asarray(X)
        if np.iscomplexobj(X):
            return self._matmat(X.real) + 1j * self._matmat(X.imag)
        m = X.shape[1]
        if m == 1:
            return self._vec(np.ascontiguousarray(X[:, 0], dtype=np.float64))[:, None]
        width = m
        if self._scratch_per_col:
            per_col = kernels.n_blocks(self.parallel) * self._scratch_per_col * 8
            width = max(1, min(m, _WORK_LIMIT_BYTES // per_col))
        if width >= m:
            return self._mat(np.ascontiguousarray(X, dtype=np.float64))
        out = np.empty((self.shape[0], m))
        for c0 in range(0, m, width):
            c1 = min(m, c0 + width)
            out[:, c0:c1] = self._mat(np.ascontiguousarray(X[:, c0:c1], dtype=np.float64))
        return out

    # Z u, Z' v on all of this operator's factors (helpers for the subclasses)
    def _gather(self, u):
        if u.ndim == 1:
            out = np.empty(self._codes.shape[1])
            self._kernel("gather")(self._codes, self._offsets, u, out)
        else:
            out = np.empty((self._codes.shape[1], u.shape[1]))
            self._kernel("gather_block")(self._codes, self._offsets, u, out)
        return out

    def _axpy_gather(self, x, a, u, c):
        """``a x + c Z u`` in one pass (x: (n,) or (n, m), u matching)."""
        if u.ndim == 2 and u.shape[1] == 1:
            return self._axpy_gather(x[:, 0], a, u[:, 0], c)[:, None]
        out = np.empty(x.shape)
        name = "axpy_gather" if u.ndim == 1 else "axpy_gather_block"
        self._kernel(name)(self._codes, self._offsets, np.ascontiguousarray(x), float(a),
                           np.ascontiguousarray(u), float(c), out)
        return out

    def _scatter(self, v):
        q = int(self._offsets[-1])
        if v.ndim == 2 and v.shape[1] == 1:
            return self._scatter(np.ascontiguousarray(v[:, 0]))[:, None]
        if v.ndim == 1:
            out = np.empty(q)
            self._kernel("scatter")(self._codes, self._offsets, v, self._work(q), out)
        else:
            m = v.shape[1]
            out = np.empty((q, m))
            self._kernel("scatter_block")(self._codes, self._offsets, v, self._work(q, m), out)
        return out


# ---------------------------------------------------------------------------------- Z_k
class RandomEffectsOperator(_KernelOperator):
    """The indicator matrix ``Z_k`` of one grouping factor, as a LinearOperator.

    Parameters
    ----------
    design : CrossedDesign
    k : int or str or None
        The factor (position or name). ``None`` gives all factors,
        ``Z = [Z_1 ... Z_K]`` of shape (n_obs, q).
    parallel : bool or None, optional
        Use the parallel kernels; ``None`` (default) decides from the size.

    Attributes
    ----------
    design : CrossedDesign
    k : int or None
    parallel : bool

    Notes
    -----
    ``(Z_k u)_i = u[c_k(i)]`` (a gather) and ``(Z_k' v)_j = sum_{i: c_k(i) = j} v_i``
    (a scatter), where ``c_k(i)`` is the level of observation i. The adjoint
    ``Z_k'`` is a :class:`RandomEffectsAdjointOperator`.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> Z = RandomEffectsOperator(d, "a")
    >>> Z.shape
    (5, 3)
    >>> Z @ np.array([10.0, 20.0, 30.0])
    array([10., 10., 20., 20., 30.])
    >>> Z.H @ np.ones(5)
    array([2., 2., 1.])
    >>> np.allclose(Z.todense(), d.indicator("a").toarray())
    True
    """

    def __init__(self, design, k, parallel=None, *, _workspace=None):
        if k is None:
            self.k = None
            self._codes = design.codes
            self._offsets = design.offsets
        else:
            self.k = design.index(k)
            if not 0 <= self.k < design.n_factors:
                raise ArgumentError(
                    f"factor index {k} out of range for {design.n_factors} factor(s)"
                )
            self._codes = design.codes[self.k : self.k + 1]
            self._offsets = np.array([0, design.n_levels[self.k]], dtype=np.int64)
        q = int(self._offsets[-1])
        self._setup(design, (design.n_obs, q), parallel, _workspace)

    def _vec(self, u):
        return self._gather(u)

    def _mat(self, U):
        return self._gather(U)

    def _adjoint(self):
        return RandomEffectsAdjointOperator(self)

    _transpose = _adjoint

    def _dense(self):
        # dense Z_k, (n_obs, q_k), for todense() (which checks the size first)
        if self.k is None:
            return self.design.indicator_all().toarray()
        return self.design.indicator(self.k).toarray()

    def __repr__(self):
        which = "all" if self.k is None else repr(self.design.names[self.k])
        return (
            f"RandomEffectsOperator(shape={self.shape}, factor={which}, parallel={self.parallel})"
        )


class RandomEffectsAdjointOperator(_KernelOperator):
    """The transpose ``Z_k'`` of a :class:`RandomEffectsOperator` (a scatter).

    Parameters
    ----------
    Z : RandomEffectsOperator

    Notes
    -----
    ``(Z_k' v)_j = sum_{i: c_k(i) = j} v_i``. In parallel the scatter uses private
    per-thread bins summed afterwards, so it is race-free.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> Zt = RandomEffectsOperator(d, "b").H
    >>> Zt @ np.arange(5.0)
    array([2., 8.])
    """

    def __init__(self, Z):
        self._parent = Z
        self._codes = Z._codes
        self._offsets = Z._offsets
        self.k = Z.k
        self._scratch_per_col = Z.shape[1]
        self._setup(Z.design, (Z.shape[1], Z.shape[0]), Z.parallel, Z._ws)

    def _vec(self, v):
        return self._scatter(v)

    def _mat(self, V):
        return self._scatter(V)

    def _adjoint(self):
        return self._parent

    _transpose = _adjoint

    def _dense(self):
        # dense Z_k', (q_k, n_obs)
        return self._parent._dense().T

    def __repr__(self):
        return f"{self._parent!r}.H"


# ---------------------------------------------------------------------------------- V
class CovarianceOperator(_SelfAdjoint, _KernelOperator):
    """The marginal covariance ``V`` of a crossed random-intercepts model.

    Parameters
    ----------
    design : CrossedDesign
    sigma2_e : float
        Residual variance, finite and > 0.
    sigma2 : sequence of float or dict
        Variance of each factor's random effects (length K, or a mapping from factor
        name to value), finite and >= 0.
    parallel : bool or None, optional
        Use the parallel kernels; ``None`` (default) means parallel when
        ``n_obs >= PARALLEL_MIN_ROWS`` and numba has more than one thread.

    Attributes
    ----------
    design : CrossedDesign
    sigma2_e : float
    sigma2 : ndarray of float64, shape (K,), read-only
    parallel : bool

    Raises
    ------
    ArgumentError
        For a non-finite or non-positive ``sigma2_e``, or ``sigma2`` of the wrong length,
        with unknown or missing names, non-finite or negative entries.

    Notes
    -----
    ``V = sigma2_e I_n + sum_k sigma2_k Z_k Z_k'`` (:ref:`theory-model`). A product
    ``V x`` costs two passes over the rows: first the level sums ``Z_k' x`` of all K
    factors, then ``(V x)_i = sigma2_e x_i + sum_k sigma2_k (Z_k' x)[c_k(i)]``.
    V is symmetric positive definite, so ``_adjoint`` returns ``self``. Its diagonal
    is the constant ``sigma2_e + sum_k sigma2_k``.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> V = CovarianceOperator(d, 1.0, {"a": 0.5, "b": 2.0})
    >>> V
    CovarianceOperator(n_obs=5, factors={'a': 3, 'b': 2}, sigma2_e=1, sigma2=[0.5, 2], ...)
    >>> x = np.arange(5.0)
    >>> np.allclose(V @ x, V.todense() @ x)
    True
    >>> V.diagonal()[:2]
    array([3.5, 3.5])
    >>> from scipy.sparse.linalg import cg
    >>> sol, info = cg(V, np.ones(5), rtol=1e-10)
    >>> info, np.allclose(V @ sol, np.ones(5))
    (0, True)
    """

    def __init__(self, design, sigma2_e, sigma2, parallel=None, *, _workspace=None):
        self.sigma2_e = _check_sigma2_e(sigma2_e)
        self.sigma2 = _check_factor_values(design, sigma2, "sigma2", positive=False)
        self._codes = design.codes
        self._offsets = design.offsets
        self._scratch_per_col = design.q
        self._setup(design, (design.n_obs, design.n_obs), parallel, _workspace)

    def _vec(self, x):
        out = np.empty(self.shape[0])
        self._kernel("cov_matvec")(
            self._codes,
            self._offsets,
            x,
            self.sigma2_e,
            self.sigma2,
            self._work(self.design.q),
            out,
        )
        return out

    def _mat(self, X):
        m = X.shape[1]
        out = np.empty((self.shape[0], m))
        self._kernel("cov_matmat")(
            self._codes,
            self._offsets,
            X,
            self.sigma2_e,
            self.sigma2,
            self._work(self.design.q, m),
            out,
        )
        return out

    def diagonal(self):
        """Diagonal of V.

        Returns
        -------
        ndarray of float64, shape (n_obs,)
            Every entry is ``sigma2_e + sum_k sigma2_k``.
        """
        return np.full(self.shape[0], self.sigma2_e + float(np.sum(self.sigma2)))

    def _dense(self):
        # dense V, (n_obs, n_obs)
        n = self.shape[0]
        dense = self.sigma2_e * np.eye(n)
        for k in range(self.design.n_factors):
            if self.sigma2[k] != 0.0:
                Zk = self.design.indicator(k)
                dense += self.sigma2[k] * (Zk @ Zk.T).toarray()
        return dense

    def with_variances(self, sigma2_e, sigma2):
        """Return V for other variances, sharing the design and scratch space.

        Parameters
        ----------
        sigma2_e : float
        sigma2 : sequence of float or dict

        Returns
        -------
        CovarianceOperator
        """
        return CovarianceOperator(
            self.design, sigma2_e, sigma2, parallel=self.parallel, _workspace=self._ws
        )

    def factor(self, k):
        """Return ``Z_k`` of factor ``k`` as a :class:`RandomEffectsOperator`.

        Parameters
        ----------
        k : int or str or None
            ``None`` gives ``Z = [Z_1 ... Z_K]``.

        Returns
        -------
        RandomEffectsOperator
        """
        return RandomEffectsOperator(self.design, k, parallel=self.parallel, _workspace=self._ws)

    def level_space(self):
        """Return the level-space operator ``M = Z'Z + Lambda`` of this V.

        Returns
        -------
        LevelSpaceOperator
            With ``lambda_k = sigma2_e / sigma2_k``.

        Raises
        ------
        ArgumentError
            If some ``sigma2_k`` is 0 (its ``lambda_k`` would be infinite; drop the
            factor with ``design.subset_factors`` instead).
        """
        zero = [self.design.names[k] for k in np.flatnonzero(self.sigma2 == 0.0)]
        if zero:
            raise ArgumentError(
                f"level_space() needs every sigma2_k > 0, but sigma2 is 0 for factor(s) "
                f"{zero}; drop them with design.subset_factors(...) first"
            )
        return LevelSpaceOperator(
            self.design,
            self.sigma2_e / self.sigma2,
            self.sigma2_e,
            parallel=self.parallel,
            _workspace=self._ws,
        )

    def __repr__(self):
        return self._repr("CovarianceOperator", f"n_obs={self.shape[0]}",
                          f"sigma2_e={self.sigma2_e:.6g}", f"sigma2={_fmt(self.sigma2)}")


# ---------------------------------------------------------------------------------- M
class LevelSpaceOperator(_SelfAdjoint, _KernelOperator):
    """The level-space matrix ``M = Z'Z + Lambda`` (q x q), applied matrix-free.

    Parameters
    ----------
    design : CrossedDesign
    lambdas : sequence of float or dict
        ``lambda_k = sigma2_e / sigma2_k`` for each factor, finite and > 0.
    sigma2_e : float, optional
        Residual variance, used by :meth:`lift`, :meth:`logdet_V` and :attr:`sigma2`.
    parallel : bool or None, optional
        Use the parallel kernels; ``None`` (default) decides from the size.

    Attributes
    ----------
    design : CrossedDesign
    lambdas : ndarray of float64, shape (K,), read-only
    sigma2_e : float
    parallel : bool

    Notes
    -----
    With ``Lambda = blkdiag(lambda_k I_{q_k})`` (:ref:`theory-level-space`), ``M`` is
    ``sigma2_e`` times the random-effects block of Henderson's mixed-model equations, and

    - ``V^{-1} b = sigma2_e^{-1} (b - Z M^{-1} Z' b)``, i.e.
      ``V^{-1} b = lift(M^{-1} rhs(b), b)``;
    - ``log|V| = n log sigma2_e + sum_k q_k log(sigma2_k / sigma2_e) + log|M|``.

    ``M u`` takes one pass over the rows: ``w = Z u`` on a chunk of rows, then
    ``Z' w`` into the level bins, plus ``Lambda u``. ``Z'Z`` itself is never formed.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> V = CovarianceOperator(d, 1.0, [0.5, 2.0])
    >>> M = V.level_space()
    >>> M.lambdas
    array([2. , 0.5])
    >>> dense_M = d.gram().toarray() + np.diag([2.0, 2.0, 2.0, 0.5, 0.5])
    >>> np.allclose(M.todense(), dense_M)
    True
    >>> b = np.arange(5.0)
    >>> x = M.lift(np.linalg.solve(dense_M, M.rhs(b)), b)
    >>> np.allclose(V @ x, b)
    True
    >>> sign, logdet_M = np.linalg.slogdet(dense_M)
    >>> bool(np.isclose(M.logdet_V(logdet_M), np.linalg.slogdet(V.todense())[1]))
    True
    """

    def __init__(self, design, lambdas, sigma2_e=1.0, parallel=None, *, _workspace=None):
        self.lambdas = _check_factor_values(design, lambdas, "lambdas", positive=True)
        self.sigma2_e = _check_sigma2_e(sigma2_e)
        self._codes = design.codes
        self._offsets = design.offsets
        self._scratch_per_col = design.q
        self._setup(design, (design.q, design.q), parallel, _workspace)

    @property
    def sigma2(self):
        """ndarray of float64, shape (K,): ``sigma2_k = sigma2_e / lambda_k``."""
        return self.sigma2_e / self.lambdas

    def _vec(self, u):
        q = self.shape[0]
        out = np.empty(q)
        self._kernel("level_matvec")(
            self._codes, self._offsets, u, self.lambdas, self._work(q), out
        )
        return out

    def _mat(self, U):
        q, m = U.shape
        out = np.empty((q, m))
        self._kernel("level_matmat")(
            self._codes, self._offsets, U, self.lambdas, self._work(q, m), out
        )
        return out

    def _lambda_diag(self):
        return np.repeat(self.lambdas, self.design.n_levels)

    def diagonal(self):
        """Diagonal of M: the level counts plus ``lambda_k``.

        Returns
        -------
        ndarray of float64, shape (q,)
        """
        counts = np.concatenate([self.design.counts(k) for k in range(self.design.n_factors)])
        return counts.astype(np.float64) + self._lambda_diag()

    def _dense(self):
        # dense M, (q, q)
        q = self.shape[0]
        dense = self.design.gram().toarray()
        dense[np.diag_indices(q)] += self._lambda_diag()
        return dense

    def rhs(self, b):
        """Right-hand side ``Z' b`` of the level-space system.

        Parameters
        ----------
        b : array_like, shape (n_obs,) or (n_obs, m)

        Returns
        -------
        ndarray of float64, shape (q,) or (q, m)
        """
        b = self._as_rows(b, self.design.n_obs, "b")
        return self._scatter(b)

    def lift(self, u, b):
        """Map a level-space solution back: ``sigma2_e^{-1} (b - Z u)``.

        With ``u = M^{-1} rhs(b)`` this is ``V^{-1} b``.

        Parameters
        ----------
        u : array_like, shape (q,) or (q, m)
        b : array_like, shape (n_obs,) or (n_obs, m)

        Returns
        -------
        ndarray of float64, shape of ``b``
        """
        u = self._as_rows(u, self.shape[0], "u")
        b = np.asarray(b, dtype=np.float64)
        if b.shape[0] != self.design.n_obs or b.ndim != u.ndim:
            raise ArgumentError(
                f"b has shape {b.shape}, expected ({self.design.n_obs},) or "
                f"({self.design.n_obs}, m) matching u of shape {u.shape}"
            )
        return self._axpy_gather(b, 1.0 / self.sigma2_e, u, -1.0 / self.sigma2_e)

    def logdet_V(self, logdet_M):
        """``log|V|`` from ``log|M|`` by the matrix determinant lemma.

        Parameters
        ----------
        logdet_M : float
            ``log det M``, exact or estimated.

        Returns
        -------
        float
            ``n log sigma2_e + sum_k q_k log(sigma2_k / sigma2_e) + log|M|``, where
            ``sigma2_k / sigma2_e = 1 / lambda_k``.
        """
        n = self.design.n_obs
        q = np.asarray(self.design.n_levels, dtype=np.float64)
        return float(n * np.log(self.sigma2_e) - np.dot(q, np.log(self.lambdas)) + float(logdet_M))

    @staticmethod
    def _as_rows(a, rows, what):
        a = np.asarray(a, dtype=np.float64)
        if a.ndim not in (1, 2) or a.shape[0] != rows:
            raise ArgumentError(f"{what} has shape {a.shape}, expected ({rows},) or ({rows}, m)")
        return np.ascontiguousarray(a)

    def __repr__(self):
        return self._repr("LevelSpaceOperator", f"q={self.shape[0]}",
                          f"lambdas={_fmt(self.lambdas)}", f"sigma2_e={self.sigma2_e:.6g}")


def gram_arrays(D, N):
    """The level-space Gram matrix ``Z'WZ`` (both triangles) from its blocks, written
    straight into its final CSR arrays.

    The same matrix as :func:`lmmops.data.statistics.assemble_gram` (sorted indices, no
    duplicates, every diagonal entry stored), without its intermediates: ``bmat`` goes
    through a COO copy of all ``2c + q`` entries and a transposed copy of each cell
    table, about 57 bytes per cell at its peak, where this allocates the result
    (``24 c + 20 q`` bytes: int64 row pointers, int32 column indices, float64 values)
    and ``8 q`` bytes of work (:func:`lmmops.linalg.kernels.csr_append`).

    Parameters
    ----------
    D : sequence of ndarray, shape (q_k,)
        ``diag(Z_k'WZ_k)``.
    N : dict
        ``{(k, l): Z_k'WZ_l}`` for ``k < l`` (CSR with sorted indices).

    Returns
    -------
    indptr : ndarray of int64, shape (q + 1,)
    indices : ndarray of int32, shape (nnz,)
    data : ndarray of float64, shape (nnz,)

    Examples
    --------
    >>> N = {(0, 1): sp.csr_matrix([[2.0], [1.0]])}
    >>> arrays = gram_arrays([np.array([2.0, 1.0]), np.array([3.0])], N)
    >>> sp.csr_matrix(arrays[::-1], shape=(3, 3)).toarray()
    array([[2., 0., 2.],
           [0., 1., 1.],
           [2., 1., 3.]])
    """
    D = [np.asarray(d, dtype=np.float64) for d in D]
    K = len(D)
    sizes = [d.size for d in D]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    q = int(off[-1])
    blocks = {}
    for k in range(K):
        for l in range(k + 1, K):
            m = N[(k, l)]
            if not (sp.issparse(m) and m.format == "csr"):
                m = sp.csr_matrix(m)
            if not m.has_sorted_indices:
                m = m.sorted_indices()
            blocks[(k, l)] = m
    counts = np.ones(q, dtype=np.int64)  # the diagonal
    for (k, l), m in blocks.items():
        counts[off[k]:off[k + 1]] += np.diff(m.indptr)
        counts[off[l]:off[l + 1]] += np.bincount(m.indices, minlength=sizes[l])
    indptr = np.empty(q + 1, dtype=np.int64)
    indptr[0] = 0
    np.cumsum(counts, out=indptr[1:])
    del counts
    nnz = int(indptr[-1])
    if q >= 2**31:
        raise ArgumentError(f"{q} levels: more than int32 column indices address")
    indices = np.empty(nnz, dtype=np.int32)
    data = np.empty(nnz, dtype=np.float64)
    fill = indptr[:-1].copy()
    # column blocks in increasing order, so every row is filled in sorted order
    for b in range(K):
        for k in range(K):
            if b < k:  # Z_k'WZ_b = (Z_b'WZ_k)': rows of block k from the columns of N
                m = blocks[(b, k)]
                kernels.csr_append(m.indptr, m.indices, m.data, off[k], off[b], True, fill,
                                   indices, data)
            elif b == k:
                rows = fill[off[k]:off[k + 1]]
                indices[rows] = np.arange(off[k], off[k + 1], dtype=np.int32)
                data[rows] = D[k]
                rows += 1
            else:
                m = blocks[(k, b)]
                kernels.csr_append(m.indptr, m.indices, m.data, off[k], off[b], False, fill,
                                   indices, data)
    return indptr, indices, data


class GramOperator(_SelfAdjoint, LinearOperator):
    """``Z'Z`` (q x q) applied through its sparse form, one pass over the non-empty cells.

    ``Z'Z`` does not depend on the variances; it is built once per design
    (:meth:`~lmmops.data.design.CrossedDesign.gram`, ``nnz <= q + K(K-1) * cells``) and applied by
    a row-parallel CSR kernel, race-free because each row of the result has one writer.
    For level-space blocks of many columns this is cheaper than the two passes over the
    ``n`` rows that :class:`LevelSpaceOperator` makes, since cells are at most rows and the
    gathered rows of the block are contiguous.

    Parameters
    ----------
    design : CrossedDesign
    parallel : bool or None, optional
        Use the parallel kernel; ``None`` decides from the number of non-zeros.
    weights : ndarray, shape (n_obs,), optional
        Prior weights, finite and > 0 (:func:`lmmops.data.checks.check_weights`): the operator
        is then ``Z'WZ``.
    stats : SufficientStatistics, optional
        The level-space statistics of the rows
        (:class:`~lmmops.data.statistics.SufficientStatistics`, e.g. combined from
        partitions): the operator is their ``Z'WZ`` and neither the rows nor ``weights``
        are read.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
    >>> G = GramOperator(d)
    >>> bool(np.allclose(G.todense(), d.gram().toarray()))
    True
    >>> U = np.arange(10.0).reshape(5, 2)
    >>> bool(np.allclose(G @ U, d.gram() @ U))
    True
    """

    def __init__(self, design, parallel=None, weights=None, *, stats=None,
                 _keep_cache=False):
        q = design.q
        super().__init__(dtype=np.float64, shape=(q, q))
        if stats is not None:  # the one pass already made (SufficientStatistics)
            if tuple(stats.n_levels) != tuple(design.n_levels):
                raise ArgumentError(f"statistics on levels {stats.n_levels} for a design "
                                    f"with levels {tuple(design.n_levels)}")
            A = gram_arrays(stats.D, stats.N)
        elif weights is None:
            A = design.gram().tocsr()
            if not _keep_cache:  # the arrays below are then the only copy kept
                design._cache.pop(("gram",), None)
        else:
            w = np.asarray(weights)
            if w.ndim != 1:
                raise ArgumentError(f"weights must have shape ({design.n_obs},), got {w.shape}")
            w = check_weights(w, design.n_obs)
            c, K = design.codes, design.n_factors
            A = gram_arrays(
                [level_sums(c[k], design.n_levels[k], w) for k in range(K)],
                {(k, l): cell_table(c[k], c[l], design.n_levels[k], design.n_levels[l], w)
                 for k in range(K) for l in range(k + 1, K)})
        if isinstance(A, tuple):  # gram_arrays: sorted, in the kernels' dtypes
            self._indptr, self._indices, self._data = A
        else:
            A.sort_indices()
            # no copies where the dtypes already fit (the design's cached Z'Z shares them)
            self._indptr = np.asarray(A.indptr, dtype=np.int64)
            self._indices = np.asarray(A.indices, dtype=np.int32)
            self._data = np.asarray(A.data, dtype=np.float64)
        del A
        self.design = design
        self.nnz = int(self._indptr[-1])
        self.parallel = _resolve_parallel(parallel, self.nnz)
        # scipy's view of the same arrays (no copy): its csr_matvec is 1.5x faster than
        # the serial block kernel on one column (1.7 ms against 2.5 ms at 1.4e6 nnz)
        self._csr = sp.csr_matrix((self._data, self._indices, self._indptr),
                                  shape=(q, q), copy=False)

    def _mat(self, X):
        X = np.asarray(X)
        if np.iscomplexobj(X):  # real kernel: apply to both parts
            return self._mat(X.real) + 1j * self._mat(X.imag)
        X = np.ascontiguousarray(X, dtype=np.float64)
        if X.shape[1] == 1 and not self.parallel:
            return (self._csr @ X[:, 0])[:, None]
        out = np.empty((self.shape[0], X.shape[1]))
        kernels.get_csr_matmat(self.parallel)(
            self._indptr, self._indices, self._data, X, out)
        return out

    def _matvec(self, x):
        return self._mat(np.asarray(x, dtype=np.float64).reshape(-1, 1))[:, 0]

    def _matmat(self, X):
        return self._mat(X)

    def sandwich(self, lam, U):
        """``lam * (Z'Z (lam * U)) + U`` for a (q, m) block and a q-vector ``lam``: the
        spherical product ``(Lambda Z'Z Lambda + I) U`` in one pass over the cells, with
        no (q, m) temporary (the same numbers as the three steps).

        Examples
        --------
        >>> from lmmops.data.design import CrossedDesign
        >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
        >>> G, lam = GramOperator(d), np.array([0.5, 0.5, 0.5, 2.0, 2.0])
        >>> U = np.arange(10.0).reshape(5, 2)
        >>> bool(np.array_equal(G.sandwich(lam, U),
        ...                     lam[:, None] * (G @ (lam[:, None] * U)) + U))
        True
        """
        U = np.ascontiguousarray(U, dtype=np.float64)
        lam = np.ascontiguousarray(lam, dtype=np.float64)
        if U.ndim != 2 or U.shape[0] != self.shape[0] or lam.shape != (self.shape[0],):
            raise ArgumentError(f"sandwich of a ({self.shape[0]}, m) block with a "
                                f"({self.shape[0]},) scaling, got {U.shape} and {lam.shape}")
        out = np.empty_like(U)
        kernel = kernels.csr_sandwich_parallel if self.parallel else \
            kernels.csr_sandwich_serial
        kernel(self._indptr, self._indices, self._data, lam, U, out)
        return out

    def offdiag_square_rows(self, a):
        """``s_i = sum_{j != i} (Z'Z)_ij^2 a_j`` for a q-vector ``a``: from the Gram's own
        arrays, what the squared cross-tabulations give (``a's`` is
        ``2 sum_{k<l} a_k' (N_kl o N_kl) a_l``), with no copy of them.

        Examples
        --------
        >>> from lmmops.data.design import CrossedDesign
        >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
        >>> G = GramOperator(d)
        >>> A = d.gram().toarray()
        >>> a = np.arange(1.0, 6.0)
        >>> bool(np.allclose(G.offdiag_square_rows(a), (A**2 - np.diag(np.diag(A)**2)) @ a))
        True
        """
        a = np.ascontiguousarray(a, dtype=np.float64)
        if a.shape != (self.shape[0],):
            raise ArgumentError(f"a must have shape ({self.shape[0]},), got {a.shape}")
        out = np.empty(self.shape[0])
        kernel = kernels.offdiag_square_rows_parallel if self.parallel else \
            kernels.offdiag_square_rows_serial
        kernel(self._indptr, self._indices, self._data, a, out)
        return out

    def todense(self):
        """Dense ``Z'Z`` (tests and small problems only; size-guarded).

        Returns
        -------
        ndarray, shape (q, q)
        """
        check_dense(self.shape, "GramOperator.todense()")
        return sp.csr_matrix((self._data, self._indices, self._indptr), shape=self.shape).toarray()

    def __repr__(self):
        return f"GramOperator(q={self.shape[0]}, nnz={self.nnz}, parallel={self.parallel})"


class SparseLevelOperator(_SelfAdjoint, LinearOperator):
    """``M = Z'Z + Lambda`` applied through the sparse ``Z'Z`` (``design.gram()``).

    The same matrix as :class:`~lmmops.linalg.operators.LevelSpaceOperator`, but a product costs
    ``O(nnz(Z'Z))`` (non-empty cells) instead of a pass over the ``n`` rows; ``Z'Z`` is
    built once per design (cached by the design) and does not depend on the variances.
    It is applied by :class:`GramOperator` (the one sparse ``Z'Z`` product), plus the
    diagonal ``Lambda``.

    Parameters
    ----------
    M : LevelSpaceOperator

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.linalg.operators import LevelSpaceOperator
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
    >>> M = LevelSpaceOperator(d, [2.0, 0.5])
    >>> bool(np.allclose(SparseLevelOperator(M) @ np.ones(5), M @ np.ones(5)))
    True
    """

    def __init__(self, M):
        super().__init__(dtype=np.float64, shape=M.shape)
        self.args = (M,)
        # the design keeps its cached Z'Z: the preconditioners and later operators reuse it
        self._G = GramOperator(M.design, _keep_cache=True)
        self._d = np.repeat(np.asarray(M.lambdas, dtype=np.float64), M.design.n_levels)

    def _matvec(self, x):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return self._G._matvec(x) + self._d * x

    def _matmat(self, X):
        X = np.asarray(X, dtype=np.float64)
        return self._G._mat(X) + self._d[:, None] * X
