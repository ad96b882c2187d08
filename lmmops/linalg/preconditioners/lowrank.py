"""The level-space ``lowrank`` preconditioner: a base (``proportional``, ``spectral`` or
``jacobi``) plus a rank-``r`` deflation from the extreme generalized eigenpairs
``M v = mu B v``."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import LinearOperator, eigsh

from lmmops.errors import ArgumentError
from lmmops.guard import check_dense
from lmmops.linalg.preconditioners.base import _Level
from lmmops.linalg.preconditioners.simple import _Jacobi, _Proportional
from lmmops.linalg.preconditioners.spectral import _Spectral

#: the level kinds a ``lowrank`` preconditioner deflates (its ``base``)
_BASES = {
    "proportional": _Proportional,
    "spectral": _Spectral,
    "jacobi": _Jacobi,
}


class _LowRank(_Level):
    r"""A base ``B`` plus a rank-``r`` deflation: ``P = B^{-1} + W (Mu^{-1} - I) W'``.

    ``(W, Mu)`` are the ``r`` extreme generalized eigenpairs ``M w = mu B w``
    (``W'BW = I``), computed by ARPACK, or densely when ``r`` is a large fraction of ``q``.
    Then ``P M w_j = w_j`` for the deflated pairs, ``P`` acts as ``B^{-1}`` elsewhere,
    ``P`` is SPD for any ``B``-orthonormal ``W``, and ``P = M^{-1}`` once ``r`` reaches
    the number of eigenvalues ``mu != 1`` (at most ``rank(M - B)``).
    """

    kind = "lowrank"

    def __init__(self, M, rank=None, base=None, tol=1e-4, rng=0, **base_options):
        super().__init__(M)
        if base is None:
            base = "spectral" if self.K == 2 and self.design.is_connected else "proportional"
        if base not in ("proportional", "spectral", "jacobi"):
            raise ArgumentError(
                f"lowrank base must be 'proportional', 'spectral' or 'jacobi', got {base!r}"
            )
        self.base_kind = base
        self.base = _BASES[base](M, **base_options)
        q = self.shape[0]
        r = 10 if rank is None else int(rank)
        if r < 1:
            raise ArgumentError(f"rank must be >= 1, got {rank}")
        self.rank = min(r, q)
        if self.rank >= q // 3 or q <= 400:
            check_dense((q, q), "the dense generalized eigenproblem of kind='lowrank'")
            Md = M.todense()
            Bd = self.base._forward(np.eye(q))
            Bd = 0.5 * (Bd + Bd.T)
            mu, W = sla.eigh(Md, Bd)
            order = np.argsort(-np.abs(np.log(mu)))[: self.rank]
            mu, W = mu[order], W[:, order]
        else:
            check_dense((q, 2 * self.rank + 2), "the ARPACK basis of kind='lowrank'")
            Bop = LinearOperator(
                (q, q), matvec=lambda x: self.base._forward(x.reshape(-1, 1))[:, 0],
                dtype=np.float64)
            Binv = LinearOperator(
                (q, q), matvec=lambda x: self.base._apply(x.reshape(-1, 1))[:, 0],
                dtype=np.float64)
            v0 = np.random.default_rng(rng).standard_normal(q)
            k = max(self.rank, 2)
            mu, W = eigsh(M, k=k, M=Bop, Minv=Binv, which="BE", tol=tol, v0=v0)
            # Rayleigh-Ritz in the B inner product: exact B-orthonormality, mu > 0
            BW = self.base._forward(W)
            L = np.linalg.cholesky(0.5 * ((W.T @ BW) + (W.T @ BW).T))
            W = sla.solve_triangular(L, W.T, lower=True).T
            H = W.T @ M.matmat(W)
            mu, S = np.linalg.eigh(0.5 * (H + H.T))
            W = W @ S
            order = np.argsort(-np.abs(np.log(mu)))[: self.rank]
            mu, W = mu[order], W[:, order]
        self.mu = mu
        self._W = np.ascontiguousarray(W)
        self._c = 1.0 / mu - 1.0

    def _apply(self, X):
        out = self.base._apply(X)
        out += self._W @ (self._c[:, None] * (self._W.T @ X))
        return out

    def _details(self):
        lo, hi = (float(self.mu.min()), float(self.mu.max())) if self.mu.size else (1, 1)
        return (f"{self.base_kind} base + rank-{self.rank} deflation of M w = mu B w "
                f"(deflated mu in [{lo:.3g}, {hi:.3g}]); cost O(q rank)")
