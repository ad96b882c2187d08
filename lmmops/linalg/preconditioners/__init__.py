r"""Preconditioners for the level-space matrix M and the covariance V of a crossed design.

:func:`build` is the single entry point (pyamg's shape): it returns an object with
``.aspreconditioner()`` (an SPD :class:`~scipy.sparse.linalg.LinearOperator` approximating
the inverse of the operator it was built for, with a real block ``_matmat``),
``.logdet()`` (``log det`` of the approximation, where that is exact and cheap) and
``.describe()``.

Level space, ``M = Z'Z + Lambda`` (a :class:`~lmmops.linalg.operators.LevelSpaceOperator`):

- ``"identity"`` (any K): I, no preconditioning;
- ``"jacobi"`` (any K): ``diag(M)``, the exact diagonal blocks ``D_k + lambda_k``;
- ``"proportional"`` (any K): D2, every ``N_kl`` replaced by ``r_k r_l'/n`` (closed form);
- ``"spectral"`` (K = 2): D1's canonical basis, the top-``rank`` SVD triplets of
  ``D_r^{-1/2} N D_c^{-1/2}`` (once per design), with the exact margins (default) or D1's
  reference margins;
- ``"lowrank"`` (any K): a base (``"proportional"``/``"spectral"``/``"jacobi"``) plus a
  rank-``rank`` correction from the extreme generalized eigenpairs ``M v = mu B v``; exact
  at full rank;
- ``"block_gauss_seidel"`` (any K): symmetric block Gauss-Seidel over the factor blocks;
- ``"amg"`` (any K): an aggregation hierarchy from pyamg's smoothed-aggregation solver
  (K = 2: on the sign-flipped M, a shifted bipartite graph Laplacian), by default with
  unsmoothed (plain) aggregates, ``smooth=None``; ``smooth="jacobi"`` gives classical
  smoothed aggregation.

Observation space, ``V`` (a :class:`~lmmops.linalg.operators.CovarianceOperator`):

- ``"identity"``;
- ``"spectral"``: D1, the exact inverse of the modified covariance ``V check``
  (:class:`lmmops.paper.spectral.ModifiedCovariance`; K = 2), applied through the Schur
  complement on the smaller factor; with ``rank`` below ``min(g, h)`` a truncation that
  stays SPD;
- ``"exact"``: ``V^{-1}`` itself. When the levels of every factor but the largest fit a
  dense Schur complement (``q_R <= max_dense``, default 4000, and a one-pass setup of at
  most ``max_gram_flops``), by that complement, factored once (any K; ``logdet()`` is
  ``log|V|``); otherwise (or with ``inner=<level kind>``) by an inner level-space PCG to a
  tight tolerance, lifted (``V^{-1} b = lift(M^{-1} Z'b, b)``). Outer CG then needs 1-2
  iterations;
- ``"lowrank"``: D1 plus its complete correction (K = 2). ``M - Kc`` is diagonal (the
  levels whose totals differ from D1's reference), so after eliminating the larger factor
  the correction lands in D1's ``m x m`` Schur complement (``m = min(g, h) <= max_rank``)
  and the corrected complement is factored once: the result is ``V^{-1}`` at D1's cost.
  ``form="woodbury"`` applies the explicit rank-``t`` Woodbury form of
  :class:`lmmops.paper.lowrank.ExactInverse` instead (several V matvecs per application);
- ``"lifted"``: a level-space kind ``base`` lifted as ``s_e^{-2}(I - Z B^{-1} Z')``. A
  documented negative result (:ref:`theory-preconditioning`): unless ``B`` is essentially ``M``,
  the lifted operator is a disastrous preconditioner of V on skewed designs. It exists for
  the solver study.

Cost of one application, in matvecs of the preconditioned operator (measured at n = 10^6
and 10^7 in ``docs/studies/solver_study_large.md``): jacobi, proportional, spectral and
lowrank work on q-vectors, 0.01-1.1 M matvecs; block Gauss-Seidel makes two passes over
the non-empty cells (0.4-0.9). The observation kinds D1, direct ``"exact"`` and
``"lowrank"`` share one form, a Schur complement on all factors but the largest: the two
row passes of a V matvec, two passes over the non-empty cells and one dense symmetric
product on the ``q_R`` levels of the smaller factors; 1.3-1.7 V matvecs with several
observations per cell. With one observation per cell D1's two cell passes cost about
what V's two row passes cost: 1.9 V matvecs at n = 10^7, 2.2 at 10^6, where a V matvec
timed in a loop keeps its working set in this machine's L3 cache and a preconditioner
that also streams the count tables does not. ``"amg"`` runs a symmetric V-cycle whose
finest level makes four half passes over the cells, plus the grid transfers: with the
default plain aggregates 0.2-2.2 M matvecs at n = 10^6 and 0.9-1.5 at 10^7 (classical
smoothed aggregation, ``smooth="jacobi"``: 2.8-10; pyamg's own serial cycle,
``cycle="pyamg"``: 9-17). One kind runs a whole solve per application by definition and
is not held to two matvecs: ``"exact"`` through the inner PCG (when the Schur complement
does not fit) costs about 20 V matvecs, after which outer CG needs 1-2 iterations.

Every preconditioner is SPD; the tests check the dense eigenvalues on small designs and
``x'Px > 0`` at scale.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

from lmmops.errors import ArgumentError, ArgumentTypeError, DesignError
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.krylov import block_cg
from lmmops.linalg.operators import SparseLevelOperator
from lmmops.paper.lowrank import ExactInverse
from lmmops.paper.spectral import (
    _design_cache,
    _ProportionalCore,
    _reference_total,
    design_svd,
)

#: Level-space preconditioner chosen by ``solve_V(method="auto")`` (any number of factors).
#: Measured in docs/studies/solver_study.md: symmetric block Gauss-Seidel needs the fewest
#: iterations of the kinds without setup cost (4-8 on uniform, Poisson, missing-cell and
#: Zipf designs, 9-11 at variance ratio 10 or K = 3, against 5-15 for D2 and 8-22 for
#: Jacobi), and one application (two sweeps over the sparse cross-tabulations) costs less
#: than one product by M. It is the fastest route at n = 10^6 and 10^7. Exception: banded
#: ("staircase") designs, where the canonical correlations have a few outliers near 1 and
#: it needs about 20 iterations; pass ``preconditioner="spectral"`` (K = 2: 7) or
#: ``"amg"`` (8) there. AMG needs the fewest iterations everywhere but costs about two
#: products per application (a symmetric V-cycle) and a setup of its own.
AUTO_LEVEL_KIND = "block_gauss_seidel"


__all__ = [
    "LEVEL_KINDS",
    "OBSERVATION_KINDS",
    "Preconditioner",
    "apply_cost",
    "build",
]

LEVEL_KINDS = (
    "identity", "jacobi", "proportional", "spectral", "lowrank", "block_gauss_seidel", "amg",
)
OBSERVATION_KINDS = ("identity", "spectral", "exact", "lowrank", "lifted")



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


class _Identity(Preconditioner):
    kind = "identity"

    def __init__(self, A):
        self.space = "level" if _is_level(A) else "observation"
        self.shape = A.shape

    def _apply(self, X):
        return X.copy()

    def _forward(self, X):
        return X.copy()

    def logdet(self):
        return 0.0

    def _details(self):
        return "no preconditioning"


class _Jacobi(_Level):
    kind = "jacobi"

    def __init__(self, M):
        super().__init__(M)
        self._inv = 1.0 / self.diag

    def _apply(self, X):
        return X * self._inv[:, None]

    def _forward(self, X):
        return X * self.diag[:, None]

    def logdet(self):
        return float(np.sum(np.log(self.diag)))

    def _details(self):
        return "diag(M) = level counts + lambda_k; cost O(q)"


class _Proportional(_Level):
    r"""D2 for any K: ``M_prop = P + B (J - I) B' / n`` (:ref:`inverse-d2`)."""

    kind = "proportional"

    def __init__(self, M):
        super().__init__(M)
        self.core = _ProportionalCore(np.concatenate(self.counts), self.diag, self.offsets,
                                     self.n)
        self.alpha_k = self.core.alpha_k

    def _apply(self, X):
        return self.core.solve(X)

    def _forward(self, X):
        return self.core.matmul(X)

    def logdet(self):
        return self.core.logdet()

    def _details(self):
        return "D2, N_kl -> r_k r_l'/n, diagonal plus rank K (closed form); cost O(q)"


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


