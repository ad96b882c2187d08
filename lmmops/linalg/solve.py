r"""The exact solve ``V x = b`` for a crossed covariance ``V``.

:func:`solve_V` takes the fastest exact route: level-space PCG on ``Z'Z + Lambda`` with a
preconditioner from :func:`lmmops.linalg.preconditioners.build`, lifted back to the
observations, with a residual measured on ``V`` itself (``docs/theory.rst``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lmmops.errors import ArgumentError
from lmmops.linalg import preconditioners as _pc
from lmmops.linalg.krylov import _atol_vector, _pcg_block
from lmmops.linalg.operators import CovarianceOperator, SparseLevelOperator
from lmmops.linalg.preconditioners import AUTO_LEVEL_KIND

__all__ = ["SolveInfo", "solve_V"]


@dataclass
class SolveInfo:
    """What :func:`solve_V` did.

    Attributes
    ----------
    iterations : int
        CG iterations (the largest over the columns for a block right-hand side).
    residual_norm : float
        ``||b - V x||`` measured with one product by the observation-space ``V`` (the
        largest column norm for a block).
    method : str
        The route taken, e.g. ``"level:block_gauss_seidel"`` or ``"observation:exact"``.
    converged : bool
        Whether every column reached ``max(rtol ||b||, atol)``.
    rtol : float
    setup_seconds : float
        Time spent building the preconditioner.
    solve_seconds : float
        Time spent in CG (and lifting).
    """

    iterations: int
    residual_norm: float
    method: str
    converged: bool
    rtol: float
    setup_seconds: float = 0.0
    solve_seconds: float = 0.0




def _reduce_zero_variances(V):
    """V without the factors whose variance is 0 (the same matrix, smaller level space)."""
    keep = np.flatnonzero(np.asarray(V.sigma2) > 0)
    if keep.size == V.design.n_factors:
        return V
    if keep.size == 0:
        return None
    design = V.design.subset_factors(keep.tolist())
    return CovarianceOperator(design, V.sigma2_e, np.asarray(V.sigma2)[keep],
                              parallel=V.parallel)


def solve_V(V, b, method="auto", rtol=1e-6, atol=0.0, maxiter=None, preconditioner=None,
            x0=None, level_operator="sparse", **options):
    """Solve ``V x = b`` for a crossed covariance ``V`` by preconditioned CG.

    Parameters
    ----------
    V : CovarianceOperator
    b : ndarray, shape (n_obs,) or (n_obs, m)
    method : {'auto', 'level', 'observation', 'direct'}, optional
        ``'level'``: CG on ``M = Z'Z + Lambda`` with ``rhs = Z'b``, then
        ``x = lift(u, b)`` (:ref:`theory-level-space`). ``'observation'``: CG on ``V`` itself.
        ``'direct'``: no iteration; ``V^{-1} b`` by the dense Schur complement of M on
        the factors other than the largest (at most ``max_dense`` = 4000 levels), factored
        once: worth its setup when there are many right-hand sides (each then costs about
        1.5 V matvecs). ``rtol``, ``atol``, ``maxiter``, ``preconditioner`` and ``x0`` do
        not apply to it, and ``converged`` reports whether the residual met the target.
        ``'auto'`` (default) is ``'level'`` with :data:`AUTO_LEVEL_KIND` (any number of
        factors); factors with zero variance are dropped first, and with all variances 0
        ``V = sigma2_e I`` is solved directly.
    rtol, atol : float, optional
        Target ``||b - V x|| <= max(rtol ||b||, atol)`` on the observation-space residual,
        per column. In level space CG stops on a guaranteed bound of that residual,
        ``||Z Lambda^{-1} r|| <= sqrt(K sum_k ||D_k^{1/2} r_k / lambda_k||^2)`` with ``r``
        the level-space residual, so the target holds on exit (up to rounding).
    maxiter : int, optional
        Per column; default ``10 q`` (level) or ``10 n`` (observation).
    preconditioner : str or object or None, optional
        A kind for :func:`lmmops.linalg.preconditioners.build` in the chosen space, or an object
        with ``aspreconditioner()``; default the auto choice (level) or ``'exact'``
        (observation).
    x0 : ndarray, optional
        Starting guess (observation space only).
    level_operator : {'sparse', 'kernel'}, optional
        How CG applies M in level space: through the sparse ``Z'Z`` of the design
        (:class:`SparseLevelOperator`, default: ``O(cells)`` per product, ``Z'Z`` built once
        per design) or the matrix-free row pass of ``V.level_space()`` (``O(n K)``, nothing
        stored).
    **options
        Passed to :func:`lmmops.linalg.preconditioners.build`.

    Returns
    -------
    x : ndarray, shape of ``b``
    info : SolveInfo
        ``iterations``, ``residual_norm`` (measured on V), ``method``, ``converged``.

    Raises
    ------
    ArgumentError
        For ``b`` of the wrong shape, a NaN or infinite entry in ``b`` or ``x0``, or an
        unknown ``method`` or ``level_operator``.

    Notes
    -----
    Why level space: there ``M`` is exact (V in Woodbury form), and a good preconditioner
    of M (proportional, spectral, block Gauss-Seidel) gives 5-10 iterations on skewed
    designs, while the same approximation lifted to observation space is a disastrous
    preconditioner of V (:ref:`theory-preconditioning`). A level-space iteration costs one
    pass over the rows for ``M u`` plus one for the preconditioner, and the vectors have
    length q.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.linalg.operators import CovarianceOperator
    >>> rng = np.random.default_rng(0)
    >>> codes = np.vstack([rng.integers(0, 30, 500), rng.integers(0, 8, 500)])
    >>> V = CovarianceOperator(CrossedDesign.from_codes(codes), 1.0, [0.5, 2.0])
    >>> b = rng.standard_normal(500)
    >>> x, info = solve_V(V, b, rtol=1e-8)
    >>> info.method, info.converged, bool(info.residual_norm <= 1e-8 * np.linalg.norm(b))
    ('level:block_gauss_seidel', True, True)
    """

    b = np.asarray(b, dtype=np.float64)
    n = V.shape[0]
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ArgumentError(f"b has shape {b.shape}, expected ({n},) or ({n}, m)")
    for what, arr in (("b", b), ("x0", x0)):
        bad = None if arr is None else ~np.isfinite(np.asarray(arr, dtype=np.float64))
        if bad is not None and bad.any():
            raise ArgumentError(
                f"{what} has {int(bad.sum())} NaN or infinite entr(ies) (first at flat index "
                f"{int(np.flatnonzero(bad)[0])}); V x = b needs a finite right-hand side"
            )
    if level_operator not in ("sparse", "kernel"):
        raise ArgumentError(f"level_operator must be 'sparse' or 'kernel', got {level_operator!r}")
    if method not in ("auto", "level", "observation", "direct"):
        raise ArgumentError(
            f"method must be 'auto', 'level', 'observation' or 'direct', got {method!r}"
        )
    b2 = b[:, None] if b.ndim == 1 else b
    bnorm = np.linalg.norm(b2, axis=0)
    tol = _atol_vector(bnorm, rtol, atol)
    t0 = time.perf_counter()
    if method in ("auto", "direct"):
        Vr = _reduce_zero_variances(V)
        if Vr is None:  # every factor variance is 0: V = sigma2_e I
            x2 = b2 / V.sigma2_e
            info = SolveInfo(0, 0.0, "diagonal", True, rtol)
            return (x2[:, 0] if b.ndim == 1 else x2), info
    if method == "direct":
        if preconditioner is not None or x0 is not None:
            raise ArgumentError("method='direct' takes no preconditioner and no x0")
        P = _pc.build(Vr, kind="exact", inner="direct", **options)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        x2 = P.solve(b2)
        iters = np.zeros(b2.shape[1], dtype=int)
        done = None
        route = "direct:schur"
    elif method in ("auto", "level"):
        Vr = Vr if method == "auto" else V
        M = Vr.level_space()
        kind = AUTO_LEVEL_KIND if preconditioner is None else preconditioner
        P = kind if hasattr(kind, "aspreconditioner") else _pc.build(M, kind=kind, **options)
        Pop = P.aspreconditioner()
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        rhs = M.rhs(b2)
        design = Vr.design
        weights = np.concatenate(
            [design.counts(k) / lam**2 for k, lam in enumerate(M.lambdas)]
        ).astype(np.float64)
        Kf = design.n_factors

        def bound(R, cols):
            return np.sqrt(Kf * np.einsum("i,ij->j", weights, R * R))

        q = M.shape[0]
        mi = 10 * q if maxiter is None else int(maxiter)
        U = np.zeros((q, b2.shape[1]))
        active = np.flatnonzero(bnorm > 0)
        iters = np.zeros(b2.shape[1], np.int64)
        done = np.ones(b2.shape[1], bool)
        if active.size:
            Ua = np.zeros((q, active.size))
            Aop = SparseLevelOperator(M) if level_operator == "sparse" else M
            it_a, done_a = _pcg_block(Aop, np.ascontiguousarray(rhs[:, active]), Ua,
                                      tol[active], mi, M=Pop, stop_norms=bound)
            U[:, active] = Ua
            iters[active], done[active] = it_a, done_a
        x2 = M.lift(U, b2)
        name = getattr(P, "kind", type(P).__name__)
        route = f"level:{name}"
    else:
        kind = "exact" if preconditioner is None else preconditioner
        P = kind if hasattr(kind, "aspreconditioner") else _pc.build(V, kind=kind, **options)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        mi = 10 * n if maxiter is None else int(maxiter)
        X = np.zeros_like(b2) if x0 is None else np.array(x0, np.float64).reshape(b2.shape)
        iters, done = _pcg_block(V, b2, X, tol, mi, M=P.aspreconditioner())
        x2 = X
        route = f"observation:{getattr(P, 'kind', type(P).__name__)}"
    solve = time.perf_counter() - t1
    res = np.linalg.norm(b2 - V.matmat(x2) if b2.shape[1] > 1 else
                         b2[:, 0:1] - V.matvec(x2[:, 0])[:, None], axis=0)
    if done is None:  # direct: exact up to rounding; say so only if the residual shows it
        done = res <= tol
    info = SolveInfo(
        iterations=int(iters.max(initial=0)),
        residual_norm=float(res.max(initial=0.0)),
        method=route,
        converged=bool(done.all()),
        rtol=float(rtol),
        setup_seconds=setup,
        solve_seconds=solve,
    )
    return (x2[:, 0] if b.ndim == 1 else x2), info
