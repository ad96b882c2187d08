"""Henderson's mixed model equations (MME) and the blocks of their inverse.

For ``y = X tau + Z u + e`` with ``u ~ N(0, G)`` and ``e ~ N(0, R)``, ``R = s_e^2 W^{-1}``,
Henderson's equations are

.. math::

    C \\begin{bmatrix} \\hat\\tau \\\\ \\tilde u \\end{bmatrix} =
    \\begin{bmatrix} X'R^{-1}y \\\\ Z'R^{-1}y \\end{bmatrix}, \\qquad
    C = \\begin{bmatrix} X'R^{-1}X & X'R^{-1}Z \\\\ Z'R^{-1}X & Z'R^{-1}Z + G^{-1}
    \\end{bmatrix},

and ``C^{-1}`` is the prediction error variance (PEV) ``var([tau_hat; u_tilde] - [tau; u])``:
its ``XX`` block is ``var(tau_hat) = (X'V^{-1}X)^{-1}``, its ``ZZ`` block is
``C^{ZZ} = G - G Z'P Z G`` (the conditional variance of the BLUPs given the data), and
``var(u_tilde) = G Z'P Z G = G - C^{ZZ}``.

Two routes:

- :func:`solve` with dense ``X``, ``Z``, ``G`` and ``R``: the textbook equations, for small
  problems and as the oracle of the tests (guarded by :func:`lmmops.guard.check_dense`);
- :func:`solve` with a :class:`~lmmops.data.design.CrossedDesign` (crossed random intercepts,
  ``G = blkdiag(s_k^2 I)``): level space only, through the exact solver's blocked
  Cholesky. With ``theta_k = s_k / s_e`` and ``D = blkdiag(Lambda, I_p)``,
  ``C^{-1} = s_e^2 D Omega^{-1} D`` where ``Omega`` is lme4's penalised system, and the
  diagonals of ``Omega^{-1}`` come from its Schur structure without forming any ``q x q``
  or ``n x n`` matrix (:func:`level_space_diagonals`).

The level-space helpers take the exact solver's factor; an iterative solver can supply the
same quantities by stochastic diagonal estimation (``lmmops.linalg.trace``): every function that
returns a diagonal documents the quantity it estimates so such an estimator can be
plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lmmops.data.conditioning import condition
from lmmops.data.formula import rank_columns
from lmmops.errors import LmmopsError
from lmmops.estimation.direct import DirectObjective
from lmmops.guard import check_dense
from lmmops.linalg.lapack import chol_inverse

__all__ = [
    "MMESolution",
    "diag_P",
    "level_space_diagonals",
    "observation_vectors",
    "P_columns",
    "solve",
]


@dataclass
class MMESolution:
    """The solution of Henderson's equations and the blocks of ``C^{-1}`` asked for.

    Attributes
    ----------
    tau : ndarray, shape (p,)
        GLS estimate of the fixed effects (NaN for aliased columns when X is rank
        deficient; the selected generalised inverse uses ``tau_1 = 0``).
    u : ndarray, shape (q,)
        BLUPs, factors concatenated in design order.
    var_tau : ndarray, shape (p, p)
        ``C^{XX} = (X'V^{-1}X)^{-1}`` (selected generalised inverse: zero rows and columns
        for aliased columns).
    pev_diag : ndarray, shape (q,)
        Diagonal of ``C^{ZZ} = G - G Z'P Z G``: the prediction error variances
        ``var(u_tilde - u)``.
    var_u_diag : ndarray, shape (q,)
        Diagonal of ``var(u_tilde) = G Z'P Z G = G - C^{ZZ}``.
    pev : ndarray or None, shape (q, q)
        ``C^{ZZ}`` in full (dense route, when asked for).
    cov_tau_u : ndarray or None, shape (p, q)
        ``C^{XZ} = -(X'V^{-1}X)^{-1} X'V^{-1} Z G`` (when asked for).
    C_inv : ndarray or None, shape (p + q, p + q)
        The whole inverse (dense route, when asked for).
    rank_deficient : list of int
        Indices of aliased columns of X.
    """

    tau: np.ndarray
    u: np.ndarray
    var_tau: np.ndarray
    pev_diag: np.ndarray
    var_u_diag: np.ndarray
    pev: np.ndarray | None = None
    cov_tau_u: np.ndarray | None = None
    C_inv: np.ndarray | None = field(default=None, repr=False)
    rank_deficient: list = field(default_factory=list)


_BLOCKS = ("pev", "cov_tau_u", "C_inv")


def solve(X, y, Z=None, G=None, R=None, *, design=None, variances=None, sigma2_e=1.0,
          weights=None, blocks=()):
    """Solve Henderson's mixed model equations for given variance parameters.

    Parameters
    ----------
    X : array_like, shape (n_obs, p)
        Fixed-effects matrix; a rank-deficient X is handled with the selected
        generalised inverse (aliased columns by pivoted QR, ``tau_1 = 0``).
    y : array_like, shape (n_obs,)
    Z : array_like or sparse matrix, shape (n_obs, q), optional
        Random-effects design (dense route).
    G : array_like, shape (q, q) or (q,), optional
        Covariance of ``u`` (a vector is a diagonal); dense route.
    R : array_like, shape (n_obs, n_obs), optional
        Residual covariance; default ``sigma2_e * W^{-1}``.
    design : CrossedDesign, optional
        Level-space route instead of ``Z`` and ``G``: crossed random intercepts with
        ``G = blkdiag(variances[k] I)``.
    variances : sequence of float, optional
        Per-factor variances ``s_k^2`` (level-space route).
    sigma2_e : float
        Residual variance ``s_e^2``.
    weights : array_like, shape (n_obs,), optional
        Prior weights: ``R = s_e^2 W^{-1}``.
    blocks : sequence of {"pev", "cov_tau_u", "C_inv"}
        Extra blocks of ``C^{-1}``. ``var_tau`` and the PEV diagonals are always
        returned. ``"pev"`` and ``"C_inv"`` are dense ``q x q`` and need the dense route
        (or a design small enough for :func:`~lmmops.guard.check_dense`).

    Returns
    -------
    MMESolution

    Raises
    ------
    LmmopsError
        For inconsistent shapes, neither ``Z`` nor ``design``, non-positive variances
        where an inverse is needed, or an unknown block name.

    Examples
    --------
    The three-observation, two-subject example (intercept only; subject 1 has two
    records). With ``sigma2_e = 1`` and ``g = 2`` the coefficient matrix is
    ``[[3, 2, 1], [2, 2.5, 0], [1, 0, 1.5]]``:

    >>> import numpy as np
    >>> X = np.ones((3, 1))
    >>> Z = np.array([[1., 0], [1, 0], [0, 1]])
    >>> y = np.array([4.0, 6.0, 2.0])
    >>> sol = solve(X, y, Z=Z, G=[2.0, 2.0], sigma2_e=1.0, blocks=["C_inv"])
    >>> sol.tau.round(6), sol.u.round(6)
    (array([3.636364]), array([ 1.090909, -1.090909]))
    >>> sol.C_inv.round(4)
    array([[ 1.3636, -1.0909, -0.9091],
           [-1.0909,  1.2727,  0.7273],
           [-0.9091,  0.7273,  1.2727]])

    The same with a :class:`~lmmops.data.design.CrossedDesign`, in level space:

    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 1]], names=["subject"])
    >>> lev = solve(X, y, design=d, variances=[2.0], sigma2_e=1.0)
    >>> bool(np.allclose(lev.u, sol.u) and np.allclose(lev.pev_diag, sol.pev_diag))
    True
    >>> bool(np.allclose(sol.var_u_diag, 2.0 - sol.pev_diag))
    True
    """
    for b in blocks:
        if b not in _BLOCKS:
            raise LmmopsError(f"unknown block {b!r}; choose from {', '.join(_BLOCKS)}")
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if X.shape[0] == 1 and np.asarray(y).size > 1:
        X = X.T
    y = np.asarray(y, dtype=np.float64).ravel()
    n, p = X.shape
    if y.shape[0] != n:
        raise LmmopsError(f"X has {n} rows but y has {y.shape[0]}")

    keep, _ = rank_columns(X, [str(j) for j in range(p)])
    dropped = [j for j in range(p) if j not in set(keep.tolist())]
    if design is not None:
        out = _solve_level_space(X[:, keep], y, design, variances, sigma2_e, weights, blocks)
    elif Z is not None:
        out = _solve_dense(X[:, keep], y, Z, G, R, sigma2_e, weights, blocks)
    else:
        raise LmmopsError("give either Z (and G) or a design (and variances)")
    return _expand(out, keep, p, dropped)


def _expand(out, keep, p, dropped):
    """Put the kept columns back in a p-column solution (selected g-inverse, tau_1 = 0)."""
    if not dropped:
        return out
    tau = np.full(p, np.nan)
    tau[keep] = out.tau
    vt = np.zeros((p, p))
    vt[np.ix_(keep, keep)] = out.var_tau
    out.tau, out.var_tau, out.rank_deficient = tau, vt, dropped
    q = out.u.size
    if out.cov_tau_u is not None:
        c = np.zeros((p, q))
        c[keep] = out.cov_tau_u
        out.cov_tau_u = c
    if out.C_inv is not None:
        ci = np.zeros((p + q, p + q))
        idx = np.concatenate([keep, p + np.arange(q)])
        ci[np.ix_(idx, idx)] = out.C_inv
        out.C_inv = ci
    return out


def _solve_dense(X, y, Z, G, R, sigma2_e, weights, blocks):
    n, p = X.shape
    if not sp.issparse(Z):
        Z = np.atleast_2d(np.asarray(Z, dtype=np.float64))
    if Z.ndim != 2 or Z.shape[0] != n:
        raise LmmopsError(f"Z has {Z.shape[0]} rows for {n} observations (shape {Z.shape})")
    q = Z.shape[1]
    # the dense route forms Z and R^{-1} Z (n x q) as well as C ((p + q)^2): check both
    # before densifying a sparse Z
    check_dense((n, q), "mme.solve's Z= route (Z dense, n x q; design= works in level space)")
    check_dense((p + q, p + q), "the dense mixed model equations")
    if sp.issparse(Z):
        Z = Z.toarray()
    if G is None:
        raise LmmopsError("the dense route needs G (a q x q matrix or a length-q vector)")
    G = np.asarray(G, dtype=np.float64)
    G = np.diag(G) if G.ndim == 1 else G
    if G.shape != (q, q):
        raise LmmopsError(f"G must be {q} x {q}, got shape {G.shape}")
    if R is None:
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        Rinv_X, Rinv_Z, Rinv_y = (w[:, None] * X, w[:, None] * Z, w * y)
        Rinv_X, Rinv_Z, Rinv_y = Rinv_X / sigma2_e, Rinv_Z / sigma2_e, Rinv_y / sigma2_e
    else:
        check_dense((n, n), "a dense R")
        R = np.asarray(R, dtype=np.float64)
        cf = sla.cho_factor(R)
        Rinv_X, Rinv_Z, Rinv_y = (sla.cho_solve(cf, M) for M in (X, Z, y))
    try:
        Ginv = np.linalg.inv(G)
    except np.linalg.LinAlgError:
        raise LmmopsError("G is singular; Henderson's equations need G^{-1}") from None
    C = np.block([[X.T @ Rinv_X, X.T @ Rinv_Z], [Z.T @ Rinv_X, Z.T @ Rinv_Z + Ginv]])
    rhs = np.concatenate([X.T @ Rinv_y, Z.T @ Rinv_y])
    Cinv = np.linalg.inv(C)
    Cinv = 0.5 * (Cinv + Cinv.T)
    sol = Cinv @ rhs
    pev = Cinv[p:, p:]
    out = MMESolution(tau=sol[:p], u=sol[p:], var_tau=Cinv[:p, :p].copy(),
                      pev_diag=np.diag(pev).copy(), var_u_diag=np.diag(G) - np.diag(pev))
    if "pev" in blocks:
        out.pev = pev.copy()
    if "cov_tau_u" in blocks:
        out.cov_tau_u = Cinv[:p, p:].copy()
    if "C_inv" in blocks:
        out.C_inv = Cinv
    return out


def _solve_level_space(X, y, design, variances, sigma2_e, weights, blocks):

    if variances is None:
        raise LmmopsError("the level-space route needs variances (one per factor)")
    var = np.asarray(variances, dtype=np.float64).ravel()
    if var.shape != (design.n_factors,) or np.any(var < 0) or not np.all(np.isfinite(var)):
        raise LmmopsError(f"variances must be {design.n_factors} finite values >= 0")
    if not sigma2_e > 0:
        raise LmmopsError("sigma2_e must be > 0")
    # solved on conditioned data (X_c = X T, y_c = (y - X_c b) / s, lmmops.data.conditioning),
    # so an offset or the units of y or of a covariate cost no accuracy; the variances
    # are the user's, so only the X blocks and the y-linear quantities map back
    cond, _, Xc, yc = condition(X, y)
    T = cond.T
    obj = DirectObjective(design, Xc, yc, method="ML", weights=weights)
    theta = np.sqrt(var / sigma2_e)
    ev = obj.evaluate(theta, gradient=False)
    diags = level_space_diagonals(obj, ev)
    q = design.q
    u = cond.scale * np.concatenate([theta[k] * ev.v[k] for k in range(design.n_factors)])
    scale = np.concatenate([np.full(design.n_levels[k], theta[k] ** 2)
                            for k in range(design.n_factors)])
    pev_diag = sigma2_e * scale * np.concatenate(diags["omega_diag"])
    g = np.repeat(var, design.n_levels)
    var_tau = sigma2_e * (T @ diags["omega_xx"] @ T.T)
    out = MMESolution(tau=cond.fixef(ev.beta), u=u, var_tau=var_tau, pev_diag=pev_diag,
                      var_u_diag=g - pev_diag)
    if any(b in blocks for b in ("pev", "C_inv", "cov_tau_u")):
        p = X.shape[1]
        check_dense((p + q, p + q), "the dense inverse of the mixed model equations")
        # columns of Omega^{-1}: solve with unit vectors in level space
        m = q + p
        b1 = np.zeros((obj.q1, m))
        br = np.zeros((obj.qr + p, m))
        cols = _level_order(obj, design, p)
        for c, (blk, row) in enumerate(cols):
            (b1 if blk == 0 else br)[row, c] = 1.0
        x1, xr = obj.solve_spherical(ev, b1, br)
        Oinv = np.zeros((m, m))
        for c, (blk, row) in enumerate(cols):
            Oinv[c] = x1[row] if blk == 0 else xr[row]
        dvec = np.concatenate([np.sqrt(scale), np.ones(p)])
        Cz = sigma2_e * dvec[:, None] * Oinv * dvec[None, :]  # order: Z (design), X
        Cz[q:] = T @ Cz[q:]  # the X rows and columns in the user's basis
        Cz[:, q:] = Cz[:, q:] @ T.T
        Cinv = np.block([[Cz[q:, q:], Cz[q:, :q]], [Cz[:q, q:], Cz[:q, :q]]])
        if "pev" in blocks:
            out.pev = Cz[:q, :q].copy()
        if "cov_tau_u" in blocks:
            out.cov_tau_u = Cz[q:, :q].copy()
        if "C_inv" in blocks:
            out.C_inv = Cinv
    return out


def _level_order(obj, design, p):
    """For each Z column (design order) then X column: (block, row) in the solver's blocks."""
    cols = []
    for k in range(design.n_factors):
        for lev in range(design.n_levels[k]):
            if k == obj.first:
                cols.append((0, lev))
            else:
                i = obj.rest.index(k)
                cols.append((1, int(obj.rest_offsets[i]) + lev))
    cols.extend((1, obj.qr + j) for j in range(p))
    return cols