class _BlockGaussSeidel(_Level):
    r"""Symmetric block Gauss-Seidel over the factor blocks: ``B = (D+L) D^{-1} (D+U)``.

    The diagonal blocks ``D_k + lambda_k I`` are diagonal; the off-diagonal blocks are the
    sparse cross-tabulations ``N_kl`` (:meth:`CrossedDesign.crosstab`, built once per
    design and cached there), with ``nnz`` at most the number of non-empty cells.
    """

    kind = "block_gauss_seidel"

    def __init__(self, M):
        super().__init__(M)
        K = self.K
        self._N = {(k, l): self.design.crosstab(k, l) for k in range(K) for l in range(K)
                   if k != l}
        self.nnz = int(sum(N.nnz for N in self._N.values()))

    def _apply(self, X):
        K = self.K
        Y = np.empty_like(X)
        for k in range(K):  # forward: (D + L) y = x
            acc = self.block(X, k).copy()
            for l in range(k):
                acc -= self._N[k, l] @ self.block(Y, l)
            self.block(Y, k)[:] = acc / self.block(self.diag, k)[:, None]
        out = np.empty_like(X)
        for k in range(K - 1, -1, -1):  # backward: (D + U) x = D y
            acc = self.block(Y, k).copy()
            if k < K - 1:
                s = sum(self._N[k, l] @ self.block(out, l) for l in range(k + 1, K))
                acc -= s / self.block(self.diag, k)[:, None]
            self.block(out, k)[:] = acc
        return out

    def _forward(self, X):
        Y = np.empty_like(X)
        for k in range(self.K):  # (D + U) x
            acc = self.block(self.diag, k)[:, None] * self.block(X, k)
            for l in range(k + 1, self.K):
                acc = acc + self._N[k, l] @ self.block(X, l)
            self.block(Y, k)[:] = acc / self.block(self.diag, k)[:, None]
        out = np.empty_like(X)
        for k in range(self.K):  # (D + L) y
            acc = self.block(self.diag, k)[:, None] * self.block(Y, k)
            for l in range(k):
                acc = acc + self._N[k, l] @ self.block(Y, l)
            self.block(out, k)[:] = acc
        return out

    def logdet(self):
        # det((D+L) D^{-1} (D+U)) = det(D): the factors are block triangular with blocks D.
        return float(np.sum(np.log(self.diag)))

    def _details(self):
        return (f"symmetric block Gauss-Seidel over {self.K} factor blocks, sparse "
                f"cross-tabulations (nnz={self.nnz}); cost O(nnz) per application")


