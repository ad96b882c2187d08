r"""Khatri–Rao form of V, its balanced spectrum, and spectral approximations of V^{-1}.

This module implements the constructions of :doc:`theory_inverse` (after
Lyu, Sisson & Welsh, "On the inverse of covariance matrices for unbalanced crossed designs",
Biometrika 2026) as scipy ``LinearOperator`` objects:

- :func:`khatri_rao` and :class:`KhatriRaoCovariance`: ``V = s_e^2 I + Z_C S Z_C'`` with the
  cell indicator ``Z_C = Z_A • Z_B`` (row-wise, face-splitting Khatri–Rao product) and ``S``
  the covariance of the complete balanced cell table (Section 3);
- :func:`balanced_spectrum`: eigenvalues, inverse and log-determinant of V for balanced
  designs (Section 4);
- :class:`ModifiedCovariance`: construction D1, the margin-equalised "V check" whose inverse
  has an exact spectral decomposition built from the SVD of the normalised count table
  ``D_r^{-1/2} N D_c^{-1/2}`` (Section 6);
- :class:`ProportionalApproximation`: construction D2, the count table replaced by its
  proportional (independence) fit, for any number of crossed factors (Sections 7a, 11);
- :func:`asymptotic_inverse`: the simple asymptotic approximation (Section 7b).

The exact inverse as a low-rank correction of D1 or D2 lives in :mod:`lmmops.paper.lowrank`.

Conventions
-----------
Every operator here is built from a covariance ``V`` with attributes ``design`` (a
:class:`~lmmops.data.design.CrossedDesign`), ``sigma2_e`` (float) and ``sigma2`` (one variance per
factor of the design), such as :class:`KhatriRaoCovariance` or
``lmmops.linalg.operators.CovarianceOperator``.

An interaction term ``(1|a:b)`` is recognised either as a third factor of the design whose
levels are in one-to-one correspondence with the non-empty cells of the two others, or
through ``sigma2_interaction`` of :class:`KhatriRaoCovariance`. With an interaction the
residual covariance becomes cell-block-diagonal, ``R* = s_e^2 I + s_C^2 Z_C Z_C'``, and every
formula holds with the counts ``N`` replaced by the effective counts
``Omega = [n_ij / (s_e^2 + n_ij s_C^2)]`` and ``s_e^{-2} I`` by ``R*^{-1}`` (Section 8). All
approximate inverses have the form

.. math::

    A = R^{-1} - R^{-1} Z X Z' R^{-1},

with ``X`` a ``q x q`` level-space matrix applied in closed form; applying ``A`` costs two
``O(n)`` passes plus the level-space work.

Disconnected designs (a second canonical correlation equal to 1) raise
:class:`~lmmops.errors.DisconnectedDesignError`: the spectral construction would need one
repeated unit correlation per component; fit the components separately.
"""

from __future__ import annotations

import weakref

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, svds

from lmmops.errors import ArgumentError, ArgumentTypeError, DesignError
from lmmops.guard import check_dense

__all__ = [
    "AsymptoticInverse",
    "BalancedSpectrum",
    "KhatriRaoCovariance",
    "ModifiedCovariance",
    "ProportionalApproximation",
    "asymptotic_inverse",
    "balanced_spectrum",
    "khatri_rao",
]

_DTYPE = np.float64
_CACHE = weakref.WeakKeyDictionary()  # design -> dict of theta-independent structure


def _design_cache(design):
    """Per-design cache of theta-independent structure (weakly keyed on the design)."""
    try:
        return _CACHE.setdefault(design, {})
    except TypeError:  # pragma: no cover - designs that cannot be weakly referenced
        return {}


# ---------------------------------------------------------------------------- Khatri-Rao
def khatri_rao(A, B):
    """Row-wise (face-splitting) Khatri–Rao product ``A • B`` of two sparse matrices.

    Row ``k`` of the result is ``kron(A[k, :], B[k, :])``. With indicator matrices this is
    the cell indicator: ``khatri_rao(Z_A, Z_B)`` has a one in column ``i * h + j`` of row
    ``k`` when observation ``k`` is in cell ``(i, j)``. lme4's ``Matrix::KhatriRao(t(A),
    t(B))`` (the column-wise product of the transposes) is the transpose of this product.

    Parameters
    ----------
    A : {sparse matrix, ndarray}, shape (n, p)
    B : {sparse matrix, ndarray}, shape (n, m)

    Returns
    -------
    scipy.sparse.csr_matrix of float64, shape (n, p * m)
        Its nnz in row ``k`` is ``nnz(A[k]) * nnz(B[k])``.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> A = sp.csr_matrix([[1.0, 0.0], [0.0, 2.0]])
    >>> B = sp.csr_matrix([[1.0, 3.0], [4.0, 0.0]])
    >>> khatri_rao(A, B).toarray()
    array([[1., 3., 0., 0.],
           [0., 0., 8., 0.]])
    """
    A = sp.csr_matrix(A, dtype=_DTYPE)
    B = sp.csr_matrix(B, dtype=_DTYPE)
    if A.shape[0] != B.shape[0]:
        raise ArgumentError(
            f"khatri_rao needs the same number of rows, got {A.shape} and {B.shape}"
        )
    A.sum_duplicates()
    B.sum_duplicates()
    A.sort_indices()
    B.sort_indices()
    n, m = A.shape[0], B.shape[1]
    na = np.diff(A.indptr)
    nb = np.diff(B.indptr)
    row_a = np.repeat(np.arange(n), na)  # row of each nonzero of A
    reps = nb[row_a]  # each nonzero of A pairs with the nonzeros of B in its row
    a_idx = np.repeat(np.arange(A.nnz), reps)
    first = np.repeat(np.cumsum(reps) - reps, reps)
    b_idx = np.repeat(B.indptr[row_a], reps) + (np.arange(a_idx.size) - first)
    cols = A.indices[a_idx].astype(np.int64) * m + B.indices[b_idx]
    data = A.data[a_idx] * B.data[b_idx]
    indptr = np.concatenate([[0], np.cumsum(na * nb)])
    return sp.csr_matrix((data, cols, indptr), shape=(n, A.shape[1] * m))


# ---------------------------------------------------------------------------- the model
def _find_interaction(design):
    """Index of a factor that is the interaction of the two others (K = 3 only), else None."""
    cache = _design_cache(design)
    if "interaction" not in cache:
        found = None
        if design.n_factors == 3:
            codes = design.codes.astype(np.int64)
            q = design.n_levels
            for k in range(3):
                i, j = (x for x in range(3) if x != k)
                pair = codes[i] * q[j] + codes[j]
                n_pairs = np.unique(pair).size
                n_triples = np.unique(pair * q[k] + codes[k]).size
                if n_pairs == n_triples == q[k]:
                    found = k
                    break
        cache["interaction"] = found
    return cache["interaction"]