# ---------------------------------------------------------------------- level space
def _schur_inverse(L, mp):
    if not mp:
        return np.zeros((0, 0))
    return chol_inverse(L[:mp, :mp], lower=True)


def observation_vectors(obj, rows=None):
    """The slots of ``h_i = D [z_i; x_i]`` outside the first factor, for rows ``i``.

    ``h_i`` (the i-th row of ``[Z Lambda, X]``) has ``theta_1`` at the level of the first
    (largest) factor and, in the Schur block's order, ``theta_k`` at the level of each
    other factor and ``x_i`` in the X positions.

    Parameters
    ----------
    obj : DirectObjective
    rows : array_like of int, optional
        Default all observations.

    Returns
    -------
    idx : ndarray of int, shape (n_rows, K - 1 + p)
        Positions in the Schur block (other factors, then X).
    coef : ndarray of float, shape (n_rows, K - 1 + p)
        Multipliers of ``theta`` (1 for factor slots, ``x_i`` for X slots); the values
        are ``coef * theta`` for factor slots.
    """
    rows = np.arange(obj.n) if rows is None else np.asarray(rows, dtype=np.int64)
    codes = obj.design.codes
    nr = rows.size
    ms = len(obj.rest) + obj.p
    idx = np.empty((nr, ms), dtype=np.int64)
    coef = np.empty((nr, ms))
    for i, k in enumerate(obj.rest):
        idx[:, i] = obj.rest_offsets[i] + codes[k][rows]
        coef[:, i] = 1.0
    for j in range(obj.p):
        idx[:, len(obj.rest) + j] = obj.qr + j
        coef[:, len(obj.rest) + j] = obj.X[rows, j]
    return idx, coef