class _AMG(_Level):
    r"""An AMG V-cycle on the sparse M (sign-flipped for K = 2), hierarchy from pyamg.

    pyamg's :func:`pyamg.smoothed_aggregation_solver` builds the hierarchy (aggregates,
    prolongators ``P_l``, Galerkin coarse matrices). By default the prolongators are the
    *unsmoothed* (plain) aggregates, ``smooth=None``: on crossed designs this gives the
    same iteration counts as smoothed prolongators (within one on every design of the
    solver study) with a far smaller hierarchy. Smoothing a prolongator multiplies it
    by ``I - omega D^{-1} A``, and on skewed designs the Galerkin products then fill in:
    at n = 10^7 with Zipf(1) levels, smoothed aggregation has operator complexity 7.5,
    150 s of setup and costs 7.8 M matvecs per cycle, plain aggregation 1.01, 1.4 s
    and 1.1, both at 5 iterations. ``smooth="jacobi"`` (or any of pyamg's options)
    restores classical smoothed aggregation.

    The V-cycle itself (``cycle='lmmops'``, the default) is ours: on the finest level the
    smoother is symmetric Gauss-Seidel over the *factor blocks* (each block of M is
    diagonal, so a block update is one fused parallel pass ``x_k = (b_k - A_{k,off} x) /
    d_k`` over that factor's rows of the cross-tabulations), on coarser levels pointwise
    symmetric Gauss-Seidel, and the coarsest level is solved exactly by a dense symmetric
    inverse of which only the lower triangle is read. Forward smoothing before the
    coarse correction and backward after it make the cycle symmetric; with a convergent
    smoother and an exact coarsest solve it is SPD. ``cycle='pyamg'`` applies pyamg's own
    V-cycle (:meth:`pyamg.multilevel.MultilevelSolver.aspreconditioner`), which is serial
    and costs several times more per application on large designs.

    Cost: a symmetric V-cycle passes over the finest level's cells four times (two block
    sweeps before the coarse correction and two after), where one M matvec passes once,
    so at least about two M matvecs plus the transfers and coarser levels; the solver
    study measures it.
    """

    kind = "amg"

    def __init__(self, M, cycle="lmmops", **options):
        super().__init__(M)
        try:
            import pyamg
        except ImportError:  # pragma: no cover
            raise ImportError("kind='amg' needs pyamg (pip install pyamg)") from None
        if cycle not in ("lmmops", "pyamg"):
            raise ArgumentError(f"cycle must be 'lmmops' or 'pyamg', got {cycle!r}")
        self.cycle = cycle
        A = (self.design.gram() + sp.diags(np.repeat(self.lambdas, self.design.n_levels)))
        sign = np.ones(self.shape[0])
        if self.K == 2:
            sign[self.offsets[1] :] = -1.0
        self._sign = sign
        S = sp.diags(sign)
        A = (S @ A @ S).tocsr()
        A.sort_indices()
        opts = {"symmetry": "hermitian", "max_coarse": 2000, "smooth": None}
        opts.update(options)
        self._smooth = opts["smooth"]
        self.ml = pyamg.smoothed_aggregation_solver(A, **opts)
        self.nnz = A.nnz
        if cycle == "pyamg":
            self._prec = self.ml.aspreconditioner(cycle="V")
            return
        par = bool(getattr(M, "parallel", False))
        self._csr_kernel = kernels.get_csr_matmat(par)
        self._residual = kernels.csr_residual_parallel if par else kernels.csr_residual_serial
        self._sym_matmat = kernels.sym_matmat_parallel if par else kernels.sym_matmat_serial
        self._nb = kernels.n_blocks(par)
        self._inv_diag = 1.0 / self.diag
        # finest level: the off-diagonal rows of each factor block (block diagonal is D)
        o = self.offsets
        self._fine_off = []
        for k in range(self.K):
            rows = A[o[k] : o[k + 1]].tocoo()
            keep = (rows.col < o[k]) | (rows.col >= o[k + 1])
            blk = sp.csr_matrix((rows.data[keep], (rows.row[keep], rows.col[keep])),
                                shape=(o[k + 1] - o[k], A.shape[0]))
            blk.sort_indices()
            self._fine_off.append(blk)
        self._levels = []
        for lvl in self.ml.levels[:-1]:
            Al = lvl.A.tocsr()
            Al.sort_indices()
            self._levels.append((Al, lvl.P.tocsr(), lvl.R.tocsr(), np.ones(Al.shape[0])))
        Ac = self.ml.levels[-1].A
        check_dense(Ac.shape, "the coarsest AMG level (lower max_coarse)")
        Ac = Ac.toarray()
        # symmetric: the coarsest solve reads only its lower triangle (half the traffic)
        self._coarse_inv = np.ascontiguousarray(np.linalg.inv(0.5 * (Ac + Ac.T)))

    def _csr(self, A, x):
        return _csr_product(self._csr_kernel, A, x[:, None])[:, 0]

    def _fine_smooth(self, x, b, forward, zero=False):
        """One factor-block Gauss-Seidel sweep in place: ``x_k = (b_k - A_k,off x) / d_k``."""
        o = self.offsets
        order = range(self.K) if forward else range(self.K - 1, -1, -1)
        for i, k in enumerate(order):
            sl = slice(o[k], o[k + 1])
            if zero and i == 0:
                np.multiply(b[sl], self._inv_diag[sl], out=x[sl])
            else:  # block k's off-diagonal rows have no columns in block k: race-free
                A = self._fine_off[k]
                self._residual(A.indptr, A.indices, A.data, x, b[sl], self._inv_diag[sl],
                               x[sl])

    def _coarsest(self, b):
        out = np.empty((b.size, 1))
        self._sym_matmat(self._coarse_inv, b[None, :], np.empty((self._nb, 1, b.size)), out)
        return out[:, 0]

    def _vcycle(self, lev, b):
        if lev == len(self._levels):
            return self._coarsest(b)
        A, P, R, ones = self._levels[lev]
        x = np.zeros_like(b)
        r = np.zeros_like(b)
        if lev == 0:
            self._fine_smooth(x, b, True, zero=True)
            # after a forward block sweep the last block's residual is zero
            o, d = self.offsets, self.diag
            for k in range(self.K - 1):
                sl = slice(o[k], o[k + 1])
                Ak = self._fine_off[k]
                self._residual(Ak.indptr, Ak.indices, Ak.data, x, b[sl] - d[sl] * x[sl],
                               ones[sl], r[sl])
        else:
            kernels.csr_gauss_seidel(A.indptr, A.indices, A.data, x, b, True)
            self._residual(A.indptr, A.indices, A.data, x, b, ones, r)
        x += self._csr(P, self._vcycle(lev + 1, self._csr(R, r)))
        if lev == 0:
            self._fine_smooth(x, b, False)
        else:
            kernels.csr_gauss_seidel(A.indptr, A.indices, A.data, x, b, False)
        return x

    def _apply(self, X):
        out = np.empty_like(X)
        s = self._sign
        for j in range(X.shape[1]):
            bj = np.ascontiguousarray(s * X[:, j])
            if self.cycle == "pyamg":
                out[:, j] = s * self._prec.matvec(bj)
            else:
                out[:, j] = s * self._vcycle(0, bj)
        return out

    def _details(self):
        ml = self.ml
        flip = "sign-flipped (bipartite Laplacian + shift)" if self.K == 2 else "unflipped"
        cyc = ("factor-block Gauss-Seidel on the finest level, dense coarsest solve"
               if self.cycle == "lmmops" else "pyamg's own V-cycle")
        agg = "plain aggregation" if self._smooth is None else "smoothed aggregation"
        return (f"pyamg {agg} on the {flip} sparse M (nnz={self.nnz}, "
                f"levels={len(ml.levels)}, operator complexity="
                f"{ml.operator_complexity():.2f}); symmetric V-cycle: {cyc}")


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
        self.base = _LEVEL_BUILDERS[base](M, **base_options)
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


