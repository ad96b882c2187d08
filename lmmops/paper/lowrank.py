r"""Exact ``V^{-1}`` as a low-rank correction of a spectral approximation (:ref:`inverse-lowrank`).

:class:`ExactInverse` turns either spectral construction of :mod:`lmmops.paper.spectral` into the
exact inverse by a Woodbury correction of low rank:

- ``base="modified"`` (D1, V check): ``V = V_check + sum_{l in S} delta_l q_l q_l'`` with
  ``q_l`` the normalised indicator of a level whose total differs from the reference and
  ``delta_l = s_l^2 (n_l - n̄)``. The correction has rank ``t = |S| <= g + h``, which does not
  depend on the missing-cell pattern; ``t = 0`` for equireplicate designs.
- ``base="proportional"`` (D2): ``M = M_prop + E``, ``E = N - r c'/n`` (block
  off-diagonal), of rank ``2 rank(E)`` (two factors: the thin SVD of ``E``; three or more:
  the eigen-decomposition of the symmetric ``E``).

Both are carried out in level space, where they are the same identities as in observation
space: with ``M`` the whitened level-space matrix of Section 11 and ``B`` the base's
level-space matrix, ``M = B + F Om F'`` and

.. math::

    M^{-1} = B^{-1} - U (I + Om F'U)^{-1} Om U', \quad U = B^{-1} F, \qquad
    \log|M| = \log|B| + \log|I + Om F'U|,

then ``V^{-1} = R^{-1} - R^{-1} Z M^{-1} Z' R^{-1}`` and
``log|V| = log|R| + sum_k q_k log s_k^2 + log|M|``. For D1, ``F`` selects the levels in
``S`` and ``Om = diag((1 - n_l / n̄) / s_l^2)``, which is the level-space form of
``V^{-1} = V_check^{-1} - V_check^{-1} Q_S (Delta_S^{-1} + Q_S' V_check^{-1} Q_S)^{-1}
Q_S' V_check^{-1}``.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as sla

from lmmops.errors import ArgumentError, CorrectionRankWarning, DesignError
from lmmops.guard import check_dense
from lmmops.paper.spectral import (
    ModifiedCovariance,
    ProportionalApproximation,
    _as_model,
    _FunctionOperator,
    _LevelInverse,
)

__all__ = ["CorrectionRankWarning", "ExactInverse", "reml_criterion"]


# The Examples below and reml_criterion's build the same kind of small V on purpose
# (issue 13): each doctest runs alone and is read alone in the API pages, so each sets
# up its own design instead of sharing a helper the reader would have to look up.
class ExactInverse(_LevelInverse):
    r"""Exact ``V^{-1}`` as a low-rank correction of D1 or D2 (a symmetric LinearOperator).

    Parameters
    ----------
    V : covariance operator
        With ``.design``, ``.sigma2_e`` and ``.sigma2`` (e.g.
        :class:`lmmops.paper.spectral.KhatriRaoCovariance`, ``CovarianceOperator``).
    base : {'modified', 'proportional'}, optional
        ``'modified'``: block Woodbury of rank ``t <= g + h`` on V check (two factors, with
        or without interaction; full SVD). ``'proportional'``: rank ``2 rank(E)`` on D2 (any
        number of factors).
    reference : {'mean', 'harmonic'} or tuple, optional
        Reference totals of V check (``base='modified'`` only).
    rtol : float, optional
        Relative threshold below which a level's total counts as equal to the reference
        (D1), or a singular value of ``E`` as zero (D2).
    warn_fraction : float, optional
        Warn with :class:`CorrectionRankWarning` when the correction rank exceeds this
        fraction of ``q = sum_k q_k`` and ``warn_min_rank``: the correction then costs as
        much as a dense level-space factorisation (``lmmops.estimation.direct`` does that
        directly).
    warn_min_rank : int, optional
        Below this rank the correction is cheap whatever ``q`` is, and no warning is given.

    Attributes
    ----------
    correction_rank : int
        ``t`` (D1) or ``2 rank(E)`` (D2).
    approximation : ModifiedCovariance or ProportionalApproximation
        The base.

    Raises
    ------
    DenseTooLargeError
        If the ``q x t`` correction basis or the ``t x t`` core would exceed the dense limit.
    DisconnectedDesignError
        For a disconnected design.

    Notes
    -----
    Setup costs ``O(t (g + h) m)`` (D1, with ``m = min(g, h)``) or ``O(g h m)`` (D2) after
    the SVD, plus ``O(t^3)`` for the core. Applying it costs ``O(n K + (g + h) m + q t)``.

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.paper.spectral import KhatriRaoCovariance
    >>> rng = np.random.default_rng(1)
    >>> codes = np.vstack([rng.integers(0, 5, 60), rng.integers(0, 4, 60)])
    >>> V = KhatriRaoCovariance(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.8])
    >>> Vinv = ExactInverse(V, base="modified")
    >>> Vinv.correction_rank <= 9
    True
    >>> Vd = V.todense()
    >>> bool(np.allclose(Vinv.todense(), np.linalg.inv(Vd), rtol=1e-10, atol=1e-12))
    True
    >>> bool(np.isclose(Vinv.logdet(), np.linalg.slogdet(Vd)[1]))
    True
    """

    def __init__(
        self, V, base="modified", reference="mean", rtol=1e-10, warn_fraction=0.5,
        warn_min_rank=1000,
    ):
        model = _as_model(V)
        model.design.check_connected()
        self.V = V
        self.base = base
        self._warn = (warn_fraction, warn_min_rank)
        q = model.q
        if base == "modified":
            appr = ModifiedCovariance(model, reference=reference, rank=None, svd="full")
            if appr.svd.truncated:  # pragma: no cover - full SVD requested
                raise DesignError("the exact correction needs the full SVD")
            rbar, cbar = appr.reference_totals
            ref = np.concatenate(
                [np.full(int(model.st.q_k[0]), rbar), np.full(int(model.st.q_k[1]), cbar)]
            )
            sig = np.repeat(model.s2, model.st.q_k)
            sel = np.flatnonzero(np.abs(model.w - ref) > rtol * ref)
            t = sel.size
            self._check_size(q, t)
            F = np.zeros((q, t))
            F[sel, np.arange(t)] = 1.0
            om = (1.0 - model.w[sel] / ref[sel]) / sig[sel]
            Om = np.diag(om)
            self.levels = sel
            apply_b = appr._apply_kc_inv
            logdet_b = appr._logdet_kc()
        elif base == "proportional":
            appr = ProportionalApproximation(model)
            F, Om = self._proportional_factor(model, rtol)
            t = F.shape[1]
            apply_b = appr._apply_m_inv
            logdet_b = appr.logdet_level()
        else:
            raise ArgumentError(f"base must be 'modified' or 'proportional', got {base!r}")
        self.approximation = appr
        self.correction_rank = int(t)
        self._apply_b = apply_b
        if t:
            U = apply_b(F)
            core = np.eye(t) + Om @ (F.T @ U)
            self._lu = sla.lu_factor(core)
            sign, ld = np.linalg.slogdet(core)
            if sign <= 0:  # pragma: no cover - det(core) = |M| / |B| > 0
                raise ArithmeticError("the Woodbury core has a non-positive determinant")
            self._U, self._Om = U, Om
        else:
            ld = 0.0
        self._logdet_level = logdet_b + ld
        super().__init__(model, self._apply_m_inv, f"ExactInverse(base={base!r})")

    def _check_size(self, q, t):
        check_dense((q, t), "ExactInverse's correction basis")
        check_dense((t, t), "ExactInverse's Woodbury core")
        warn_fraction, warn_min_rank = self._warn
        if t > warn_fraction * q and t >= warn_min_rank:
            warnings.warn(
                f"the correction rank t = {t} is more than {warn_fraction:.0%} of the level "
                f"space (q = {q}): the low-rank correction costs as much as a dense "
                "level-space factorisation; lmmops.estimation.direct or a level-space solver "
                "is cheaper",
                CorrectionRankWarning,
                stacklevel=3,
            )

    def _proportional_factor(self, model, rtol):
        """``F, Om`` with ``M - M_prop = F Om F'``."""
        q = model.q
        if model.K == 2:
            g, h = (int(x) for x in model.st.q_k)
            check_dense((g, h), "the SVD of E = N - r c'/n")
            E = model.omega_table(0, 1).toarray() - np.outer(model.w_k(0), model.w_k(1)) / model.W
            L, s, Rt = np.linalg.svd(E, full_matrices=False)
            keep = s > rtol * max(s[0] if s.size else 0.0, model.W / max(g, h))
            L, s, R = L[:, keep], s[keep], Rt[keep].T
            k = s.size
            self._check_size(q, 2 * k)
            F = np.zeros((q, 2 * k))
            F[:g, :k] = L
            F[g:, k:] = R
            Om = np.zeros((2 * k, 2 * k))
            Om[:k, k:] = np.diag(s)
            Om[k:, :k] = np.diag(s)
            self.singular_values = s
            return F, Om
        check_dense((q, q), "the eigen-decomposition of E (three or more factors)")
        o = model.st.offsets
        E = np.zeros((q, q))
        for k in range(model.K):
            for l in range(k + 1, model.K):
                blk = model.omega_table(k, l).toarray()
                blk -= np.outer(model.w_k(k), model.w_k(l)) / model.W
                E[o[k] : o[k + 1], o[l] : o[l + 1]] = blk
                E[o[l] : o[l + 1], o[k] : o[k + 1]] = blk.T
        ev, Q = np.linalg.eigh(E)
        keep = np.abs(ev) > rtol * max(np.abs(ev).max(), 1e-300)
        self._check_size(q, int(keep.sum()))
        self.singular_values = np.abs(ev[keep])
        return Q[:, keep], np.diag(ev[keep])

    def _apply_m_inv(self, z):
        y = self._apply_b(z)
        if self.correction_rank:
            c = self._U.T @ z
            y = y - self._U @ sla.lu_solve(self._lu, self._Om @ c)
        return y

    def level_space_inverse(self):
        """Exact ``M^{-1}`` (whitened level space) as a LinearOperator.

        Returns
        -------
        scipy.sparse.linalg.LinearOperator, shape (q, q)
        """
        return _FunctionOperator(self.model.q, self._apply_m_inv)

    def logdet(self):
        """Exact ``log|V| = log|R| + sum_k q_k log s_k^2 + log|M|``.

        Returns
        -------
        float
        """
        m = self.model
        return m.logdet_r() + m.logdet_g() + self._logdet_level

    def solve(self, b):
        """Return ``V^{-1} b``.

        Parameters
        ----------
        b : array_like, shape (n_obs,) or (n_obs, k)

        Returns
        -------
        ndarray of float64, same shape as ``b``
        """
        b = np.asarray(b, dtype=np.float64)
        return self.matvec(b) if b.ndim == 1 else self.matmat(b)


