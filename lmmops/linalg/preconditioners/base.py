"""What every preconditioner shares: the :class:`Preconditioner` base class and its SPD
LinearOperator, the level-space and observation-space bases, and small helpers.

The families (:mod:`~lmmops.linalg.preconditioners.simple`,
:mod:`~lmmops.linalg.preconditioners.spectral`,
:mod:`~lmmops.linalg.preconditioners.gauss_seidel`,
:mod:`~lmmops.linalg.preconditioners.amg`, :mod:`~lmmops.linalg.preconditioners.lowrank`,
:mod:`~lmmops.linalg.preconditioners.observation`) build on this module;
:mod:`~lmmops.linalg.preconditioners.registry` maps the kind names to them.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator


def _is_level(A):
    return hasattr(A, "lift") and hasattr(A, "lambdas") and hasattr(A, "design")


def _is_covariance(A):
    return hasattr(A, "level_space") and hasattr(A, "sigma2_e") and hasattr(A, "design")


def _col(x):
    """Return (2-d array, was_1d)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        return x[:, None], True
    return x, False


class _PrecondOperator(LinearOperator):
    """The SPD LinearOperator of a :class:`Preconditioner` (``_matvec``/``_matmat``)."""

    def __init__(self, owner):
        super().__init__(dtype=np.float64, shape=owner.shape)
        self.args = (owner,)

    def _matvec(self, x):
        x = np.asarray(x)
        if np.iscomplexobj(x):
            return self._matvec(x.real) + 1j * self._matvec(x.imag)
        return self.args[0]._apply(np.asarray(x, np.float64).reshape(-1, 1))[:, 0]

    def _matmat(self, X):
        X = np.asarray(X)
        if np.iscomplexobj(X):
            return self._matmat(X.real) + 1j * self._matmat(X.imag)
        return self.args[0]._apply(np.ascontiguousarray(X, dtype=np.float64))

    def _adjoint(self):
        return self

    _transpose = _adjoint

    def __repr__(self):
        return f"<{self.shape[0]}x{self.shape[1]} {self.args[0].kind} preconditioner>"


class Preconditioner:
    """Base class of the objects returned by :func:`build`.

    Attributes
    ----------
    kind : str
    space : {'level', 'observation'}
    shape : tuple of int
    setup_seconds : float
        Wall time of the construction.
    """

    kind = "?"
    space = "level"

    def aspreconditioner(self):
        """The SPD LinearOperator approximating ``A^{-1}`` (for ``cg(..., M=...)``).

        Returns
        -------
        scipy.sparse.linalg.LinearOperator
            Symmetric positive definite, with ``_matvec`` and a block ``_matmat``.
        """
        return _PrecondOperator(self)

    def solve(self, r):
        """Apply the approximate inverse to ``r`` of shape (n,) or (n, m).

        Parameters
        ----------
        r : ndarray

        Returns
        -------
        ndarray, shape of ``r``
        """
        R, one = _col(r)
        out = self._apply(np.ascontiguousarray(R))
        return out[:, 0] if one else out

    def logdet(self):
        """``log det`` of the approximation of ``A`` this preconditioner inverts.

        Useful as a control variate: ``log|A| = logdet() + log|P^{1/2} A P^{1/2}|``.

        Returns
        -------
        float

        Raises
        ------
        NotImplementedError
            When it is not both exact and cheap for this kind.
        """
        raise NotImplementedError(
            f"logdet() is not available for kind={self.kind!r}: the determinant of this "
            "preconditioner is not cheap and exact; estimate log|A| with "
            "lmmops.linalg.trace.slq_logdet instead"
        )

    def describe(self):
        """One-paragraph description: kind, space, sizes, parameters, setup time.

        Returns
        -------
        str
        """
        return (
            f"{self.kind} preconditioner ({self.space} space, n={self.shape[0]}): "
            f"{self._details()}; setup {self.setup_seconds:.3g} s"
        )

    def _details(self):
        return ""

    def __repr__(self):
        return f"<{type(self).__name__}: {self.describe()}>"


# ---------------------------------------------------------------------------- level space
class _Level(Preconditioner):
    """Common level-space data of ``M = Z'Z + Lambda``."""

    space = "level"

    def __init__(self, M):
        self.M = M
        self.design = M.design
        self.shape = M.shape
        self.K = self.design.n_factors
        self.offsets = np.asarray(self.design.offsets)
        self.counts = [np.asarray(self.design.counts(k), dtype=np.float64)
                       for k in range(self.K)]
        self.lambdas = np.asarray(M.lambdas, dtype=np.float64)
        self.n = float(self.design.n_obs)
        self.diag = np.concatenate([c + lam for c, lam in zip(self.counts, self.lambdas)])

    def block(self, x, k):
        return x[self.offsets[k] : self.offsets[k + 1]]

    # B X (the approximation itself), for the low-rank deflation
    def _forward(self, X):  # pragma: no cover - overridden where used
        raise NotImplementedError


# ---------------------------------------------------------------------------- observation
class _Observation(Preconditioner):
    space = "observation"

    def __init__(self, V):
        self.V = V
        self.shape = V.shape


# ------------------------------------------------------------------------------- helpers
def _csr_product(kernel, A, X):
    """``A X`` for a CSR ``A`` and a 2-d ``X`` by a :func:`kernels.get_csr_matmat` kernel."""
    out = np.empty((A.shape[0], X.shape[1]))
    kernel(A.indptr, A.indices, A.data, np.ascontiguousarray(X), out)
    return out


def _largest_factor(design):
    """The factor the Schur-complement kinds eliminate (the first with the most levels)."""
    return int(np.argmax([int(x) for x in design.n_levels]))


def _count_table(N):
    """A CSR count table with its (integer) counts stored as float32: exact below 2^24,
    and a third less memory traffic per pass (the kernels accumulate in float64)."""
    if N.nnz and N.data.max() >= 2**24:
        return N
    return sp.csr_matrix((N.data.astype(np.float32), N.indices, N.indptr), shape=N.shape)
