"""The level-space ``block_gauss_seidel`` preconditioner: symmetric block Gauss-Seidel over
the factor blocks (``AUTO_LEVEL_KIND``, the default of ``solve_V`` and of the matrix-free
fit)."""

from __future__ import annotations

import numpy as np

from lmmops.linalg.preconditioners.base import _Level


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