_LEVEL_BUILDERS = {
    "jacobi": _Jacobi,
    "proportional": _Proportional,
    "spectral": _Spectral,
    "block_gauss_seidel": _BlockGaussSeidel,
    "amg": _AMG,
    "lowrank": _LowRank,
}


# ---------------------------------------------------------------------------- observation
class _Observation(Preconditioner):
    space = "observation"

    def __init__(self, V):
        self.V = V
        self.shape = V.shape


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

    def __init__(self, V, inner=None, inner_rtol=1e-10, inner_maxiter=None, **inner_options):
        super().__init__(V)

        self.M = V.level_space()
        self._A = SparseLevelOperator(self.M)  # same matrix, O(cells) products
        inner = AUTO_LEVEL_KIND if inner is None else inner
        self.inner = _build_level(self.M, inner, **inner_options)
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

    def __init__(self, V, base="proportional", **options):
        super().__init__(V)
        self.M = V.level_space()
        self.base = _build_level(self.M, base, **options)
        self.kind = f"lifted_{self.base.kind}"

    def _apply(self, X):
        return self.M.lift(self.base._apply(self.M.rhs(X)), X)

    def _details(self):
        return (f"{self.base.kind} lifted from level space; a documented negative result "
                "(docs/theory.rst, 'Where to precondition'): badly conditioned, possibly "
                "indefinite")