class _Structure:
    """Theta-independent structure of the main (crossed) factors: cells and indicators."""

    def __init__(self, design, main):
        self.main = tuple(main)
        codes = design.codes[list(main)].astype(np.int64)
        self.codes = codes
        self.n = design.n_obs
        self.q_k = np.array([design.n_levels[k] for k in main], dtype=np.int64)
        self.K = len(main)
        self.offsets = np.concatenate([[0], np.cumsum(self.q_k)])
        self.q = int(self.offsets[-1])
        flat = np.zeros(self.n, dtype=np.int64)
        for k in range(self.K):
            flat = flat * self.q_k[k] + codes[k]
        cells, cell, counts = np.unique(flat, return_inverse=True, return_counts=True)
        self.cell = cell.ravel().astype(np.int64)
        self.n_cells = cells.size
        self.cell_counts = counts.astype(_DTYPE)
        self.cell_levels = np.array(np.unravel_index(cells, tuple(self.q_k)), dtype=np.int64)
        n = self.n
        cols = (codes + self.offsets[:-1, None]).T.ravel()
        indptr = np.arange(0, n * self.K + 1, self.K)
        self.Z = sp.csr_matrix((np.ones(n * self.K), cols, indptr), shape=(n, self.q))
        self.Zt = self.Z.T.tocsr()
        self.Zc = sp.csr_matrix(
            (np.ones(n), self.cell, np.arange(n + 1)), shape=(n, self.n_cells)
        )
        self.Zct = self.Zc.T.tocsr()
        # cells -> levels of every main factor, (n_cells x q)
        lcols = (self.cell_levels + self.offsets[:-1, None]).T.ravel()
        lptr = np.arange(0, self.n_cells * self.K + 1, self.K)
        self.L = sp.csr_matrix(
            (np.ones(self.n_cells * self.K), lcols, lptr), shape=(self.n_cells, self.q)
        )
        self.Lt = self.L.T.tocsr()


def _structure(design, main):
    cache = _design_cache(design)
    key = ("structure", tuple(main))
    if key not in cache:
        cache[key] = _Structure(design, main)
    return cache[key]


class _Model:
    """A crossed model at one theta, in the whitened form of :ref:`inverse-interaction`.

    ``V = R + sum_k s_k^2 Z_k Z_k'`` with ``R = s_e^2 I + s_C^2 Z_C Z_C'`` (``s_C^2 = 0``
    without an interaction). Whitening by ``R^{-1/2}`` gives ``I + Zw G Zw'`` with
    ``Zw'Zw = C`` (blocks: effective level totals and cross-tabulations of
    ``Omega = n_c / (s_e^2 + n_c s_C^2)``) and ``G = blkdiag(s_k^2 I)``.
    """

    def __init__(self, design, sigma2_e, sigma2, sigma2_interaction=None):
        K = design.n_factors
        s2 = np.atleast_1d(np.asarray(sigma2, dtype=_DTYPE)).ravel()
        if s2.size != K:
            raise ArgumentError(f"sigma2 needs one variance per factor ({K}), got {s2.size}")
        inter = _find_interaction(design)
        if inter is not None:
            if sigma2_interaction is not None:
                raise ArgumentError(
                    f"factor '{design.names[inter]}' is already the interaction of the two "
                    "others; do not pass sigma2_interaction as well"
                )
            main = [k for k in range(K) if k != inter]
            s_c2 = float(s2[inter])
            s2 = s2[main]
        else:
            main = list(range(K))
            s_c2 = 0.0 if sigma2_interaction is None else float(sigma2_interaction)
        if K < 2:
            raise DesignError("the spectral constructions need at least two crossed factors")
        s_e2 = float(sigma2_e)
        if not (np.isfinite(s_e2) and s_e2 > 0):
            raise ArgumentError(f"sigma2_e must be positive and finite, got {sigma2_e}")
        if not np.all(np.isfinite(s2) & (s2 > 0)):
            raise ArgumentError(
                f"the factor variances must be positive and finite, got {s2.tolist()}; drop a "
                "factor whose variance is 0"
            )
        if not (np.isfinite(s_c2) and s_c2 >= 0):
            raise ArgumentError(f"the interaction variance must be >= 0, got {s_c2}")
        self.design = design
        self.interaction = inter
        self.st = _structure(design, main)
        self.s_e2, self.s2, self.s_c2 = s_e2, s2, s_c2
        self.has_interaction = (inter is not None) or (sigma2_interaction is not None)
        st = self.st
        self.n, self.K, self.q = st.n, st.K, st.q
        # per-cell R^{-1} on the cell mean direction, and effective counts Omega
        self.fc2 = 1.0 / (s_e2 + st.cell_counts * s_c2)
        self.omega = st.cell_counts * self.fc2
        self.f2 = self.fc2[st.cell] if s_c2 > 0 else None  # None: the scalar 1/s_e2
        self.w = np.asarray(st.Lt @ self.omega, dtype=_DTYPE)  # level totals of Omega (q,)
        self.W = float(self.omega.sum())
        self.lam = np.repeat(1.0 / s2, st.q_k)  # whitened Lambda (q,)

    # --- blocks
    def block(self, x, k):
        o = self.st.offsets
        return x[o[k] : o[k + 1]]

    def w_k(self, k):
        return self.block(self.w, k)

    def omega_table(self, k, l):
        """Sparse effective cross-tabulation between main factors k and l."""
        st = self.st
        return sp.csr_matrix(
            (self.omega, (st.cell_levels[k], st.cell_levels[l])),
            shape=(int(st.q_k[k]), int(st.q_k[l])),
        )

    def gram(self):
        """Sparse whitened ``C = Zw'Zw`` (q x q)."""
        return (self.st.Lt @ sp.diags(self.omega) @ self.st.L).tocsr()

    def level_matrix(self):
        """Sparse exact level-space matrix ``M = C + Lambda`` (whitened)."""
        return (self.gram() + sp.diags(self.lam)).tocsr()

    # --- observation-space pieces, all accept (n,) or (n, k)
    def _scale(self, v):
        if self.f2 is None:
            return v / self.s_e2
        return v * (self.f2[:, None] if v.ndim == 2 else self.f2)

    def rinv(self, v):
        """``R^{-1} v``."""
        out = v / self.s_e2
        if self.s_c2 > 0:
            coef = self.s_c2 / (self.s_e2 * (self.s_e2 + self.st.cell_counts * self.s_c2))
            cs = self.st.Zct @ v
            cs = cs * (coef[:, None] if cs.ndim == 2 else coef)
            out = out - self.st.Zc @ cs
        return out

    def rmul(self, v):
        """``R v``."""
        out = self.s_e2 * v
        if self.s_c2 > 0:
            out = out + self.s_c2 * (self.st.Zc @ (self.st.Zct @ v))
        return out

    def zt(self, v):
        """``Z'R^{-1} v`` (the whitened ``Zw'R^{-1/2} v``), shape (q,) or (q, k)."""
        return self.st.Zt @ self._scale(v)

    def z(self, u):
        """``R^{-1} Z u``."""
        return self._scale(self.st.Z @ u)

    def logdet_r(self):
        c = self.st.cell_counts
        return float(np.sum((c - 1) * np.log(self.s_e2) + np.log(self.s_e2 + c * self.s_c2)))

    def logdet_g(self):
        return float(np.sum(self.st.q_k * np.log(self.s2)))

    def with_variances(self, sigma2_e, sigma2, sigma2_interaction=None):
        return _Model(self.design, sigma2_e, sigma2, sigma2_interaction)

    def full_sigma2(self):
        """Variances in the design's factor order (interaction included)."""
        if self.interaction is None:
            return self.s2.copy()
        out = np.empty(self.s2.size + 1)
        main = list(self.st.main)
        out[main] = self.s2
        out[self.interaction] = self.s_c2
        return out


