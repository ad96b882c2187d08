"""The observation-space preconditioners of ``V``: D1 (``spectral``), ``V^{-1}`` by the
dense Schur complement (``exact`` when it fits, and ``lowrank``, D1 plus its complete
correction), ``exact`` by an inner level-space PCG, a wrapped
:class:`~lmmops.paper.lowrank.ExactInverse` (``lowrank``, ``form='woodbury'``) and a
lifted level-space kind (``lifted``).

The two kinds that run a level-space preconditioner inside (``exact`` by inner PCG and
``lifted``) are given it, built by :mod:`~lmmops.linalg.preconditioners.registry`, so this
module does not depend on the registry.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lmmops.errors import ArgumentError
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.krylov import block_cg
from lmmops.linalg.operators import SparseLevelOperator
from lmmops.linalg.preconditioners.base import (
    _count_table,
    _csr_product,
    _largest_factor,
    _Observation,
)
from lmmops.linalg.preconditioners.spectral import (
    _normalised_svd,
    _reference_totals,
    _schur_eigen,
)


class _ObsOperatorWrap(_Observation):
    """Wraps an SPD LinearOperator of lmmops.spectral/lowrank (D1, ExactInverse)."""

    def __init__(self, V, kind, op, logdet_fn, details):
        super().__init__(V)
        self.kind = kind
        self.op = op
        self._logdet_fn = logdet_fn
        self._details_text = details

    def _apply(self, X):
        return np.asarray(self.op.matmat(X)).reshape(X.shape)

    def logdet(self):
        return float(self._logdet_fn())

    def _details(self):
        return self._details_text


class _SchurObservation(_Observation):
    r"""Observation kinds applied as ``s_e^{-2}(b - Z B^{-1} Z'b)`` with ``B`` eliminated
    onto all factors but the largest.

    ``B = [[A_L, N_LR], [N_RL, B_RR]]``, where ``L`` is the factor with the most levels
    and ``A_L`` is diagonal (every observation has one level of ``L``, so ``Z_L'Z_L``
    is). With ``a_L = A_L^{-1}`` the level solve is ``t = z_R - N_RL a_L z_L``,
    ``u_R = S^{-1} t`` (the dense part, per subclass) and ``u_L = a_L (z_L - N_LR u_R)``: one
    application is ``Z'b`` and ``Z u`` (the two row passes of a V matvec), two passes
    over the non-empty cells and one dense product on the ``q_R = q - q_L`` remaining
    levels.
    """

    def _init_schur(self, V):
        design = V.design
        self.M = V.level_space()
        K = design.n_factors
        n_levels = [int(x) for x in design.n_levels]
        L = _largest_factor(design)
        R = [k for k in range(K) if k != L]
        off = np.asarray(design.offsets)
        self._L, self._R = L, R
        self._slL = slice(int(off[L]), int(off[L + 1]))
        if K == 1:  # M is diagonal: nothing is left to eliminate onto
            self._idxR = slice(int(off[L + 1]), int(off[L + 1]))
            self._NLR = sp.csr_matrix((n_levels[L], 0))
            self._NRL = sp.csr_matrix((0, n_levels[L]))
        elif K == 2:
            self._idxR = slice(int(off[R[0]]), int(off[R[0] + 1]))
            self._NLR, self._NRL = design.crosstab(L, R[0]), design.crosstab(R[0], L)
        else:
            self._idxR = np.concatenate([np.arange(off[k], off[k + 1]) for k in R])
            NLR = sp.hstack([design.crosstab(L, k) for k in R], format="csr")
            self._NLR, self._NRL = NLR, NLR.T.tocsr()
        self._NLR, self._NRL = _count_table(self._NLR), _count_table(self._NRL)
        self.q_R = int(sum(n_levels[k] for k in R))
        par = bool(self.M.parallel)
        self._csr_kernel = kernels.get_csr_matmat(par)
        self._matmat, self._tmatmat = kernels.get_dense_kernels(par)
        self._sym_matmat = kernels.sym_matmat_parallel if par else kernels.sym_matmat_serial
        self._nb = kernels.n_blocks(par)

    def _dense_solve(self, t):  # pragma: no cover - overridden
        raise NotImplementedError

    def _sym_solve(self, t):
        """``Sinv t`` for the dense symmetric ``self._Sinv`` (its lower triangle is read)."""
        k = t.shape[1]
        out = np.empty_like(t)
        self._sym_matmat(self._Sinv, np.ascontiguousarray(t.T),
                         np.empty((self._nb, k, t.shape[0])), out)
        return out

    def _level_solve(self, Z):
        """``B^{-1} Z`` for Z of shape (q, k)."""
        aL = self._aL[:, None]
        ZL, ZR = Z[self._slL], Z[self._idxR]
        t = _csr_product(self._csr_kernel, self._NRL, ZL * aL)
        np.subtract(ZR, t, out=t)
        xR = self._dense_solve(t)
        yL = _csr_product(self._csr_kernel, self._NLR, xR)
        np.subtract(ZL, yL, out=yL)
        yL *= aL
        out = np.empty_like(Z)
        out[self._slL] = yL
        out[self._idxR] = xR
        return out

    def _apply(self, X):
        M = self.M
        if X.shape[1] == 1:
            x = np.ascontiguousarray(X[:, 0])
            return M.lift(self._level_solve(M.rhs(x)[:, None])[:, 0], x)[:, None]
        return M.lift(self._level_solve(M.rhs(X)), X)


class _SpectralObservation(_SchurObservation):
    r"""D1 in observation space: ``V check^{-1} = s_e^{-2}(I - Z Kc^{-1} Z')``.

    ``Kc = Z'Z + blkdiag(lambda_A r / r̄, lambda_B c / c̄)`` is the level-space matrix of the
    modified covariance (D1's reference margins). In the normalised coordinates
    ``D^{-1/2} Kc D^{-1/2} = [[gamma_L I, K], [K', gamma_S I]]`` (``K`` the normalised count
    table, ``L``/``S`` the factor with more/fewer levels) it is inverted through the Schur
    complement on the smaller factor, ``S = gamma_S I - K'K / gamma_L``, whose eigenvectors
    are the right singular vectors ``Psi`` of ``K``:
    ``S^{-1} = I / gamma_S + Psi diag(1 / (gamma_S - rho^2 / gamma_L) - 1 / gamma_S) Psi'``.
    With every triplet (``rank = min(g, h)``) this is exactly ``V check^{-1}``. With the top
    ``rank`` triplets the discarded ``rho_k^2 / gamma_L`` are dropped from ``K'K``, which
    makes the approximate ``B`` satisfy ``B - Kc = blkdiag(0, tail / gamma_L) >= 0``, so
    ``B > Z'Z`` and the preconditioner stays SPD (unlike truncating ``K`` itself); its error
    is second order in the discarded ``rho_k``.

    The eigenpairs come from the dense ``m x m`` matrix ``K'K`` (``m = min(g, h)``, no
    ``g x h`` array; once per design, cached) when ``m <= max_full`` (default 4000), else
    from a truncated sparse SVD (default rank 50). The default keeps every triplet when it
    can: in observation space a level-space error is amplified by the level counts times
    the variance ratio (:ref:`theory-preconditioning`), and the measured iteration counts of
    truncated forms grow sharply at large ratios.

    Cost of one application: ``Z'b`` and ``Z u`` (the two passes over the rows of one V
    matvec), two passes over the non-empty cells, and a dense product: at full rank one
    symmetric ``m x m`` product with ``S^{-1}``, formed once per build (a rank-``m``
    update, about 1.3 s at ``m = 4000``; the eigenvectors themselves are cached per
    design), else ``4 m rank`` flops with the kept eigenvectors. At n = 10^6 that is
    1.3-1.7 V matvecs with several observations per cell and 2.1-2.8 with one (the solver
    study measures it).
    """

    kind = "spectral"

    def __init__(self, V, rank=None, reference="mean", rng=0, max_full=4000):
        super().__init__(V)
        design = V.design
        design.check_connected()
        self._init_schur(V)
        g, h = (int(x) for x in design.n_levels)
        m = min(g, h)
        if rank is None:
            # every triplet when the dense m x m eigenproblem is affordable: in observation
            # space the truncation error is amplified by the level counts (docs/theory.rst,
            # 'Where to precondition')
            rank = m if m <= max_full else min(50, m - 1)
        self.rank = int(min(int(rank), m))
        if self.rank < 1:
            raise ArgumentError(f"rank must be >= 1, got {rank}")
        S, L = self._R[0], self._L  # the Schur complement is formed on the smaller factor
        if m <= max_full or self.rank == m:
            rho, U = _schur_eigen(design, S)
            rho, U = rho[: self.rank], np.ascontiguousarray(U[:, : self.rank])
        else:
            Phi, rho, Psi = _normalised_svd(design, self.rank, rng)
            U = Psi if S == 1 else Phi
        counts = [np.asarray(design.counts(k), dtype=np.float64) for k in (0, 1)]
        lambdas = np.asarray(self.M.lambdas, dtype=np.float64)
        refs = _reference_totals(counts, reference)
        gam = [1.0 + lam / ref for lam, ref in zip(lambdas, refs)]
        self.reference_totals = tuple(refs)
        self.alpha, self.beta = gam
        self.rho = rho
        self._U = np.ascontiguousarray(U)
        self._gS, self._gL = gam[S], gam[L]
        self._coef = 1.0 / (self._gS - rho**2 / self._gL) - 1.0 / self._gS
        self._isq = [1.0 / np.sqrt(c) for c in counts]
        self._counts, self._lambdas, self._refs = counts, lambdas, refs
        self.full = self.rank == m
        self.m = m
        self._aL = self._isq[L] ** 2 / self._gL  # D_L^{-1} / gamma_L
        self._Sinv = None
        if self.full:  # one dense symmetric m x m inverse: half the traffic of U, U'
            W = sla.blas.dsyrk(1.0, self._U * np.sqrt(self._coef)[None, :], lower=1)
            W[np.diag_indices(m)] += 1.0 / self._gS
            isq = self._isq[S]
            W *= isq[:, None]
            W *= isq[None, :]
            self._Sinv = np.ascontiguousarray(W)  # lower triangle valid

    def _dense_solve(self, t):
        """``S^{-1} t`` for D1's Schur complement, in place of ``t`` where it can."""
        if self._Sinv is not None:
            return self._sym_solve(t)
        isq = self._isq[self._R[0]][:, None]
        t *= isq
        k = t.shape[1]
        ct = np.empty((k, self.rank))
        self._tmatmat(self._U, t, np.empty((self._nb, k, self.rank)), ct)
        ct *= self._coef[None, :]
        xs = np.empty_like(t)
        self._matmat(self._U, ct, xs)
        t *= 1.0 / self._gS
        xs += t
        xs *= isq
        return xs

    def logdet(self):
        if not self.full:
            raise NotImplementedError(
                f"logdet() of observation-space kind='spectral' is exact only with every "
                f"SVD triplet (rank={self.m}); this one keeps {self.rank}. Build it with "
                f"rank={self.m}, or use lmmops.paper.spectral.ModifiedCovariance(V).logdet()"
            )
        n = float(self.V.design.n_obs)
        s2e = float(self.V.sigma2_e)
        val = n * np.log(s2e)
        for c, lam, ref in zip(self._counts, self._lambdas, self._refs):
            # log|Gc / s_e^2| + log|D| = sum_i log(ref / (lam c_i)) + sum_i log c_i
            val += c.size * float(np.log(ref / lam))
        S, L = self._R[0], self._L
        qL, qS = self._counts[L].size, self._counts[S].size
        val += qL * np.log(self._gL) + (qS - self.rank) * np.log(self._gS)
        val += float(np.sum(np.log(self._gS - self.rho**2 / self._gL)))
        return val

    def _details(self):
        rho2 = self.rho[1] if self.rho.size > 1 else float("nan")
        exact = ("exact V check^{-1}" if self.full else
                 f"Schur complement truncated to {self.rank} of {self.m} triplets, SPD")
        return (f"D1 modified-covariance inverse, {exact} (rho_2={rho2:.3g}); cost one "
                f"V matvec + 2 passes over the cells + O(min(g, h) rank)"
                + ("; logdet() is log|V check|" if self.full else ""))


def _schur_gram_flops(design):
    """Flops of the one pass that forms :class:`_DirectObservation`'s Schur complement.

    ``sum_i nnz_i^2`` over the rows of ``N_LR`` (:func:`kernels.weighted_gram`, serial),
    with ``L`` the largest factor; the dense Cholesky is bounded by ``max_dense``.
    """
    L = _largest_factor(design)
    nnz = np.zeros(int(design.n_levels[L]))
    for k in range(design.n_factors):
        if k != L:
            nnz += np.diff(design.crosstab(L, k).indptr)
    return float(np.dot(nnz, nnz))


class _DirectObservation(_SchurObservation):
    r"""``V^{-1}`` exactly, by the dense Schur complement of M on all but its largest factor.

    ``M = [[D_L, N_LR], [N_RL, M_RR]]`` with ``D_L = diag(c_L + lambda_L)``; the Schur
    complement ``S = M_RR - N_RL D_L^{-1} N_LR`` (``q_R x q_R``, SPD) is formed in one
    pass over the cells (:func:`kernels.weighted_gram`) and inverted once by Cholesky.
    Then ``V^{-1} b = lift(M^{-1} Z'b, b)`` costs what D1 costs (see
    :class:`_SchurObservation`) and ``log|V|`` is exact: ``log|M| = sum log D_L + log|S|``.

    For K = 2 this is also D1 plus its complete correction: ``M - Kc`` is diagonal (the
    levels whose totals differ from D1's reference), and eliminating the larger factor
    turns it into a correction of D1's ``m x m`` Schur complement, so the corrected
    complement is ``S`` itself.
    """

    def __init__(self, V, kind="exact", max_dense=4000):
        super().__init__(V)
        self.kind = kind
        self._init_schur(V)
        design, M = V.design, self.M
        q_R = self.q_R
        if q_R > max_dense:
            raise ArgumentError(
                f"the direct route needs a dense {q_R} x {q_R} Schur complement (the levels "
                f"of every factor but the largest), above max_dense={max_dense}"
            )
        check_dense((q_R, q_R), f"the dense Schur complement of kind={kind!r}")
        lam = np.asarray(M.lambdas, dtype=np.float64)
        L, R = self._L, self._R
        dL = np.asarray(design.counts(L), dtype=np.float64) + lam[L]
        self._aL = 1.0 / dL
        NLR = self._NLR
        S = np.empty((q_R, q_R))
        kernels.weighted_gram(NLR.indptr.astype(np.int64), NLR.indices.astype(np.int64),
                              NLR.data.astype(np.float64), self._aL, S)
        np.negative(S, out=S)
        loc = np.cumsum([0] + [int(design.n_levels[k]) for k in R])
        for i, k in enumerate(R):
            idx = np.arange(loc[i], loc[i + 1])
            S[idx, idx] += np.asarray(design.counts(k), dtype=np.float64) + lam[k]
            for j in range(i + 1, len(R)):
                block = design.crosstab(k, R[j]).toarray()
                S[loc[i] : loc[i + 1], loc[j] : loc[j + 1]] += block
                S[loc[j] : loc[j + 1], loc[i] : loc[i + 1]] += block.T
        self._logdet_M = float(np.sum(np.log(dL)))
        self._Sinv = np.zeros((0, 0))
        if q_R:
            chol = sla.cho_factor(S, lower=True, overwrite_a=True, check_finite=False)
            self._logdet_M += 2.0 * float(np.sum(np.log(np.diag(chol[0]))))
            Sinv = sla.cho_solve(chol, np.eye(q_R), check_finite=False)
            self._Sinv = np.ascontiguousarray(0.5 * (Sinv + Sinv.T))

    def _dense_solve(self, t):
        return self._sym_solve(t)

    def logdet(self):
        return self.M.logdet_V(self._logdet_M)

    def _details(self):
        names = self.V.design.names
        lead = ("D1 + its complete correction, " if self.kind == "lowrank" else "")
        return (f"{lead}exact V^{{-1}} by the dense {self.q_R} x {self.q_R} Schur complement of "
                f"M on the factors other than {names[self._L]!r} (Cholesky, once); cost one V "
                "matvec + 2 passes over the cells + O(q_R^2); logdet() = log|V|")


class _ExactObservation(_Observation):
    """``V^{-1}`` through an inner level-space PCG to ``inner_rtol``, lifted."""

    kind = "exact"

    def __init__(self, V, M, inner, inner_rtol=1e-10, inner_maxiter=None):
        # M = V.level_space() and inner, a level-space preconditioner built on it by the
        # registry (``build(V, kind='exact', inner=...)``)
        super().__init__(V)
        self.M = M
        self._A = SparseLevelOperator(self.M)  # same matrix, O(cells) products
        self.inner = inner
        self._prec = self.inner.aspreconditioner()
        self.inner_rtol = float(inner_rtol)
        self.inner_maxiter = inner_maxiter
        self.inner_iterations = []

    def _apply(self, X):
        rhs = self.M.rhs(X)
        res = []
        U, info = block_cg(self._A, rhs, rtol=self.inner_rtol, maxiter=self.inner_maxiter,
                           M=self._prec, residuals=res)
        self.inner_iterations.append(len(res) - 1)
        return self.M.lift(U, X)

    def _details(self):
        return (f"inner level-space PCG ({self.inner.kind}) to rtol {self.inner_rtol:g}, "
                "lifted: V^{-1} b = lift(M^{-1} Z'b, b)")


class _Lifted(_Observation):
    """``s_e^{-2} (I - Z B^{-1} Z')`` for a level-space approximation ``B`` of M."""

    kind = "lifted"

    def __init__(self, V, M, base):
        # M = V.level_space() and base, a level-space preconditioner built on it by the
        # registry (``build(V, kind='lifted', base=...)``)
        super().__init__(V)
        self.M = M
        self.base = base
        self.kind = f"lifted_{self.base.kind}"

    def _apply(self, X):
        return self.M.lift(self.base._apply(self.M.rhs(X)), X)

    def _details(self):
        return (f"{self.base.kind} lifted from level space; a documented negative result "
                "(docs/theory.rst, 'Where to precondition'): badly conditioned, possibly "
                "indefinite")
