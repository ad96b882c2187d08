"""The kind names and :func:`build`, the one entry point: which class serves each kind in
level space and in observation space, with the per-kind option handling, and
:func:`apply_cost`, the measured cost of one application."""

from __future__ import annotations

import time

import numpy as np

from lmmops.errors import ArgumentError, ArgumentTypeError, DesignError
from lmmops.linalg.preconditioners.amg import _AMG
from lmmops.linalg.preconditioners.base import _is_covariance, _is_level
from lmmops.linalg.preconditioners.gauss_seidel import _BlockGaussSeidel
from lmmops.linalg.preconditioners.lowrank import _LowRank
from lmmops.linalg.preconditioners.observation import (
    _DirectObservation,
    _ExactObservation,
    _Lifted,
    _ObsOperatorWrap,
    _schur_gram_flops,
    _SpectralObservation,
)
from lmmops.linalg.preconditioners.simple import _Identity, _Jacobi, _Proportional
from lmmops.linalg.preconditioners.spectral import _Spectral
from lmmops.paper.lowrank import ExactInverse

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

LEVEL_KINDS = (
    "identity", "jacobi", "proportional", "spectral", "lowrank", "block_gauss_seidel", "amg",
)
OBSERVATION_KINDS = ("identity", "spectral", "exact", "lowrank", "lifted")

_LEVEL_BUILDERS = {
    "jacobi": _Jacobi,
    "proportional": _Proportional,
    "spectral": _Spectral,
    "block_gauss_seidel": _BlockGaussSeidel,
    "amg": _AMG,
    "lowrank": _LowRank,
}


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
        exact_options = {k: options.pop(k) for k in ("inner_rtol", "inner_maxiter")
                         if k in options}
        M = V.level_space()
        inner = _build_level(M, AUTO_LEVEL_KIND if inner is None else inner, **options)
        return _ExactObservation(V, M, inner, **exact_options)
    if kind == "lifted":
        M = V.level_space()
        base = options.pop("base", "proportional")
        return _Lifted(V, M, _build_level(M, base, rank=rank, **options))
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