def _build_level(M, kind, rank=None, **options):
    if kind == "identity":
        return _Identity(M)
    if kind not in _LEVEL_BUILDERS:
        if kind in ("exact", "lifted"):
            raise ArgumentError(
                f"kind={kind!r} is an observation-space preconditioner for a "
                "CovarianceOperator; in level space the exact preconditioner would be M^{-1} "
                "itself: solve with lmmops.linalg.krylov.cg / solve_V instead"
            )
        raise ArgumentError(f"unknown kind {kind!r}; level-space kinds are {LEVEL_KINDS}")
    cls = _LEVEL_BUILDERS[kind]
    if kind in ("spectral", "lowrank"):
        return cls(M, rank=rank, **options)
    if rank is not None:
        raise ArgumentError(f"kind={kind!r} has no rank; rank applies to 'spectral' and 'lowrank'")
    return cls(M, **options)


def _build_observation(V, kind, rank=None, **options):
    if kind == "identity":
        return _Identity(V)
    if kind == "exact":
        inner = options.pop("inner", None)
        max_dense = int(options.pop("max_dense", 4000))
        max_gram = float(options.pop("max_gram_flops", 2e9))
        if inner in (None, "auto"):
            design = V.design
            affordable = (
                sum(design.n_levels) - max(design.n_levels) <= max_dense
                and _schur_gram_flops(design) <= max_gram
            )
            inner = "direct" if affordable else None
        if inner == "direct":
            if options:
                raise ArgumentError(f"inner='direct' takes no options {sorted(options)}")
            return _DirectObservation(V, "exact", max_dense=max_dense)
        return _ExactObservation(V, inner=inner, **options)
    if kind == "lifted":
        return _Lifted(V, rank=rank, **options) if rank is not None else _Lifted(V, **options)
    if kind in ("spectral", "lowrank"):
        K = V.design.n_factors
        if K != 2:
            raise DesignError(
                f"observation-space kind={kind!r} is D1, which needs exactly two crossed "
                f"factors, got K={K}; use kind='exact' (any K), or solve in level space"
            )
        if kind == "spectral":
            return _SpectralObservation(V, rank=rank, **options)
        max_rank = int(options.pop("max_rank", 4000))
        if rank is not None:
            raise ArgumentError(
                "observation-space kind='lowrank' applies the complete D1 correction (rank "
                "t = levels whose total differs from the mean); do not pass rank"
            )
        form = options.pop("form", "schur")
        if form == "schur":
            if options:
                raise ArgumentError(f"form='schur' takes no options {sorted(options)}")
            m = min(V.design.n_levels)
            if m > max_rank:
                raise ArgumentError(
                    f"observation-space kind='lowrank' corrects D1's dense m x m Schur "
                    f"complement, m = min(g, h) = {m}, above max_rank={max_rank}; use "
                    "kind='exact' (inner level-space PCG) or raise max_rank"
                )
            return _DirectObservation(V, "lowrank", max_dense=max_rank)
        if form != "woodbury":
            raise ArgumentError(f"form must be 'schur' or 'woodbury', got {form!r}")

        g, h = V.design.n_levels
        if g + h > max_rank:
            raise ArgumentError(
                f"observation-space kind='lowrank', form='woodbury' needs a dense correction "
                f"of rank up to t <= g + h = {g + h}, above max_rank={max_rank}; use "
                "form='schur', kind='exact' (inner level-space PCG) or raise max_rank"
            )
        ex = ExactInverse(V, base="modified", **options)
        return _ObsOperatorWrap(
            V, "lowrank", ex, ex.logdet,
            f"D1 + exact Woodbury correction of rank t={ex.correction_rank}; logdet() = log|V|",
        )
    if kind in LEVEL_KINDS:
        raise ArgumentError(
            f"kind={kind!r} is a level-space preconditioner; build it on V.level_space() and "
            "solve there (lmmops.linalg.solve.solve_V does), or lift it with kind='lifted', "
            f"base={kind!r} (not recommended: docs/theory.rst, 'Where to precondition', "
            "measured 2,230-2,469 iterations against 213 without a preconditioner)"
        )
    raise ArgumentError(f"unknown kind {kind!r}; observation-space kinds are {OBSERVATION_KINDS}")