def _as_model(V):
    """Return the whitened model of a covariance operator (or pass a model through)."""
    if isinstance(V, _Model):
        return V
    if isinstance(V, _ApproximationBase):
        return V.model
    for attr in ("design", "sigma2_e", "sigma2"):
        if not hasattr(V, attr):
            raise ArgumentTypeError(
                f"expected a covariance operator with .design, .sigma2_e and .sigma2 "
                f"(e.g. KhatriRaoCovariance or CovarianceOperator), got {type(V).__name__}"
            )
    return _Model(V.design, V.sigma2_e, V.sigma2, getattr(V, "sigma2_interaction", None))


def _as_2d(x, n):
    x = np.asarray(x, dtype=_DTYPE)
    return x.reshape(n, -1)


class _SymmetricOperator(LinearOperator):
    """Base for the symmetric operators here: ``_matvec`` goes through ``_matmat``."""

    def __init__(self, n):
        super().__init__(dtype=_DTYPE, shape=(n, n))

    def _matvec(self, x):
        x = np.asarray(x, dtype=_DTYPE)
        return self._matmat(x.reshape(self.shape[1], -1)).reshape(x.shape)

    def _adjoint(self):
        return self

    def _rmatvec(self, x):
        return self._matvec(x)

    def todense(self):
        """Dense form, for tests on small designs (guarded by ``check_dense``).

        Returns
        -------
        ndarray of float64, shape (n, n)
        """
        check_dense(self.shape, f"{type(self).__name__}.todense()")
        return self._matmat(np.eye(self.shape[0]))


class _LevelInverse(_SymmetricOperator):
    """``A = R^{-1} - R^{-1} Z X Z' R^{-1}``, X applied by ``apply_x`` in level space."""

    def __init__(self, model, apply_x, name):
        super().__init__(model.n)
        self.model = model
        self._apply_x = apply_x
        self._name = name

    def _matmat(self, x):
        m = self.model
        return m.rinv(x) - m.z(self._apply_x(m.zt(x)))

    def __repr__(self):
        return f"<{self.model.n}x{self.model.n} {self._name} (LinearOperator, float64)>"


class _ApproximationBase:
    model: _Model


# ---------------------------------------------------------------------------- Section 3
class KhatriRaoCovariance(_SymmetricOperator):
    r"""The covariance ``V = s_e^2 I + Z_C S Z_C'`` in Khatri–Rao form (:ref:`inverse-khatri-rao`).

    ``Z_C`` is the cell indicator, the row-wise Khatri–Rao product of the factor indicators,
    and ``S`` is the covariance of the complete balanced cell table,
    ``S = s_A^2 (I_g ⊗ J_h) + s_B^2 (J_g ⊗ I_h) (+ s_C^2 I_gh)`` for two factors (one
    Kronecker term per factor for K factors). All the imbalance sits in ``Z_C``. The matvec
    only touches the ``n_cells`` non-empty cells: cost ``O(n + K n_cells)``.

    Parameters
    ----------
    design : CrossedDesign
        The crossed factors. A third factor that is the interaction of the two others (one
        level per non-empty cell) is recognised as the ``(1|a:b)`` term.
    sigma2_e : float
        Residual variance ``s_e^2 > 0``.
    sigma2 : array_like, shape (n_factors,)
        One variance per factor of ``design`` (positive).
    sigma2_interaction : float, optional
        Variance ``s_C^2`` of an interaction term that is not a factor of ``design``.

    Attributes
    ----------
    design, sigma2_e, sigma2, sigma2_interaction

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> V = KhatriRaoCovariance(d, 1.0, [0.5, 0.25])
    >>> V @ np.ones(5)
    array([2.5 , 2.75, 3.  , 3.25, 3.25])
    >>> Za, Zb = d.indicator(0), d.indicator(1)
    >>> dense = np.eye(5) + 0.5 * (Za @ Za.T).toarray() + 0.25 * (Zb @ Zb.T).toarray()
    >>> bool(np.allclose(V.todense(), dense))
    True
    """

    def __init__(self, design, sigma2_e, sigma2, sigma2_interaction=None):
        self._model = _Model(design, sigma2_e, sigma2, sigma2_interaction)
        super().__init__(design.n_obs)
        self.design = design
        self.sigma2_e = float(sigma2_e)
        self.sigma2 = np.atleast_1d(np.asarray(sigma2, dtype=_DTYPE)).copy()
        self.sigma2_interaction = (
            None if sigma2_interaction is None else float(sigma2_interaction)
        )
        m = self._model
        self._s_levels = np.repeat(m.s2, m.st.q_k)

    @property
    def model(self):
        """The whitened model (private structure shared with the approximations)."""
        return self._model

    def cell_indicator(self):
        """Cell indicator ``Z_C``: the row-wise Khatri–Rao product of the factor indicators.

        Returns
        -------
        scipy.sparse.csr_matrix, shape (n_obs, prod(q_k))
            Columns in row-major cell order (``i * h + j`` for two factors).
        """
        st = self._model.st
        Zc = self.design.indicator(st.main[0])
        for k in st.main[1:]:
            Zc = khatri_rao(Zc, self.design.indicator(k))
        return Zc

    def cell_covariance(self):
        """Dense ``S``, the covariance of the complete balanced cell table (small designs).

        Returns
        -------
        ndarray of float64, shape (prod(q_k), prod(q_k))
        """
        m = self._model
        qk = [int(x) for x in m.st.q_k]
        size = int(np.prod(qk))
        check_dense((size, size), "KhatriRaoCovariance.cell_covariance()")
        S = m.s_c2 * np.eye(size)
        for k in range(m.K):
            term = np.ones((1, 1))
            for l, ql in enumerate(qk):
                term = np.kron(term, np.eye(ql) if l == k else np.ones((ql, ql)))
            S += m.s2[k] * term
        return S

    def _matmat(self, x):
        m = self._model
        st = m.st
        u = st.Zct @ x  # cell sums
        s = self._s_levels[:, None] if u.ndim == 2 else self._s_levels
        su = st.L @ (s * (st.Lt @ u))
        if m.s_c2 > 0:
            su = su + m.s_c2 * u
        return m.s_e2 * x + st.Zc @ su

    def with_variances(self, sigma2_e, sigma2, sigma2_interaction=None):
        """Return the same operator at new variances (the structure is shared).

        Returns
        -------
        KhatriRaoCovariance
        """
        return KhatriRaoCovariance(self.design, sigma2_e, sigma2, sigma2_interaction)

    def __repr__(self):
        return (
            f"KhatriRaoCovariance(n={self.shape[0]}, cells={self._model.st.n_cells}, "
            f"sigma2_e={self.sigma2_e:g}, sigma2={self.sigma2.tolist()})"
        )


