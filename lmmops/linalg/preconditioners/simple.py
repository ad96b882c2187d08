"""The closed-form preconditioners: ``identity`` (either space), ``jacobi`` (``diag(M)``)
and ``proportional`` (D2, every ``N_kl`` replaced by ``r_k r_l'/n``) in level space."""

from __future__ import annotations

import numpy as np

from lmmops.linalg.preconditioners.base import Preconditioner, _is_level, _Level
from lmmops.paper.spectral import _ProportionalCore


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