def level_space_diagonals(obj, ev, *, z_only=False, observations=False, chunk=None):
    """Diagonals of ``Omega^{-1}`` (lme4's penalised system) from the blocked Cholesky.

    ``Omega = [[Dg, B'], [B, A]]`` with the first factor's block ``Dg = diag(d)``
    diagonal and ``S = A - B Dg^{-1} B' = L L'`` (the solver's dense factor). Then

    - ``(Omega^{-1})_{jj} = 1/d_j + b_j' S^{-1} b_j / d_j^2`` for the first factor's
      levels, ``b_j`` the j-th column of ``B`` (sparse: one cross-tabulation row);
    - the other factors and X: the diagonal (and X block) of ``S^{-1}``;
    - per observation, ``h_i' Omega^{-1} h_i = theta_1^2/d_j + g_i' S^{-1} g_i`` with
      ``g_i = h_r,i - (theta_1/d_j) b_j``.

    No ``q x q`` or ``n x n`` matrix is formed: the first factor's levels are processed in
    chunks, ``S^{-1}`` is the solver's own dense block. An iterative solver would estimate
    the same diagonals stochastically (``lmmops.linalg.trace``), with standard errors.

    Parameters
    ----------
    obj : DirectObjective
    ev : Evaluation
        From ``obj.evaluate``.
    z_only : bool
        Diagonals of ``(Lambda Z'WZ Lambda + I)^{-1}`` (conditional on ``beta``, lme4's
        ``condVar``) instead of the Z-and-X system.
    observations : bool
        Also return ``h_i' Omega^{-1} h_i`` for every observation (the leverages that
        give ``diag(P)``, see :func:`diag_P`).
    chunk : int, optional
        Levels of the first factor per block; default so a block stays under ~64 MB.

    Returns
    -------
    dict
        ``"omega_diag"``: list over factors (design order) of the diagonal of
        ``(Omega^{-1})_{kk}``; ``"omega_xx"``: ``(Omega^{-1})_{XX}`` (absent for
        ``z_only``); ``"h"``: per-observation ``h_i' Omega^{-1} h_i`` (with
        ``observations``).
    """
    L, d, tr_ = ev.factor
    qr = obj.qr
    p = 0 if z_only else obj.p
    mp = qr + p
    Sinv = _schur_inverse(L, mp)
    t1 = ev.theta[obj.first]
    X1 = obj.Z1T[:, :p]
    N = obj.N
    Nsc = N @ sp.diags(tr_) if qr else N
    q1 = obj.q1
    if chunk is None:
        chunk = max(1, int(8e6 // max(mp, 1)))
    diag1 = np.empty(q1)
    h = np.empty(obj.n) if observations else None
    if observations:
        codes1 = obj.design.codes[obj.first]
        order = np.argsort(codes1, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(codes1, minlength=q1))])
        idx_all, coef_all = observation_vectors(obj)
        th = np.concatenate([ev.theta[obj.rest], np.ones(obj.p)])
        val_all = coef_all * th[None, :]
        if z_only:
            nr = len(obj.rest)
            idx_all, val_all = idx_all[:, :nr], val_all[:, :nr]
        # h_r' S^{-1} h_r
        hSh = np.zeros(obj.n)
        for a in range(idx_all.shape[1]):
            for b in range(idx_all.shape[1]):
                hSh += val_all[:, a] * val_all[:, b] * Sinv[idx_all[:, a], idx_all[:, b]]
    for lo in range(0, q1, chunk):
        hi = min(q1, lo + chunk)
        if mp:
            U = np.zeros((hi - lo, mp))
            if qr:
                U += Nsc[lo:hi] @ Sinv[:qr, :]
            if p:
                U += X1[lo:hi] @ Sinv[qr:, :]
            U *= t1
            bSb = np.zeros(hi - lo)
            if qr:
                bSb += t1 * np.asarray(Nsc[lo:hi].multiply(U[:, :qr]).sum(axis=1)).ravel()
            if p:
                bSb += t1 * np.sum(X1[lo:hi] * U[:, qr:], axis=1)
        else:
            U = np.zeros((hi - lo, 0))
            bSb = np.zeros(hi - lo)
        dj = d[lo:hi]
        diag1[lo:hi] = 1.0 / dj + bSb / dj**2
        if observations:
            rows = order[starts[lo]:starts[hi]]
            jloc = codes1[rows] - lo
            cross = np.zeros(rows.size)
            for a in range(idx_all.shape[1]):
                cross += val_all[rows, a] * U[jloc, idx_all[rows, a]]
            dr = dj[jloc]
            h[rows] = (t1 * t1 / dr + hSh[rows] - 2.0 * (t1 / dr) * cross
                       + (t1 * t1 / dr**2) * bSb[jloc])
    out_diag = [None] * obj.K
    out_diag[obj.first] = diag1
    dS = np.diag(Sinv)
    for i, k in enumerate(obj.rest):
        out_diag[k] = dS[obj.rest_offsets[i]:obj.rest_offsets[i + 1]].copy()
    out = {"omega_diag": out_diag}
    if not z_only:
        out["omega_xx"] = Sinv[qr:, qr:].copy()
    if observations:
        out["h"] = h
    return out