# ---------------------------------------------------------------------------- Section 4
class BalancedSpectrum:
    r"""Spectrum of V for a balanced two-factor design (:ref:`inverse-balanced`).

    With ``n_ij = m`` for every cell, ``V = sum_k l_k P_k`` over five orthogonal projectors
    (grand mean, A, B, AB, within-cell). Without an interaction the AB and within-cell
    eigenvalues coincide (``s_e^2``) and are merged.

    Attributes
    ----------
    values : ndarray, shape (n_distinct,)
        Distinct eigenvalues, in the order of ``labels``.
    multiplicities : ndarray of int64, shape (n_distinct,)
    labels : tuple of str
        Among ``"1"``, ``"A"``, ``"B"``, ``"AB"``, ``"E"`` and ``"AB+E"``.
    m : int
        Observations per cell.
    """

    def __init__(self, model, m):
        self.model = model
        g, h = (int(x) for x in model.st.q_k)
        s_e2, (s_a2, s_b2), s_c2 = model.s_e2, model.s2, model.s_c2
        self.m, self.g, self.h = m, g, h
        l_1 = s_e2 + m * s_c2 + m * h * s_a2 + m * g * s_b2
        l_a = s_e2 + m * s_c2 + m * h * s_a2
        l_b = s_e2 + m * s_c2 + m * g * s_b2
        l_ab = s_e2 + m * s_c2
        l_e = s_e2
        self._all = (l_1, l_a, l_b, l_ab, l_e)
        vals = [l_1, l_a, l_b]
        mult = [1, g - 1, h - 1]
        labels = ["1", "A", "B"]
        if model.has_interaction:
            vals += [l_ab, l_e]
            mult += [(g - 1) * (h - 1), g * h * (m - 1)]
            labels += ["AB", "E"]
        else:
            vals += [l_e]
            mult += [(g - 1) * (h - 1) + g * h * (m - 1)]
            labels += ["AB+E"]
        keep = [i for i, mu in enumerate(mult) if mu > 0]
        self.values = np.array([vals[i] for i in keep], dtype=_DTYPE)
        self.multiplicities = np.array([mult[i] for i in keep], dtype=np.int64)
        self.labels = tuple(labels[i] for i in keep)

    def eigenvalues(self):
        """All n eigenvalues of V, ascending.

        Returns
        -------
        ndarray of float64, shape (n_obs,)
        """
        return np.sort(np.repeat(self.values, self.multiplicities))

    def logdet(self):
        """``log|V| = sum_k mult_k log l_k``.

        Returns
        -------
        float
        """
        return float(np.sum(self.multiplicities * np.log(self.values)))

    def inverse(self):
        """``V^{-1} = sum_k P_k / l_k`` as a LinearOperator (cost O(n) per vector).

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (n_obs, n_obs)
        """
        return _BalancedInverse(self)

    def __repr__(self):
        body = ", ".join(
            f"{lab}: {v:.6g} (x{mu})"
            for lab, v, mu in zip(self.labels, self.values, self.multiplicities)
        )
        return f"BalancedSpectrum({body})"


class _BalancedInverse(_SymmetricOperator):
    def __init__(self, spec):
        super().__init__(spec.model.n)
        self.spec = spec

    def _matmat(self, x):
        sp_ = self.spec
        st = sp_.model.st
        m, g, h = sp_.m, sp_.g, sp_.h
        l_1, l_a, l_b, l_ab, l_e = sp_._all
        n = st.n
        gm = x.sum(axis=0, keepdims=True) / n
        lev = st.Zt @ x
        rm = st.Z[:, :g] @ lev[:g] / (h * m)
        cm = st.Z[:, g:] @ lev[g:] / (g * m)
        cellm = st.Zc @ (st.Zct @ x) / m
        out = gm / l_1 + (rm - gm) / l_a + (cm - gm) / l_b
        out = out + (cellm - rm - cm + gm) / l_ab + (x - cellm) / l_e
        return out


def balanced_spectrum(design, sigma2_e, sigma2, sigma2_interaction=None):
    """Eigenvalues, inverse and log-determinant of V for a balanced design (Section 4).

    Parameters
    ----------
    design : CrossedDesign
        Two crossed factors (plus, optionally, their interaction as a third factor) with the
        same number ``m >= 1`` of observations in every one of the ``g h`` cells.
    sigma2_e : float
    sigma2 : array_like, shape (n_factors,)
    sigma2_interaction : float, optional
        ``s_C^2`` when the interaction is not a factor of ``design``.

    Returns
    -------
    BalancedSpectrum

    Raises
    ------
    DesignError
        If the design is not balanced (an empty cell or unequal cell counts), or does not
        have exactly two crossed factors.

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> a, b = np.meshgrid(np.arange(3), np.arange(2), indexing="ij")
    >>> codes = np.repeat(np.vstack([a.ravel(), b.ravel()]), 2, axis=1)  # m = 2
    >>> spec = balanced_spectrum(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.25])
    >>> spec.labels, spec.values.tolist(), spec.multiplicities.tolist()
    (('1', 'A', 'B', 'AB+E'), [4.5, 3.0, 2.5, 1.0], [1, 2, 1, 8])
    """
    model = _Model(design, sigma2_e, sigma2, sigma2_interaction)
    st = model.st
    if st.K != 2:
        raise DesignError(
            f"balanced_spectrum handles two crossed factors (and their interaction), got {st.K}"
        )
    g, h = (int(x) for x in st.q_k)
    counts = st.cell_counts
    if st.n_cells != g * h or counts.min() != counts.max():
        raise DesignError(
            f"the design is not balanced: {g * h - st.n_cells} of the {g * h} cells are empty "
            f"and the non-empty cells hold {int(counts.min())} to {int(counts.max())} "
            "observations; use ModifiedCovariance, ProportionalApproximation or "
            "lmmops.paper.lowrank.ExactInverse for unbalanced designs"
        )
    return BalancedSpectrum(model, int(counts[0]))


# ---------------------------------------------------------------------------- Section 6
def _reference_total(w, reference):
    if reference == "mean":
        return float(np.mean(w))
    if reference == "harmonic":
        return float(w.size / np.sum(1.0 / w))
    raise ArgumentError(
        f"reference must be 'mean', 'harmonic' or a pair of totals, got {reference}"
    )


def _randomized_svd(A, r, rng, n_oversample=10, n_iter=6):
    """Top-r SVD of a sparse matrix by a randomized range finder with power iterations."""
    rng = np.random.default_rng(rng)
    k = min(r + n_oversample, min(A.shape))
    Y = A @ rng.standard_normal((A.shape[1], k))
    Q, _ = np.linalg.qr(Y)
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(A.T @ Q)
        Q, _ = np.linalg.qr(A @ Q)
    Bm = (A.T @ Q).T
    Ub, s, Vt = np.linalg.svd(Bm, full_matrices=False)
    return (Q @ Ub)[:, :r], s[:r], Vt[:r].T