# The Examples set up a small V as ExactInverse's do, on purpose: see the note there.
def reml_criterion(inverse, X, y, logdet=None):
    """REML log-likelihood ``-1/2 [log|V| + log|X'AX| + y'Py]`` with ``A`` in place of V^{-1}.

    ``P = A - A X (X'AX)^{-1} X'A``. With an exact inverse this is the REML criterion
    (without the constant); with an approximation ``A`` it is the approximate criterion of
    :ref:`theory-reml-identities`.

    Parameters
    ----------
    inverse : LinearOperator, shape (n_obs, n_obs)
        ``V^{-1}`` or an approximation of it. Its ``logdet()`` is used when ``logdet`` is
        None.
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)
    logdet : float, optional
        ``log|V|`` (or its approximation).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.paper.spectral import KhatriRaoCovariance
    >>> rng = np.random.default_rng(2)
    >>> codes = np.vstack([rng.integers(0, 4, 30), rng.integers(0, 3, 30)])
    >>> V = KhatriRaoCovariance(CrossedDesign.from_codes(codes), 1.0, [0.5, 0.8])
    >>> X, y = np.ones((30, 1)), rng.standard_normal(30)
    >>> Vd = V.todense()
    >>> Vi = np.linalg.inv(Vd)
    >>> P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    >>> dense = -0.5 * (np.linalg.slogdet(Vd)[1] + np.log(X.T @ Vi @ X).item() + y @ P @ y)
    >>> bool(np.isclose(reml_criterion(ExactInverse(V), X, y), dense, rtol=1e-10))
    True
    """
    X = np.asarray(X, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y, dtype=np.float64)
    if logdet is None:
        logdet = inverse.logdet()
    AX = inverse.matmat(X)
    Ay = inverse.matvec(y)
    XtAX = X.T @ AX
    sign, ld_x = np.linalg.slogdet(XtAX)
    if sign <= 0:
        return -np.inf
    ytPy = float(y @ Ay - (X.T @ Ay) @ np.linalg.solve(XtAX, X.T @ Ay))
    return -0.5 * (float(logdet) + ld_x + ytPy)
