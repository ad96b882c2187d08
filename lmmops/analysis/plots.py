"""Diagnostic plots of a fit (the optional ``plot`` extra: ``pip install 'lmmops[plot]'``).

- ``"caterpillar"``: the BLUPs of one factor, sorted, with intervals from their
  prediction error variances (``u_tilde -/+ z sqrt(PEV)``);
- ``"resid_fitted"``: conditional residuals against fitted values;
- ``"qq"``: normal QQ plot of the studentised conditional residuals ``t_i``;
- ``"outliers"``: the mean-shift outlier scan, ``|t_i|`` against the observation, with the
  Bonferroni line and the largest labelled;
- ``"diagnostics"``: the four in one figure (what ``lmmops fit --plot`` writes).

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from scipy import stats

from lmmops.errors import LmmopsError

__all__ = ["KINDS", "plot", "save_diagnostics"]

KINDS = ("caterpillar", "resid_fitted", "qq", "outliers", "diagnostics")


def _pyplot():
    try:
        import matplotlib

        if matplotlib.get_backend().lower() not in ("agg",) and not _has_display():
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmmopsError(
            "plotting needs matplotlib: pip install 'lmmops[plot]'"
        ) from None
    return plt


def _has_display():

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def plot(result, kind="diagnostics", ax=None, factor=None, level=0.95, top=5, coef=None):
    """Draw a diagnostic plot.

    Parameters
    ----------
    result : LMMResult
    kind : {"caterpillar", "resid_fitted", "qq", "outliers", "diagnostics"}
    ax : matplotlib Axes, optional
        Draw into this axes (not for ``"diagnostics"``, which makes its own figure).
    factor : str, optional
        Grouping factor for the caterpillar plot; default the one with the fewest levels
        (the most readable).
    coef : str, optional
        For a factor with vector-valued terms (random slopes), the coefficient to plot,
        one plot per coefficient (``"(Intercept)"``, ``"Days"``); default the first.
    level : float
        Interval level of the caterpillar plot.
    top : int
        Number of observations labelled in the outlier scan.

    Returns
    -------
    matplotlib Axes (or Figure for ``"diagnostics"``)

    Raises
    ------
    LmmopsError
        If matplotlib is missing, for an unknown kind or factor.
    """
    if kind not in KINDS:
        raise LmmopsError(f"unknown plot kind {kind!r}; choose from {', '.join(KINDS)}")
    plt = _pyplot()
    if kind == "diagnostics":
        fig, axes = plt.subplots(2, 2, figsize=(12, 9), layout="constrained")
        _caterpillar(result, axes[0, 0], factor, level, coef)
        _resid_fitted(result, axes[0, 1])
        _qq(result, axes[1, 0])
        _outliers(result, axes[1, 1], top)
        fig.suptitle(f"lmmops: {result.formula}", fontsize=12)
        return fig
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    {"caterpillar": lambda: _caterpillar(result, ax, factor, level, coef),
     "resid_fitted": lambda: _resid_fitted(result, ax),
     "qq": lambda: _qq(result, ax),
     "outliers": lambda: _outliers(result, ax, top)}[kind]()
    return ax


def save_diagnostics(result, path, **kwargs):
    """Write the four-panel diagnostic figure to ``path`` (PNG, PDF or SVG by suffix).

    Parameters
    ----------
    result : LMMResult
    path : str
    **kwargs
        Passed to :func:`plot`.
    """
    plt = _pyplot()
    fig = plot(result, "diagnostics", **kwargs)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _caterpillar(result, ax, factor, level, coef=None):
    names = list(result.ranef)
    if factor is None:
        factor = min(names, key=lambda nm: len(result.ranef[nm]))
    if factor not in names:
        raise LmmopsError(f"unknown factor {factor!r}; factors are {names}")
    blup, pev = result.ranef[factor], result.ranef_pev()[factor]
    if isinstance(blup, pd.DataFrame):  # a grouping factor with vector-valued terms
        cols = list(blup.columns)
        coef = cols[0] if coef is None else coef
        if coef not in cols:
            raise LmmopsError(f"unknown coefficient {coef!r} of {factor!r}; its "
                              f"coefficients are {cols}")
        blup, pev = blup[coef], pev[coef]
        label = f"{factor}: {coef}"
    elif coef is not None and coef != "(Intercept)":
        raise LmmopsError(f"{factor!r} has only a random intercept, not {coef!r}")
    else:
        label = factor
    se = np.sqrt(pev.to_numpy())
    z = stats.norm.ppf(0.5 + level / 2)
    order = np.argsort(blup.to_numpy(), kind="stable")
    b = blup.to_numpy()[order]
    s = se[order]
    pos = np.arange(b.size)
    excl = (b - z * s > 0) | (b + z * s < 0)
    many = b.size > 60
    if many:
        ax.fill_between(pos, b - z * s, b + z * s, color="0.8", label=f"{level:.0%} interval")
        ax.plot(pos, b, color="C0", lw=1, label="BLUP")
        ax.plot(pos[excl], b[excl], "o", ms=2, color="C3",
                label=f"interval excludes 0 ({int(excl.sum())})")
        ax.set_xlabel(f"levels of {label}, sorted ({b.size})")
    else:
        ax.errorbar(b, pos, xerr=z * s, fmt="o", ms=4, color="C0", ecolor="0.5", capsize=2)
        ax.plot(b[excl], pos[excl], "o", ms=4, color="C3", zorder=3,
                label=f"interval excludes 0 ({int(excl.sum())})")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(pos)
        ax.set_yticklabels([str(v) for v in blup.index[order]],
                           fontsize=8 if b.size <= 30 else 6)
        ax.set_ylabel(f"level of {label}")
        ax.axvline(0.0, color="k", lw=0.8)
    if many:
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_ylabel(f"BLUP of {label}")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.set_xlabel(f"BLUP of {label} with {level:.0%} interval (sqrt PEV)")
    ax.set_title(f"Caterpillar plot: {label}")


def _resid_fitted(result, ax):
    fitted = result.fitted
    r = result.residuals("conditional")
    n = r.size
    ax.scatter(fitted, r, s=4 if n > 2000 else 12, alpha=0.25 if n > 2000 else 0.7,
               color="C0", edgecolors="none")
    ax.axhline(0.0, color="k", lw=0.8)
    # a running mean shows any trend
    order = np.argsort(fitted)
    nb = int(min(40, max(5, n // 50)))
    edges = np.array_split(order, nb)
    ax.plot([fitted[e].mean() for e in edges], [r[e].mean() for e in edges], color="C3",
            lw=1.5, label="binned mean")
    ax.set_xlabel("fitted values (X beta + Z b)")
    ax.set_ylabel("conditional residual")
    ax.set_title("Residuals vs fitted")
    ax.legend(loc="upper right", fontsize=8)


def _qq(result, ax):
    t = np.sort(result.residuals("studentized"))
    n = t.size
    pp = (np.arange(1, n + 1) - 0.5) / n
    qn = stats.norm.ppf(pp)
    ax.scatter(qn, t, s=4 if n > 2000 else 12, color="C0", edgecolors="none")
    lim = [qn.min(), qn.max()]
    ax.plot(lim, lim, color="C3", lw=1, label="y = x")
    ax.set_xlabel("standard normal quantiles")
    ax.set_ylabel("studentised conditional residual t_i")
    ax.set_title("Normal QQ plot")
    ax.legend(loc="upper left", fontsize=8)


def _outliers(result, ax, top):
    scan = result.outliers(method="msom")
    rows = scan["row"].to_numpy()
    t = np.abs(scan["t"].to_numpy())
    n = rows.size
    ax.scatter(rows, t, s=3 if n > 2000 else 10, color="C0", edgecolors="none")
    crit = stats.norm.isf(0.025 / n)
    ax.axhline(crit, color="C3", lw=1, ls="--", label=f"Bonferroni 5% ({crit:.2f})")
    for i in range(min(top, n)):
        ax.annotate(str(scan.index[i]), (rows[i], t[i]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("observation")
    ax.set_ylabel("|t_i| (mean-shift outlier statistic)")
    ax.set_title("Outlier scan (MSOM)")
    ax.set_ylim(0, max(crit, float(t.max()) if n else crit) * 1.15)
    ax.legend(loc="upper left", fontsize=8)