def _deflated_svd(KN, wr, wc, total, rank, rng):
    """Top-``rank`` triplets of ``K_N`` with the first one exact (``rho_1 = 1``).

    The first triplet is ``(sqrt(wr / total), 1, sqrt(wc / total))``; the others come
    from a dense SVD (``min(g, h) <= 300`` or ``rank >= min(g, h) / 2``) or from
    :func:`scipy.sparse.linalg.svds` (tolerance 1e-6) on the table with the first
    triplet deflated. This is the preconditioners' method: cheaper than ``'lanczos'``
    at the accuracy a preconditioner needs.
    """
    g, h = KN.shape
    m = min(g, h)
    phi1, psi1 = np.sqrt(wr / total), np.sqrt(wc / total)
    if m <= 300 or rank >= m // 2:
        check_dense((g, h), "the dense SVD of the normalised count table")
        Phi, rho, PsiT = np.linalg.svd(KN.toarray(), full_matrices=False)
        Phi, rho, Psi = Phi[:, :rank], rho[:rank], PsiT[:rank].T
        Phi[:, 0], Psi[:, 0], rho[0] = phi1, psi1, 1.0
        return Phi, rho, Psi
    KNt = KN.T.tocsr()
    defl = LinearOperator(
        (g, h), dtype=np.float64,
        matvec=lambda x: KN @ x - phi1 * (psi1 @ x),
        rmatvec=lambda y: KNt @ y - psi1 * (phi1 @ y),
        matmat=lambda X: KN @ X - np.outer(phi1, psi1 @ X),
        rmatmat=lambda Y: KNt @ Y - np.outer(psi1, phi1 @ Y),
    )
    v0 = np.random.default_rng(rng).standard_normal(min(g, h))
    U, s, Vt = svds(defl, k=rank - 1, v0=v0, tol=1e-6)
    order = np.argsort(s)[::-1]
    Phi = np.column_stack([phi1, U[:, order]])
    Psi = np.column_stack([psi1, Vt[order].T])
    rho = np.concatenate([[1.0], s[order]])
    return Phi, rho, Psi


class _NormalisedSVD:
    """SVD (or its top-r part) of ``K_N = D_r^{-1/2} Omega D_c^{-1/2}``; theta-free.

    The one home of the normalised count table's SVD: :class:`ModifiedCovariance` and
    the ``spectral`` preconditioners of :mod:`lmmops.linalg.preconditioners` (method
    ``'deflated'``) both take it from :func:`_normalised_svd`, through one cache.
    """

    def __init__(self, model, rank, method, rng):
        g, h = (int(x) for x in model.st.q_k)
        mfull = min(g, h)
        wr, wc = model.w_k(0), model.w_k(1)
        KN = (
            sp.diags(1.0 / np.sqrt(wr)) @ model.omega_table(0, 1) @ sp.diags(1.0 / np.sqrt(wc))
        ).tocsr()
        if method == "auto":
            method = "full" if (rank is None or rank >= mfull - 1) and mfull <= 4000 else "lanczos"
        if method == "deflated":
            Phi, rho, Psi = _deflated_svd(KN, wr, wc, model.W, int(min(rank, mfull)), rng)
        elif method == "full":
            check_dense((g, h), "the full SVD of the normalised count table")
            Phi, rho, PsiT = np.linalg.svd(KN.toarray(), full_matrices=False)
            Psi = PsiT.T
            r = mfull if rank is None else min(int(rank), mfull)
            Phi, rho, Psi = Phi[:, :r], rho[:r], Psi[:, :r]
        else:
            r = min(100, mfull - 1) if rank is None else int(rank)
            if not 1 <= r < mfull:
                raise ArgumentError(
                    f"a truncated SVD needs 1 <= rank < min(g, h) = {mfull}, got {r}"
                )
            if method == "lanczos":
                v0 = np.random.default_rng(rng).standard_normal(mfull)
                Phi, rho, PsiT = svds(KN if g <= h else KN.T.tocsr(), k=r, v0=v0)
                if g > h:
                    Phi, PsiT = PsiT.T, Phi.T
                order = np.argsort(rho)[::-1]
                Phi, rho, Psi = Phi[:, order], rho[order], PsiT[order].T
            elif method == "randomized":
                Phi, rho, Psi = _randomized_svd(KN, r, rng)
            else:
                raise ArgumentError(
                    f"svd must be 'auto', 'full', 'lanczos' or 'randomized', got {method!r}"
                )
        self.method = method
        self.Phi = np.ascontiguousarray(Phi)
        self.Psi = np.ascontiguousarray(Psi)
        self.rho = np.clip(rho, 0.0, 1.0)
        self.rank = self.rho.size
        self.full_rank = mfull
        self.truncated = self.rank < mfull
        # ||K_N||_F^2 = sum_k rho_k^2: the tail's share, for the log-det tail correction
        self.tail_f2 = max(float(KN.multiply(KN).sum()) - float(np.sum(self.rho**2)), 0.0)


def _normalised_svd(model, rank, method, rng):
    """The (cached) :class:`_NormalisedSVD` of a model's normalised count table.

    With ``method='deflated'`` a cached SVD of a larger rank serves a smaller one (its
    leading triplets, as the preconditioners always used them).
    """
    cache = _design_cache(model.design)
    ratio = model.s_c2 / model.s_e2 if model.s_c2 > 0 else 0.0
    if method == "deflated":
        for k, val in cache.items():
            if (isinstance(k, tuple) and k[0] == "svd" and k[1:3] == (model.st.main, ratio)
                    and k[4:] == (method, rng) and k[3] >= rank):
                return val
    key = ("svd", model.st.main, ratio, rank, method, rng if method != "full" else None)
    if key not in cache:
        # keep at most a few theta-dependent SVDs (interaction models)
        old = [k for k in cache if isinstance(k, tuple) and k[0] == "svd" and k[2] != 0.0]
        for k in old[:-3]:
            del cache[k]
        cache[key] = _NormalisedSVD(model, rank, method, rng)
    return cache[key]


def design_svd(design, rank, rng=0):
    """Top-``rank`` triplets ``(Phi, rho, Psi)`` of a two-factor design's normalised table.

    ``K_N = D_r^{-1/2} N D_c^{-1/2}`` of the raw counts (no interaction whitening), by
    the ``'deflated'`` method (first triplet exact), cached per design with every other
    SVD of this module.

    Parameters
    ----------
    design : CrossedDesign
        Two crossed factors, connected.
    rank : int
    rng : int, optional

    Returns
    -------
    Phi : ndarray, shape (g, rank)
    rho : ndarray, shape (rank,)
    Psi : ndarray, shape (h, rank)
    """
    model = _Model(design, 1.0, np.ones(design.n_factors))
    rank = int(min(rank, min(int(x) for x in model.st.q_k)))
    svd = _normalised_svd(model, rank, "deflated", rng)
    return svd.Phi[:, :rank], svd.rho[:rank], svd.Psi[:, :rank]