def diag_P(obj, ev, sigma2=None, z_only=False):
    """The diagonal of ``P = V^{-1} - V^{-1}X(X'V^{-1}X)^{-1}X'V^{-1}``, exactly.

    ``P = R^{-1} - R^{-1}[Z X] C^{-1} [Z X]'R^{-1}`` gives
    ``P_ii = (w_i - w_i^2 h_i' Omega^{-1} h_i) / s^2`` with the leverages of
    :func:`level_space_diagonals`; ``z_only`` gives ``diag(V^{-1})`` instead. This is the
    quantity a stochastic diagonal estimator (``lmmops.linalg.trace``) would estimate on the
    iterative solver.

    Parameters
    ----------
    obj : DirectObjective
    ev : Evaluation
    sigma2 : float, optional
        Residual variance ``s^2``; default ``ev.sigma2``.
    z_only : bool

    Returns
    -------
    ndarray, shape (n_obs,)
    """
    s2 = ev.sigma2 if sigma2 is None else sigma2
    h = level_space_diagonals(obj, ev, z_only=z_only, observations=True)["h"]
    w = np.ones(obj.n) if obj.weights is None else obj.weights
    return (w - w * w * h) / s2


def P_columns(obj, ev, rows, sigma2=None):
    """Columns ``P[:, rows]`` and the block ``P[rows][:, rows]``, exactly.

    ``P delta_I = (W delta_I - W [Z Lambda, X] Omega^{-1} H_I W_I) / s^2`` with one
    level-space solve for the ``|I|`` right-hand sides ``H_I``.

    Parameters
    ----------
    obj : DirectObjective
    ev : Evaluation
    rows : array_like of int
    sigma2 : float, optional

    Returns
    -------
    cols : ndarray, shape (n_obs, len(rows))
    block : ndarray, shape (len(rows), len(rows))
    """
    rows = np.asarray(rows, dtype=np.int64).ravel()
    s2 = ev.sigma2 if sigma2 is None else sigma2
    w = np.ones(obj.n) if obj.weights is None else obj.weights
    m = rows.size
    theta = ev.theta
    codes = obj.design.codes
    b1 = np.zeros((obj.q1, m))
    br = np.zeros((obj.qr + obj.p, m))
    cols = np.arange(m)
    b1[codes[obj.first][rows], cols] += theta[obj.first] * w[rows]
    idx, coef = observation_vectors(obj, rows)
    th = np.concatenate([theta[obj.rest], np.ones(obj.p)])
    for a in range(idx.shape[1]):
        np.add.at(br, (idx[:, a], cols), coef[:, a] * th[a] * w[rows])
    x1, xr = obj.solve_spherical(ev, b1, br)
    # back to observation space: [Z Lambda, X] x
    fit = obj.X @ xr[obj.qr:]
    fit += theta[obj.first] * x1[codes[obj.first]]
    for i, k in enumerate(obj.rest):
        lo = obj.rest_offsets[i]
        fit += theta[k] * xr[lo + codes[k]]
    P = -w[:, None] * fit
    P[rows, cols] += w[rows]
    P /= s2
    return P, P[rows]
