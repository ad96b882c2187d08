"""The level-space ``amg`` preconditioner: a symmetric V-cycle on the hierarchy of pyamg's
aggregation solver (imported when one is built: pyamg takes 0.3-0.6 s to import)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lmmops.errors import ArgumentError
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.preconditioners.base import _csr_product, _Level


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