class ModifiedCovariance(_ApproximationBase):
    r"""Construction D1: the margin-equalised modified covariance "V check" (Section 6).

    .. math::

        \check V = R + s_A^2 \bar r\, Z_A D_r^{-1} Z_A' + s_B^2 \bar c\, Z_B D_c^{-1} Z_B'
                 = s_e^2 I + a P_A + b P_B \quad (a = s_A^2 \bar r,\ b = s_B^2 \bar c),

    the same crossed pattern (missing cells kept exactly) with level variances
    ``s_A^2 r̄ / r_i`` and ``s_B^2 c̄ / c_j``. With the SVD ``D_r^{-1/2} N D_c^{-1/2} = Phi
    diag(rho) Psi'`` every ``span{x_k, y_k}`` (``x_k = Q_A phi_k``, ``y_k = Q_B psi_k``) is
    invariant, which gives the exact eigenvalues, inverse and log-determinant. The SVD does
    not depend on the variances: it is computed once per design, cached, and reused by
    :meth:`with_variances`.

    Parameters
    ----------
    V : covariance operator
        With ``.design`` (two crossed factors, optionally with their interaction),
        ``.sigma2_e`` and ``.sigma2``.
    reference : {'mean', 'harmonic'} or tuple of float, optional
        Reference totals ``(r̄, c̄)``: the mean or the harmonic mean of the level totals, or
        given values (counts; effective totals of ``Omega`` with an interaction).
    rank : int, optional
        Number of SVD triplets to keep. Default: all ``min(g, h)`` (full SVD) when
        ``min(g, h) <= 4000``, else 100.
    svd : {'auto', 'full', 'lanczos', 'randomized'}, optional
        ``'full'``: dense LAPACK SVD (``O(g h min(g, h))``). ``'lanczos'``:
        ``scipy.sparse.linalg.svds`` for the top ``rank`` triplets (``O(nnz rank)`` per
        iteration). ``'randomized'``: a randomized range finder with power iterations.
    rng : int or numpy.random.Generator, optional
        Seed for the Lanczos start vector or the randomized range finder.

    Notes
    -----
    *Truncation.* With ``rank = r < min(g, h)`` the canonical correlations ``rho_k``,
    ``k > r``, are set to 0: the operators are then the exact spectral forms of the modified
    covariance whose normalised count table is replaced by its best rank-``r`` approximation
    in the level-space system. Its spectral error relative to ``V check^{-1}`` is of order
    ``rho_{r+1}`` (``r = 1`` is close to construction D2), and the truncated inverse can be
    indefinite on the discarded pairs when ``rho_{r+1} > min(alpha, beta) - 1``. The
    log-determinant adds the second-order tail term ``-(||K_N||_F^2 - sum_{k<=r} rho_k^2)
    / (alpha beta)``, so its error is ``O(sum_{k>r} rho_k^4)``. Eigenvalues need the full SVD.
    Use ``rank=None`` (full) for an exact ``V check`` and for :class:`lmmops.paper.lowrank.
    ExactInverse`.

    *Cost.* Applying :meth:`inverse` costs ``O(n + (g + h) r)``; the SVD costs
    ``O(g h min(g, h))`` once per design (full), or ``O(nnz r)`` per Lanczos iteration.

    *Interaction.* With a ``(1|a:b)`` term, the counts become the effective counts
    ``Omega`` (Section 8). The SVD then depends on ``s_C^2 / s_e^2`` and is recomputed when
    that ratio changes. :meth:`eigenvalues` gives the eigenvalues of
    ``R*^{-1/2} V check R*^{-1/2}``, and :meth:`logdet` includes ``log|R*|``.

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> rng = np.random.default_rng(0)
    >>> codes = np.vstack([rng.integers(0, 4, 40), rng.integers(0, 3, 40)])
    >>> V = KhatriRaoCovariance(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.8])
    >>> D1 = ModifiedCovariance(V)
    >>> float(D1.rho[0].round(12))
    1.0
    >>> Vc = D1.as_operator().todense()
    >>> bool(np.allclose(D1.inverse().todense() @ Vc, np.eye(40)))
    True
    >>> bool(np.isclose(D1.logdet(margin_correction=False), np.linalg.slogdet(Vc)[1]))
    True
    """

    def __init__(self, V, reference="mean", rank=None, svd="auto", rng=0):
        model = _as_model(V)
        if model.K != 2:
            raise DesignError(
                f"ModifiedCovariance (D1) needs exactly two crossed factors, got {model.K}; "
                "use ProportionalApproximation for three or more"
            )
        model.design.check_connected()
        self.V = V
        self.model = model
        self.reference = reference
        self._svd_args = (rank, svd, rng)
        self.svd = _normalised_svd(model, rank, svd, rng)
        wr, wc = model.w_k(0), model.w_k(1)
        if isinstance(reference, str):
            rbar, cbar = _reference_total(wr, reference), _reference_total(wc, reference)
        else:
            rbar, cbar = (float(x) for x in reference)
            if not model.has_interaction:
                # given totals are counts: convert to the whitened scale N / s_e^2
                rbar, cbar = rbar / model.s_e2, cbar / model.s_e2
        self.reference_totals = (rbar, cbar)
        self.a = model.s2[0] * rbar  # whitened a / s_e^2
        self.b = model.s2[1] * cbar
        self.alpha = 1.0 + 1.0 / self.a
        self.beta = 1.0 + 1.0 / self.b
        rho = self.svd.rho
        self._den = self.alpha * self.beta - rho**2
        if len(rho) > 1 and rho[1] > 1 - 1e-10:  # pragma: no cover - check_connected
            raise DesignError("a second canonical correlation equals 1: disconnected design")

    # --- facts
    @property
    def rho(self):
        """ndarray: canonical correlations ``rho_1 = 1 >= rho_2 >= ...`` (kept triplets)."""
        return self.svd.rho

    @property
    def rank(self):
        """int: number of SVD triplets used."""
        return self.svd.rank

    def level_variances(self):
        """Level-specific variances of V check, ``s_A^2 r̄ / r_i`` and ``s_B^2 c̄ / c_j``.

        Returns
        -------
        ndarray, shape (g + h,)
        """
        m = self.model
        wr, wc = m.w_k(0), m.w_k(1)
        rbar, cbar = self.reference_totals
        return np.concatenate([m.s2[0] * rbar / wr, m.s2[1] * cbar / wc])

    def with_variances(self, sigma2_e, sigma2, sigma2_interaction=None):
        """The same construction at new variances, reusing the cached SVD.

        Parameters
        ----------
        sigma2_e : float
        sigma2 : array_like, shape (n_factors,)
        sigma2_interaction : float, optional

        Returns
        -------
        ModifiedCovariance
        """
        V = KhatriRaoCovariance(self.model.design, sigma2_e, sigma2, sigma2_interaction)
        return ModifiedCovariance(V, self.reference, *self._svd_args)

    # --- level space: Kc^{-1}, with Kc = D^{1/2} [[alpha I, K_N], [K_N', beta I]] D^{1/2}
    def _apply_kc_inv(self, z):
        m = self.model
        g = int(m.st.q_k[0])
        col = z.ndim == 2
        sq = np.sqrt(m.w)
        zs = z / (sq[:, None] if col else sq)
        za, zb = zs[:g], zs[g:]
        Phi, Psi, rho = self.svd.Phi, self.svd.Psi, self.svd.rho
        pa, pb = Phi.T @ za, Psi.T @ zb
        r_ = rho[:, None] if col else rho
        d_ = self._den[:, None] if col else self._den
        al, be = self.alpha, self.beta
        ca = (be * pa - r_ * pb) / d_ - pa / al
        cb = (al * pb - r_ * pa) / d_ - pb / be
        xa = za / al + Phi @ ca
        xb = zb / be + Psi @ cb
        out = np.concatenate([xa, xb], axis=0)
        return out / (sq[:, None] if col else sq)

    def level_space_inverse(self):
        """``Kc^{-1}``, the inverse of the whitened level-space matrix of V check.

        ``Kc = blkdiag(alpha D_r, beta D_c) + [[0, N], [N', 0]]`` (whitened counts).

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (g + h, g + h)
        """
        return _FunctionOperator(self.model.q, self._apply_kc_inv)

    # --- observation space
    def as_operator(self):
        """V check itself, ``R + Z G_check Z'``, as a LinearOperator (cost O(n)).

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (n_obs, n_obs)
        """
        return _ModifiedOperator(self.model, self.level_variances())

    def inverse(self):
        """V check^{-1} from its exact spectral decomposition, as a LinearOperator.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (n_obs, n_obs)
            Symmetric; applying it costs ``O(n + (g + h) rank)``.
        """
        return _LevelInverse(self.model, self._apply_kc_inv, "ModifiedCovariance inverse")

    def aspreconditioner(self):
        """Alias of :meth:`inverse` (pyamg's shape), for ``scipy.sparse.linalg.cg(M=...)``.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator
        """
        return self.inverse()

    def _logdet_kc(self):
        """``log|Kc|`` (whitened level space)."""
        m = self.model
        g, h = (int(x) for x in m.st.q_k)
        r = self.svd.rank
        val = float(np.sum(np.log(m.w)))
        val += (g - r) * np.log(self.alpha) + (h - r) * np.log(self.beta)
        val += float(np.sum(np.log(self._den)))
        if self.svd.truncated:
            val -= self.svd.tail_f2 / (self.alpha * self.beta)
        return val

    def margin_correction(self):
        """First-order margin correction of the log-determinant (Section 6).

        Returns
        -------
        float
            ``sum_i log((s_e^2 + s_A^2 r_i) / (s_e^2 + s_A^2 r̄)) + sum_j (same for columns)``.
        """
        m = self.model
        rbar, cbar = self.reference_totals
        wr, wc = m.w_k(0), m.w_k(1)
        return float(
            np.sum(np.log1p(m.s2[0] * wr) - np.log1p(m.s2[0] * rbar))
            + np.sum(np.log1p(m.s2[1] * wc) - np.log1p(m.s2[1] * cbar))
        )

    def logdet(self, margin_correction=True):
        """Log-determinant of V check, optionally with the first-order margin correction.

        Parameters
        ----------
        margin_correction : bool, optional
            If True (default) add :meth:`margin_correction`, which makes the result an
            approximation of ``log|V|``; if False return ``log|V check|`` exactly:
            ``n log s_e^2 + g log(a/s_e^2) + h log(b/s_e^2) + (g-m) log alpha
            + (h-m) log beta + sum_k log(alpha beta - rho_k^2)``.

        Returns
        -------
        float
        """
        m = self.model
        # log|I + Zw Gc Zw'| = log|Gc| + log|Kc|, log|Gc| = sum log(s^2 rbar / w)
        val = m.logdet_r() + float(np.sum(np.log(self.level_variances()))) + self._logdet_kc()
        if margin_correction:
            val += self.margin_correction()
        return val

    def eigenvalues(self, return_counts=False):
        """Exact eigenvalues of V check (whitened by ``R*`` with an interaction).

        Parameters
        ----------
        return_counts : bool, optional
            If True return the distinct values and their multiplicities instead of all n.

        Returns
        -------
        values : ndarray of float64, shape (n_obs,) ascending, or (n_distinct,)
        counts : ndarray of int64, only if ``return_counts``

        Raises
        ------
        ArgumentError
            If the SVD was truncated.
        """
        if self.svd.truncated:
            raise ArgumentError("eigenvalues() needs the full SVD (rank=None, svd='full')")
        m = self.model
        g, h = (int(x) for x in m.st.q_k)
        mm = self.svd.full_rank
        a, b, rho = self.a, self.b, self.svd.rho
        unit = rho > 1 - 1e-12
        mu_p = 0.5 * ((a + b) + np.sqrt((a - b) ** 2 + 4 * a * b * rho**2))
        mu_m = a * b * (1 - rho**2) / mu_p
        vals = [1 + mu_p, 1 + mu_m[~unit], [1 + a], [1 + b]]
        cnts = [np.ones(mm, np.int64), np.ones((~unit).sum(), np.int64), [g - mm], [h - mm]]
        n_rest = m.n - (2 * mm - int(unit.sum()) + (g - mm) + (h - mm))
        vals.append([1.0])
        cnts.append([n_rest])
        values = np.concatenate([np.asarray(v, _DTYPE) for v in vals])
        counts = np.concatenate([np.asarray(c, np.int64) for c in cnts])
        if not m.has_interaction:
            values = values * m.s_e2
        keep = counts > 0
        values, counts = values[keep], counts[keep]
        if return_counts:
            return values, counts
        return np.sort(np.repeat(values, counts))

    def __repr__(self):
        g, h = (int(x) for x in self.model.st.q_k)
        rho2 = self.rho[1] if self.rank > 1 else float("nan")
        return (
            f"ModifiedCovariance(g={g}, h={h}, n={self.model.n}, rank={self.rank}"
            f"{' (truncated)' if self.svd.truncated else ''}, rho2={rho2:.4g})"
        )