def build(A, kind="auto", rank=None, **options):
    """Build a preconditioner for a level-space ``M`` or an observation-space ``V``.

    Parameters
    ----------
    A : LevelSpaceOperator or CovarianceOperator
    kind : str, optional
        Level space: ``'identity'``, ``'jacobi'``, ``'proportional'``, ``'spectral'``
        (K = 2), ``'lowrank'``, ``'block_gauss_seidel'``, ``'amg'``. Observation space:
        ``'identity'``, ``'spectral'`` (K = 2), ``'exact'``, ``'lowrank'`` (K = 2),
        ``'lifted'``. ``'auto'`` (default): ``'block_gauss_seidel'`` in level space,
        ``'exact'`` in observation space.
    rank : int, optional
        ``'spectral'``: SVD triplets (default 20, at most ``min(g, h)``; full rank with
        exact margins is M itself). ``'lowrank'`` (level): deflation rank (default 10;
        ``q`` or more is exact). Observation ``'spectral'``: D1's triplets (default all
        ``min(g, h)``, exact ``V check^{-1}``, when ``min(g, h) <= max_full``, else 50).
    **options
        Per kind. ``'spectral'`` (level): ``margins={'exact','reference'}``,
        ``reference``, ``rng``. ``'lowrank'`` (level): ``base`` (default ``'spectral'``
        for a connected K = 2 design, else ``'proportional'``), ``tol``, ``rng``.
        ``'amg'``: ``cycle`` (``'lmmops'``, default, or ``'pyamg'``); the rest are passed
        to :func:`pyamg.smoothed_aggregation_solver` (defaults ``smooth=None``, plain
        aggregation, and ``max_coarse=2000``). ``'exact'``:
        ``inner`` (``'direct'``, the dense Schur complement, or a level kind for the inner
        PCG; default: direct when it fits), ``max_dense`` (4000: the largest dense
        complement), ``max_gram_flops`` (2e9: the largest one-pass setup chosen
        automatically), and for the inner PCG ``inner_rtol`` (1e-10), ``inner_maxiter``
        and the level kind's options. ``'lowrank'`` (observation): ``form``
        (``'schur'``, default, or ``'woodbury'``), ``max_rank`` (4000: the largest
        ``min(g, h)``; with ``'woodbury'`` the largest ``g + h``) and, with
        ``'woodbury'``, :class:`lmmops.paper.lowrank.ExactInverse` options. ``'spectral'``
        (observation): ``reference`` (``'mean'``, ``'harmonic'`` or a pair of totals), ``max_full``
        (4000: the largest ``min(g, h)`` for the dense eigenproblem), ``rng``.
        ``'lifted'``: ``base`` (a level kind).

    Returns
    -------
    Preconditioner
        With ``.aspreconditioner()``, ``.logdet()``, ``.describe()`` and ``.solve(r)``.

    Raises
    ------
    ArgumentError
        For a kind that does not exist or does not apply to the space, saying why.
    DesignError
        For a kind that does not apply to the number of factors (D1 needs K = 2).
    ArgumentTypeError
        If ``A`` is neither operator.

    Examples
    --------
    >>> from scipy.sparse.linalg import cg
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.linalg.operators import CovarianceOperator
    >>> rng = np.random.default_rng(0)
    >>> codes = np.vstack([rng.integers(0, 40, 800), rng.integers(0, 12, 800)])
    >>> V = CovarianceOperator(CrossedDesign.from_codes(codes), 1.0, [0.5, 2.0])
    >>> M = V.level_space()
    >>> b = rng.standard_normal(800)
    >>> P = build(M, kind="proportional")
    >>> u, info = cg(M, M.rhs(b), rtol=1e-10, M=P.aspreconditioner())
    >>> x = M.lift(u, b)
    >>> info, bool(np.linalg.norm(V @ x - b) < 1e-7 * np.linalg.norm(b))
    (0, True)
    >>> x2, info = cg(V, b, rtol=1e-10, M=build(V, kind="exact").aspreconditioner())
    >>> info, bool(np.allclose(x2, x))
    (0, True)
    """
    t0 = time.perf_counter()
    if _is_level(A):
        kind = "block_gauss_seidel" if kind == "auto" else kind
        out = _build_level(A, kind, rank=rank, **options)
    elif _is_covariance(A):
        kind = "exact" if kind == "auto" else kind
        out = _build_observation(A, kind, rank=rank, **options)
    else:
        raise ArgumentTypeError(
            "build() needs a LevelSpaceOperator (M = Z'Z + Lambda) or a CovarianceOperator "
            f"(V), got {type(A).__name__}"
        )
    out.setup_seconds = time.perf_counter() - t0
    return out


