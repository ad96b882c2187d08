"""The level-space ``spectral`` preconditioner (D1's canonical basis, K = 2) and the
normalised count table's SVD, D1's reference totals and the canonical-correlation
eigenpairs, which the observation-space D1 (:mod:`~lmmops.linalg.preconditioners.observation`)
uses too."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

from lmmops.errors import ArgumentError, DesignError
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.preconditioners.base import _Level
from lmmops.paper.spectral import _design_cache, _reference_total, design_svd


def _normalised_svd(design, rank, rng=0):
    """Top-``rank`` SVD triplets of ``K_N = D_r^{-1/2} N D_c^{-1/2}`` (theta-free, cached).

    :func:`lmmops.paper.spectral.design_svd`: the one implementation and cache, shared
    with :class:`~lmmops.paper.spectral.ModifiedCovariance`.
    """
    return design_svd(design, rank, rng)


def _reference_totals(counts, reference):
    """D1's reference totals ``(r̄, c̄)``: 'mean', 'harmonic' or a given pair."""
    if isinstance(reference, str):

        return [_reference_total(c, reference) for c in counts]
    return [float(x) for x in reference]


def _schur_eigen(design, S):
    """All ``min(g, h)`` canonical correlations from the smaller factor's side (cached).

    The eigenpairs of ``K'K = D_S^{-1/2} N_SL D_L^{-1} N_LS D_S^{-1/2}`` (dense, m x m, with
    ``m`` the smaller level count) are ``(rho_k^2, psi_k)``; no g x h array is formed.
    """
    cache = _design_cache(design)  # the same per-design cache as the normalised SVD
    key = ("schur_eigen", S)
    if key not in cache:
        L = 1 - S
        m = int(design.n_levels[S])
        check_dense((m, m), "the dense m x m canonical-correlation matrix of kind='spectral'")
        cS = np.asarray(design.counts(S), dtype=np.float64)
        cL = np.asarray(design.counts(L), dtype=np.float64)
        N = design.crosstab(L, S)  # C = N' D_L^{-1} N, formed densely in one pass over N
        C = np.empty((m, m))
        kernels.weighted_gram(N.indptr.astype(np.int64), N.indices.astype(np.int64),
                              N.data.astype(np.float64), 1.0 / cL, C)
        C *= 1.0 / np.sqrt(cS)[:, None]
        C *= 1.0 / np.sqrt(cS)[None, :]
        ev, U = np.linalg.eigh(0.5 * (C + C.T))
        ev, U = ev[::-1], U[:, ::-1]
        cache[key] = (np.sqrt(np.clip(ev, 0.0, 1.0)), np.ascontiguousarray(U))
    return cache[key]


class _Spectral(_Level):
    r"""``B = diag(d) + F Om F'`` from the top SVD triplets of the normalised table.

    ``F = blkdiag(D_r^{1/2} Phi_r, D_c^{1/2} Psi_r)``, ``Om = [[0, diag rho], [diag rho, 0]]``
    (so ``F Om F'`` is the rank-``r`` approximation of the off-diagonal count blocks), and
    ``d`` the exact margins ``r + lambda_A``, ``c + lambda_B`` (``margins='exact'``) or
    D1's reference margins ``alpha r``, ``beta c`` with ``alpha = 1 + lambda_A / r̄``
    (``margins='reference'``: then ``B`` is the level-space matrix of V check itself).
    """

    kind = "spectral"

    def __init__(self, M, rank=None, margins="exact", reference="mean", rng=0):
        super().__init__(M)
        if self.K != 2:
            raise DesignError(
                f"kind='spectral' (D1) needs exactly two crossed factors, got K={self.K}: "
                "the two-projection spectral decomposition has no closed form for three or "
                "more; use kind='proportional' or 'lowrank'"
            )
        self.design.check_connected()
        g, h = self.design.n_levels
        m = min(g, h)
        self.rank = int(min(m, 20 if rank is None else rank))
        if self.rank < 1:
            raise ArgumentError(f"rank must be >= 1, got {rank}")
        Phi, rho, Psi = _normalised_svd(self.design, self.rank, rng)
        r, c = self.counts
        if margins == "exact":
            d = self.diag
        elif margins == "reference":
            rbar, cbar = _reference_totals([r, c], reference)
            d = np.concatenate([r * (1 + self.lambdas[0] / rbar),
                                c * (1 + self.lambdas[1] / cbar)])
        else:
            raise ArgumentError(f"margins must be 'exact' or 'reference', got {margins!r}")
        self.margins = margins
        self.d = d
        self.rho = rho
        dA, dB = d[:g], d[g:]
        self._FA = np.sqrt(r)[:, None] * Phi  # D_r^{1/2} Phi
        self._FB = np.sqrt(c)[:, None] * Psi
        self._UA = self._FA / dA[:, None]
        self._UB = self._FB / dB[:, None]
        k = self.rank
        GA = self._FA.T @ self._UA
        GB = self._FB.T @ self._UB
        Om = np.zeros((2 * k, 2 * k))
        Om[:k, k:] = np.diag(rho)
        Om[k:, :k] = np.diag(rho)
        core = np.eye(2 * k)
        core[:k, k:] += np.diag(rho) @ GB
        core[k:, :k] += np.diag(rho) @ GA
        self._Om = Om
        self._lu = sla.lu_factor(core)
        self._ld_core = float(np.linalg.slogdet(core)[1])
        self._g = g

    def _apply(self, X):
        g = self._g
        Y = X / self.d[:, None]
        c = np.vstack([self._UA.T @ X[:g], self._UB.T @ X[g:]])
        s = sla.lu_solve(self._lu, self._Om @ c)
        k = self.rank
        Y[:g] -= self._UA @ s[:k]
        Y[g:] -= self._UB @ s[k:]
        return Y

    def _forward(self, X):
        g, k = self._g, self.rank
        c = np.vstack([self._FA.T @ X[:g], self._FB.T @ X[g:]])
        s = self._Om @ c
        out = self.d[:, None] * X
        out[:g] += self._FA @ s[:k]
        out[g:] += self._FB @ s[k:]
        return out

    def logdet(self):
        return float(np.sum(np.log(self.d)) + self._ld_core)

    def _details(self):
        rho2 = self.rho[1] if self.rho.size > 1 else float("nan")
        last = self.rho[-1]
        return (f"D1 canonical basis, rank {self.rank} (rho_2={rho2:.3g}, "
                f"rho_r={last:.3g}), {self.margins} margins; cost O(q rank)")
