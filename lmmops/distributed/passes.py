"""The three passes over the partitions, as map and combine functions on pandas/NumPy.

1. ``levels``: the distinct labels of the columns whose level dictionary is not known
   from the metadata (skipped when every grouping factor and every non-numeric
   fixed-effect column is a categorical with known categories);
2. ``moments``: the count, means, centred cross-products and magnitudes of ``[X y]``
   (:class:`~lmmops.distributed.moments.Moments`) and the rows per level, which fix the
   conditioning, the rank test and the used levels;
3. ``statistics``: the level-space sufficient statistics of the conditioned rows
   (:class:`~lmmops.data.statistics.SufficientStatistics` for random intercepts,
   :class:`~lmmops.estimation.vector.VectorStatistics` for slope terms) and the
   unweighted counts and cell tables of the grouping factors.

Each map function takes one pandas partition, its position and the
:class:`~lmmops.distributed.frame.Plan`; each combine function takes a list of map or
combine outputs (a tree reduction applies it level by level). Everything returned is in
level space.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmmops.data.statistics import SufficientStatistics, level_sums
from lmmops.data.terms import INTERCEPT, RandomEffectsTerm, check_term_rank
from lmmops.data.terms import TOL as TERM_TOL
from lmmops.distributed.frame import (
    combination_values,
    level_values,
    merge_level_values,
    prepare,
)
from lmmops.distributed.moments import Moments, rank_from_moments
from lmmops.errors import DesignError
from lmmops.estimation.vector import VectorStatistics

__all__ = ["SPAN_TOL", "check_terms", "combine_levels", "combine_moments",
           "combine_statistics", "conditioned_rows", "map_levels", "map_moments",
           "map_statistics", "term_moments"]


def map_levels(part, i, columns, interactions, labels):
    """Pass 1: ``{column: distinct labels}`` of the partition, and for each interaction
    factor ``{name: its distinct rows of component labels}``."""
    label = labels[i] if i < len(labels) else f"partition {i}"
    return ({c: level_values(part, c, label) for c in columns},
            {g: combination_values(part, cols, label) for g, cols in interactions.items()})


def combine_levels(parts):
    """Pass 1's combine: the union per column and per interaction."""
    return ({c: merge_level_values([p[0][c] for p in parts]) for c in parts[0][0]},
            {g: pd.concat([p[1][g] for p in parts], ignore_index=True).drop_duplicates(
                ignore_index=True) for g in parts[0][1]})


def map_moments(part, i, plan):
    """Pass 2: moments of ``[X y]`` (all fixed-effects columns), rows per level, for
    slope terms what their identifiability checks need (:func:`term_moments`), and the
    partition's number of rows (``{i: n_i}``, for global row positions)."""
    a = prepare(part, plan, i)
    counts = [np.bincount(a["codes"][k], minlength=len(lv)).astype(np.int64)
              for k, lv in enumerate(plan.levels)]
    info = term_moments(a, plan) if plan.slopes else None
    return Moments.from_arrays(a["X"], a["y"]), counts, info, {i: len(part)}


def combine_moments(parts):
    """Pass 2's combine."""
    info = None
    if parts[0][2] is not None:
        terms = []
        for t in range(len(parts[0][2]["terms"])):
            items = [p[2]["terms"][t] for p in parts]
            if items[0] is None:
                terms.append(None)
                continue
            terms.append({"mom": Moments.combine([x["mom"] for x in items]),
                          "lo": np.minimum.reduce([x["lo"] for x in items]),
                          "hi": np.maximum.reduce([x["hi"] for x in items])})
        pairs = {key: Moments.combine([p[2]["pairs"][key] for p in parts])
                 for key in parts[0][2]["pairs"]}
        info = {"terms": terms, "pairs": pairs}
    sizes = {}
    for p in parts:
        sizes.update(p[3])
    return (Moments.combine([p[0] for p in parts]),
            [sum(p[1][k] for p in parts) for k in range(len(parts[0][1]))], info, sizes)


def _term_values(a, t, n):
    v = a["values"][t]
    return np.ones((n, 1)) if v is None else v


def term_moments(a, plan):
    """Per slope term (formula order): the moments of its columns (the rank test) and
    per level their smallest and largest values (a column constant within every level);
    per pair of terms on one factor, the moments of their columns side by side (a column
    of one in the span of the other's)."""
    n = a["y"].shape[0]
    terms = []
    for t, (k, spec) in enumerate(plan.term_specs):
        if spec is None:
            terms.append(None)
            continue
        v = a["values"][t]
        q = len(plan.levels[k])
        lo = np.full((q, v.shape[1]), np.inf)
        hi = np.full((q, v.shape[1]), -np.inf)
        c = a["codes"][k]
        for j in range(v.shape[1]):
            np.minimum.at(lo[:, j], c, v[:, j])
            np.maximum.at(hi[:, j], c, v[:, j])
        terms.append({"mom": Moments.from_arrays(v, np.zeros(n)), "lo": lo, "hi": hi})
    pairs = {}
    for t1, (k1, _) in enumerate(plan.term_specs):
        for t2 in range(t1 + 1, len(plan.term_specs)):
            if plan.term_specs[t2][0] == k1:
                V = np.hstack([_term_values(a, t1, n), _term_values(a, t2, n)])
                pairs[(t1, t2)] = Moments.from_arrays(V, np.zeros(n))
    return {"terms": terms, "pairs": pairs}


