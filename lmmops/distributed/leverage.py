"""``diag(P)`` per row of a partition, from the exact solver's level-space factor.

``P_ii = (w_i - w_i^2 h_i) / s^2`` with the leverage ``h_i = g_i' Omega^{-1} g_i`` of the
row ``g_i = [Lambda z_i; x_i]`` (:func:`lmmops.estimation.mme.diag_P`). Everything
``h_i`` needs is level-space: for random intercepts the dense ``S^{-1}`` of the Schur
block and the first factor's cross-tabulation with the others
(:func:`leverage_parts`, made once on the client), for slope terms the objective's
inverse blocks (:meth:`lmmops.estimation.vector.VectorObjective.quadratic_rows`). A
partition computes its rows' leverages from its codes and conditioned fixed-effects rows
(:func:`partition_leverages`), touching only the levels it holds, so the mean-shift
(outlier) residuals ``r_i = (P y)_i / P_ii`` and the studentised ``t_i`` are row-level
outputs like the others.

Examples
--------
>>> import lmmops, pandas as pd
>>> from lmmops.estimation.mme import diag_P
>>> rng = np.random.default_rng(0)
>>> df = pd.DataFrame({"a": rng.integers(0, 9, 120), "b": rng.integers(0, 4, 120)})
>>> df["y"] = rng.normal(size=9)[df.a] + rng.normal(size=120)
>>> res = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
>>> obj, ev = res.fit_objective()
>>> parts = leverage_parts(obj, ev)
>>> h = intercept_leverages(parts, obj.design.codes, res.model.X_conditioned)
>>> bool(np.allclose((1.0 - h) / ev.sigma2, diag_P(obj, ev)))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lmmops.estimation.mme import _schur_inverse  # the exact solver's own S^{-1}

__all__ = ["intercept_leverages", "leverage_parts", "partition_leverages"]


def leverage_parts(obj, ev):
    """What a partition needs for its rows' leverages under a random-intercept
    :class:`~lmmops.estimation.direct.DirectObjective` at ``ev`` (level space).

    Returns
    -------
    dict
    """
    L, d, tr_ = ev.factor
    qr, p = obj.qr, obj.p
    mp = qr + p
    return {"Sinv": _schur_inverse(L, mp), "d": np.asarray(d, dtype=np.float64),
            "Nsc": (obj.N @ sp.diags(tr_)).tocsr() if qr else obj.N.tocsr(),
            "X1": obj.Z1T[:, :p], "t1": float(ev.theta[obj.first]), "first": obj.first,
            "rest": list(obj.rest), "rest_offsets": np.asarray(obj.rest_offsets),
            "theta": np.asarray(ev.theta, dtype=np.float64), "qr": qr, "p": p}


def intercept_leverages(parts, codes, Xc, chunk=None):
    """``h_i`` of rows given by their level codes (``(K, n)``) and conditioned
    fixed-effects rows ``Xc`` (``(n, p)``), from :func:`leverage_parts`."""
    Sinv, d, Nsc, X1 = parts["Sinv"], parts["d"], parts["Nsc"], parts["X1"]
    t1, qr, p = parts["t1"], parts["qr"], parts["p"]
    rest, roff, theta = parts["rest"], parts["rest_offsets"], parts["theta"]
    codes = np.asarray(codes)
    n = codes.shape[1]
    c1 = codes[parts["first"]].astype(np.int64)
    ms = len(rest) + p
    idx = np.empty((n, ms), dtype=np.int64)
    val = np.empty((n, ms))
    for i, k in enumerate(rest):
        idx[:, i] = roff[i] + codes[k]
        val[:, i] = theta[k]
    for j in range(p):
        idx[:, len(rest) + j] = qr + j
        val[:, len(rest) + j] = Xc[:, j]
    hSh = np.zeros(n)
    for a in range(ms):
        for b in range(ms):
            hSh += val[:, a] * val[:, b] * Sinv[idx[:, a], idx[:, b]]
    levels, inv = np.unique(c1, return_inverse=True)
    inv = inv.ravel()
    mp = qr + p
    chunk = chunk or max(1, int(8e6 // max(mp, 1)))
    cross = np.zeros(n)
    bSb = np.zeros(levels.size)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=levels.size))])
    for lo in range(0, levels.size, chunk):  # the partition's levels of the first factor
        hi = min(levels.size, lo + chunk)
        J = levels[lo:hi]
        if mp:
            U = np.zeros((J.size, mp))
            if qr:
                U += Nsc[J] @ Sinv[:qr, :]
            if p:
                U += X1[J] @ Sinv[qr:, :]
            U *= t1
            if qr:
                bSb[lo:hi] += t1 * np.asarray(Nsc[J].multiply(U[:, :qr]).sum(axis=1)).ravel()
            if p:
                bSb[lo:hi] += t1 * np.sum(X1[J] * U[:, qr:], axis=1)
            rows = order[starts[lo]:starts[hi]]
            jloc = inv[rows] - lo
            for a in range(ms):
                cross[rows] += val[rows, a] * U[jloc, idx[rows, a]]
    dr = d[c1]
    return t1 * t1 / dr + hSh - 2.0 * (t1 / dr) * cross + (t1 * t1 / dr**2) * bSb[inv]


def partition_leverages(obj, ev, parts, codes, values, Xc):
    """``h_i`` of a partition's rows: random intercepts from :func:`leverage_parts`
    (``codes`` per factor), slope terms through the objective's ``quadratic_rows``
    (``codes`` and ``values`` per term; its inverse blocks cached on the client before
    the objective is sent)."""
    if parts is not None:
        return intercept_leverages(parts, codes, Xc)
    return obj.quadratic_rows(ev, codes, values, Xc)