def apply_cost(apply, matvec, x, reps=7, pause=0.0):
    """The cost of one application in matvecs: best-of-``reps`` times, taken alternately.

    Timing the two in one loop, one after the other, exposes both to the same load, so the
    ratio of the two minima is steadier on a shared machine than two separately timed
    minima. Each callable is called once first (compilation, caches) and then ``reps``
    times. The solver study and the asv benchmark ``bench_solvers.ApplyCost`` use it.

    Parameters
    ----------
    apply, matvec : callable
        ``apply(x)``: one preconditioner application; ``matvec(x)``: one product with the
        operator it preconditions.
    x : ndarray
        The vector both are called with.
    reps : int, optional
        Timed repeats of each (default 7).
    pause : float, optional
        Seconds to sleep first (default 0), so that BLAS worker threads left spinning by
        a setup's LAPACK calls are idle and do not compete with numba's threads.

    Returns
    -------
    float
        ``min time(apply) / min time(matvec)``.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag(np.arange(1.0, 5.0))
    >>> r = apply_cost(lambda v: v / np.diag(A), lambda v: A @ v, np.ones(4), reps=3)
    >>> r > 0
    True
    """
    if reps < 1:
        raise ArgumentError(f"reps must be >= 1, got {reps}")
    if pause > 0:
        time.sleep(pause)
    apply(x)
    matvec(x)
    best_p = best_a = np.inf
    for _ in range(int(reps)):
        t = time.perf_counter()
        apply(x)
        best_p = min(best_p, time.perf_counter() - t)
        t = time.perf_counter()
        matvec(x)
        best_a = min(best_a, time.perf_counter() - t)
    return float(best_p / best_a)
