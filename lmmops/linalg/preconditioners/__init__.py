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

The package has one module per family, importing one way (``base`` <- the families <-
``registry`` <- this package): :mod:`~lmmops.linalg.preconditioners.base` (the
:class:`Preconditioner` base class, the level- and observation-space bases, shared
helpers), :mod:`~lmmops.linalg.preconditioners.simple` (``identity``, ``jacobi``,
``proportional``), :mod:`~lmmops.linalg.preconditioners.spectral` (level-space D1 and the
normalised SVD), :mod:`~lmmops.linalg.preconditioners.gauss_seidel`,
:mod:`~lmmops.linalg.preconditioners.amg`, :mod:`~lmmops.linalg.preconditioners.lowrank`,
:mod:`~lmmops.linalg.preconditioners.observation` (every observation-space kind but
``identity``) and :mod:`~lmmops.linalg.preconditioners.registry` (the kind names,
:func:`build` and :func:`apply_cost`). A new kind is a class in a family module and an
entry in the registry.
"""

from lmmops.linalg.preconditioners.base import Preconditioner
from lmmops.linalg.preconditioners.registry import (
    AUTO_LEVEL_KIND,  # noqa: F401 - importable here, as before; not in __all__
    LEVEL_KINDS,
    OBSERVATION_KINDS,
    apply_cost,
    build,
)

__all__ = [
    "LEVEL_KINDS",
    "OBSERVATION_KINDS",
    "Preconditioner",
    "apply_cost",
    "build",
]