class _FunctionOperator(_SymmetricOperator):
    def __init__(self, n, fn):
        super().__init__(n)
        self._fn = fn

    def _matmat(self, x):
        return self._fn(x)


class _ModifiedOperator(_SymmetricOperator):
    """``R + Z diag(level variances) Z'``."""

    def __init__(self, model, level_var):
        super().__init__(model.n)
        self.model = model
        self._lv = level_var

    def _matmat(self, x):
        m = self.model
        u = m.st.Zt @ x
        u = u * (self._lv[:, None] if u.ndim == 2 else self._lv)
        return m.rmul(x) + m.st.Z @ u


# ---------------------------------------------------------------------------- Sections 7, 11
class _ProportionalCore:
    r"""D2's level-space matrix ``M_prop = diag(d) + B (J_K - I_K) B' / n`` and its closed forms.

    The one implementation behind :class:`ProportionalApproximation` (whitened, any ``R``)
    and the ``proportional`` preconditioner of :mod:`lmmops.linalg.preconditioners`
    (:ref:`inverse-d2`).

    Parameters
    ----------
    w : ndarray, shape (q,)
        The level totals ``r_k`` of every factor, stacked (``B = blkdiag(r_1, ..., r_K)``).
    d : ndarray, shape (q,)
        The exact diagonal ``P = blkdiag(D_k + lambda_k I)``.
    offsets : array_like of int, shape (K + 1,)
        Where each factor's levels start in ``w`` and ``d``.
    n : float
        The grand total (``sum_l w_l / K``).
    """

    def __init__(self, w, d, offsets, n):
        self.w = np.asarray(w, dtype=_DTYPE)
        self.d = np.asarray(d, dtype=_DTYPE)
        self.offsets = np.asarray(offsets)
        self.n = float(n)
        o = self.offsets
        K = o.size - 1
        self.K = K
        self.alpha_k = np.array(
            [np.sum(self.w[o[k] : o[k + 1]] ** 2 / self.d[o[k] : o[k + 1]]) for k in range(K)]
        )
        T_inv = np.ones((K, K)) / (K - 1) - np.eye(K)  # (J - I)^{-1}
        self.core = self.n * T_inv + np.diag(self.alpha_k)
        self.core_lu = sla.lu_factor(self.core)

    def bt(self, y):
        """``B' y``: per-factor weighted sums, shape (K,) or (K, m)."""
        wy = self.w[:, None] * y if y.ndim == 2 else self.w * y
        return np.add.reduceat(wy, self.offsets[:-1], axis=0)

    def b(self, s):
        """``B s``, shape (q,) or (q, m)."""
        rep = np.repeat(s, np.diff(self.offsets), axis=0)
        return rep * (self.w[:, None] if s.ndim == 2 else self.w)

    def solve(self, z):
        """``M_prop^{-1} z = P^{-1} z - P^{-1} B (n (J_K - I_K)^{-1} + A)^{-1} B' P^{-1} z``."""
        pd = self.d[:, None] if z.ndim == 2 else self.d
        y = z / pd
        s = sla.lu_solve(self.core_lu, self.bt(y))
        return y - self.b(s) / pd

    def matmul(self, z):
        """``M_prop z``."""
        pd = self.d[:, None] if z.ndim == 2 else self.d
        t = self.bt(z)
        tt = t.sum(axis=0, keepdims=True) - t  # (J - I) t
        return pd * z + self.b(tt) / self.n

    def logdet(self):
        """``log|M_prop| = log|P| + log|I_K + (J_K - I_K) A / n|``.

        Returns
        -------
        float

        Raises
        ------
        ArithmeticError
            If the K x K core is not positive definite (it always is, by the argument
            of :ref:`inverse-d2`).
        """
        K = self.K
        core = np.eye(K) + (np.ones((K, K)) - np.eye(K)) * self.alpha_k[None, :] / self.n
        sign, ld = np.linalg.slogdet(core)
        if sign <= 0:  # pragma: no cover - M_prop is SPD (docs/theory_inverse.rst, D2)
            raise ArithmeticError("M_prop is not positive definite")
        return float(np.sum(np.log(self.d)) + ld)