def check_terms(random_terms, specs, info, n):
    """The identifiability checks of :func:`lmmops.data.terms.build_terms` that read the
    rows, from :func:`term_moments` (same messages).

    Raises
    ------
    DesignError
    """
    for t, (rt, (_, names, spec)) in enumerate(zip(random_terms, specs)):
        if spec is None:
            continue
        item = info["terms"][t]
        keep = set(rank_from_moments(item["mom"], TERM_TOL).tolist())
        check_term_rank(rt, names, [c for j, c in enumerate(names) if j not in keep])
        if INTERCEPT in names:
            seen = np.isfinite(item["lo"][:, 0])
            for j, name in enumerate(names):
                if name == INTERCEPT:
                    continue
                lo, hi = item["lo"][seen, j], item["hi"][seen, j]
                spread = float(np.max(hi - lo))
                if spread <= TERM_TOL * (float(hi.max()) - float(lo.min())):
                    raise DesignError(
                        f"random-effects term {rt}: column '{name}' is constant within "
                        f"every level of '{rt.group}', so its random slope is a multiple of "
                        "the random intercept in each level and the two cannot be told "
                        "apart; make it a fixed effect only, or drop it from the term")
    for (t1, t2), mom in info["pairs"].items():
        d1 = len(specs[t1][1])
        G = mom.M2[:-1, :-1] + mom.n * np.outer(mom.mean[:-1], mom.mean[:-1])
        m = G.shape[0]
        for a, b in ((t1, t2), (t2, t1)):
            ia = np.arange(d1) if a == t1 else np.arange(d1, m)
            ib = np.arange(d1, m) if a == t1 else np.arange(d1)
            Gbb = G[np.ix_(ib, ib)]
            for j, name in zip(ia, specs[a][1]):
                g = G[ib, j]
                coef = np.linalg.lstsq(Gbb, g, rcond=None)[0]
                resid2 = max(float(G[j, j] - g @ coef), 0.0)
                # the rows' test is |r| <= tol |x|; from the Gram |r|^2 carries rounding
                # of eps |x|^2, so a column in the span shows |r| ~ sqrt(eps) |x|
                if resid2 <= SPAN_TOL**2 * G[j, j]:
                    s1, s2 = random_terms[a], random_terms[b]
                    how = ("is also a column" if name in specs[b][1]
                           else "lies in the span of the columns")
                    raise DesignError(
                        f"random-effects terms {s1} and {s2} on grouping factor "
                        f"'{s1.group}': column '{name}' of the first {how} of the second "
                        f"({', '.join(specs[b][1])}), so only the sum of the two terms' "
                        "variances along it is identifiable; merge them into one term or "
                        "drop one (for a factor f, (f || g) is (1 | g) + (0 + f | g) in "
                        "lme4: write (1 + f | g) or (0 + f | g))")


#: a column is in the span of another term's when its residual norm is below this
#: fraction of its norm (the rows' test uses 1e-7; the Gram resolves about 1e-7 too)
SPAN_TOL = 1e-6


def conditioned_rows(a, plan):
    """``(X_c, y_c)`` of a prepared partition: the kept columns in the conditioned
    basis and the conditioned response (:mod:`lmmops.data.conditioning`)."""
    cond = plan.conditioning
    Xc = cond.X(a["X"][:, plan.keep])
    yc = (a["y"] - Xc @ cond.b) / cond.scale
    return Xc, yc


def map_statistics(part, i, plan):
    """Pass 3: the level-space statistics of the conditioned rows.

    Returns
    -------
    (stats, design_stats)
        ``stats``: weighted :class:`SufficientStatistics` (random intercepts) or
        :class:`VectorStatistics` (slopes); ``design_stats``: unweighted
        :class:`SufficientStatistics` of the grouping factors (counts, cell tables, the
        moment start's sums), or None when it is ``stats`` itself (unweighted
        intercepts).
    """
    a = prepare(part, plan, i)
    Xc, yc = conditioned_rows(a, plan)
    q = [len(lv) for lv in plan.levels]
    codes = a["codes"]
    unweighted = None
    if plan.slopes:
        terms = [RandomEffectsTerm(plan.term_groups[t], codes[k], plan.levels[k],
                                   plan.term_columns[t], a["values"][t])
                 for t, (k, _) in enumerate(plan.term_specs)]
        stats = VectorStatistics.from_rows(terms, Xc, yc, a["w"])
        unweighted = SufficientStatistics.from_codes(codes, q, Xc, yc)
    else:
        stats = SufficientStatistics.from_codes(codes, q, Xc, yc, a["w"])
        if a["w"] is not None:  # the moment start's unweighted sums; the cell tables'
            # pattern (all the design's checks read) is the weighted tables'
            T = np.column_stack([Xc, yc])
            unweighted = SufficientStatistics(
                q, T.shape[0], T.T @ T, [level_sums(codes[k], q[k], T) for k in range(len(q))],
                [level_sums(codes[k], q[k]) for k in range(len(q))], {})
    return stats, unweighted


def combine_statistics(parts):
    """Pass 3's combine."""
    first = parts[0][0]
    kind = VectorStatistics if isinstance(first, VectorStatistics) else SufficientStatistics
    stats = kind.combine([p[0] for p in parts])
    unw = None
    if parts[0][1] is not None:
        unw = SufficientStatistics.combine([p[1] for p in parts])
    return stats, unw