class ProportionalApproximation(_ApproximationBase):
    r"""Construction D2: every cross-tabulation replaced by its proportional fit (Sec. 7a, 11).

    In the level-space system ``M = Z'R^{-1}Z + Lambda`` every off-diagonal block
    ``N_kl`` is replaced by ``r_k r_l' / n`` (effective totals with an interaction), while the
    margins stay exact:

    .. math::

        M_{prop} = P + B (J_K - I_K) B' / n, \quad P = \mathrm{blkdiag}(D_k + \lambda_k I),
        \quad B = \mathrm{blkdiag}(r_1, \dots, r_K).

    Diagonal plus rank K, so ``M_prop^{-1}`` and ``log|M_prop|`` have closed forms; it is
    exact for proportional designs (balanced ones included), for any number of factors.

    Parameters
    ----------
    V : covariance operator
        With ``.design`` (K >= 2 crossed factors), ``.sigma2_e`` and ``.sigma2``.

    Notes
    -----
    The observation-space inverse is ``R^{-1} - R^{-1} Z M_prop^{-1} Z' R^{-1}`` (for two
    factors the formula of Section 7a); applying it costs ``O(n K + q)``. It need not be
    positive definite when the design is far from proportional. :meth:`logdet` is
    ``log|R| + sum_k q_k log s_k^2 + log|M_prop|``.

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> rows, cols = np.meshgrid([0, 1, 2], [0, 1], indexing="ij")
    >>> reps = np.outer([1, 2, 3], [1, 2]).ravel()  # n_ij = u_i v_j: proportional
    >>> codes = np.repeat(np.vstack([rows.ravel(), cols.ravel()]), reps, axis=1)
    >>> V = KhatriRaoCovariance(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.8])
    >>> D2 = ProportionalApproximation(V)
    >>> bool(np.allclose(D2.inverse().todense(), np.linalg.inv(V.todense())))
    True
    """

    def __init__(self, V):
        model = _as_model(V)
        model.design.check_connected()
        self.V = V
        self.model = model
        self.Pdiag = model.w + model.lam
        self.core = _ProportionalCore(model.w, self.Pdiag, model.st.offsets, model.W)
        self.alpha_k = self.core.alpha_k
        self._apply_m_inv = self.core.solve
        self._apply_m = self.core.matmul

    def level_space_operator(self):
        """``M_prop`` as a LinearOperator (whitened level space).

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (q, q)
        """
        return _FunctionOperator(self.model.q, self._apply_m)

    def level_space_inverse(self):
        """``M_prop^{-1}`` in closed form (Woodbury on the rank-K term).

        ``M_prop^{-1} = P^{-1} - P^{-1} B (n (J_K - I_K)^{-1} + A)^{-1} B' P^{-1}`` with
        ``A = diag(alpha_k)``, ``alpha_k = sum_j r_kj^2 / (r_kj + lambda_k)``.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (q, q)
        """
        return _FunctionOperator(self.model.q, self._apply_m_inv)

    def inverse(self):
        """The observation-space approximation of ``V^{-1}``, as a LinearOperator.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (n_obs, n_obs)
        """
        return _LevelInverse(self.model, self._apply_m_inv, "ProportionalApproximation inverse")

    def logdet_level(self):
        """``log|M_prop| = log|P| + log|I_K + (J_K - I_K) A / n|`` (whitened).

        Returns
        -------
        float
        """
        return self.core.logdet()

    def logdet(self):
        """Approximate ``log|V|``: ``log|R| + sum_k q_k log s_k^2 + log|M_prop|``.

        Returns
        -------
        float
        """
        m = self.model
        return m.logdet_r() + m.logdet_g() + self.logdet_level()

    def __repr__(self):
        return f"ProportionalApproximation(K={self.model.K}, q={self.model.q}, n={self.model.n})"


class AsymptoticInverse(_LevelInverse):
    r"""The simple asymptotic approximation of ``V^{-1}`` (:ref:`inverse-d2`).

    .. math::

        V^{-1} \approx s_e^{-2} [I - \sum_k Z_k W_k Z_k' + (K - 1) J_n / n],
        \quad W_k = \mathrm{diag}(1 / (r_{kj} + \lambda_k)),

    i.e. ``V_A^{-1} + V_B^{-1} - s_e^{-2}(I - J_n/n)`` for two factors, the limit of D2 when
    the shrinkage factors tend to 1 and the canonical correlations ``rho_k`` (k >= 2) to 0.
    With an interaction, ``s_e^{-2}`` becomes ``R*^{-1}`` and the counts the effective
    counts. Cost ``O(n K)`` per vector. It is not guaranteed positive definite.
    """

    def __init__(self, V):
        model = _as_model(V)
        model.design.check_connected()
        self._wk = 1.0 / (model.w + model.lam)
        self._c = (model.K - 1) / model.W
        self._q0 = int(model.st.q_k[0])
        super().__init__(model, self._apply_x, "asymptotic inverse")

    def _apply_x(self, z):
        out = z * (self._wk[:, None] if z.ndim == 2 else self._wk)
        out[: self._q0] -= self._c * z[: self._q0].sum(axis=0)
        return out


def asymptotic_inverse(V):
    """Return the simple asymptotic approximation of ``V^{-1}`` (Section 7b).

    Parameters
    ----------
    V : covariance operator
        With ``.design``, ``.sigma2_e`` and ``.sigma2``.

    Returns
    -------
    AsymptoticInverse
        A symmetric LinearOperator, shape (n_obs, n_obs).

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> a, b = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    >>> codes = np.repeat(np.vstack([a.ravel(), b.ravel()]), 2, axis=1)
    >>> V = KhatriRaoCovariance(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.5])
    >>> A = asymptotic_inverse(V).todense()
    >>> Vinv = balanced_spectrum(V.design, 1.0, [0.5, 0.5]).inverse().todense()
    >>> float(np.linalg.norm(A - Vinv) / np.linalg.norm(Vinv)) < 2e-3
    True
    """
    return AsymptoticInverse(V)
