"""Simulated psycholinguistic experiment: 40 subjects x 24 items, fully crossed.

Writes ``psycholing_sim.csv`` next to this file (``python tests/data/make_psycholing_sim.py``);
the CSV is the single source of truth that ``make_lme4_slopes.R`` reads, and running this
script again reproduces it byte for byte (``--check`` compares instead of writing).

Design: every subject sees every item once (960 rows). A 2 x 2 within-subject and
within-item design, counterbalanced as a Latin square: subject s (0-based) sees item i
(0-based) in condition (s + i) mod 4, so each subject sees each condition on 6 items and
each item is seen in each condition by 10 subjects. Factors A and B are sum-coded as
numeric -0.5/+0.5 columns; the interaction column is A*B (+-0.25).

Generating model (reading times in ms, rounded to whole ms):

    y = 600 + 40 A + 25 B + 20 A B + s[subj] . (1, A, B, AB) + w[item] . (1, A, B, AB) + e

with s ~ N(0, Sigma_subj), w ~ N(0, Sigma_item), e ~ N(0, 120^2). SDs and correlations
are in ``SUBJ_SD``/``SUBJ_CORR`` and ``ITEM_SD``/``ITEM_CORR``. The by-item B slope has
variance exactly zero, so a maximal fit should put its variance at or near zero.

Random numbers: ``numpy.random.default_rng(SEED)``, drawn in this order with
``standard_normal`` only (stable across numpy versions): subject effects (40 x 4), item
effects (24 x 4), residuals (960); correlated effects are z @ L.T with L the Cholesky
factor of the covariance (for the item covariance, of its nonsingular part).

The seed was chosen, not drawn: with 24 items a zero variance is estimated with an SD of
about 20 ms, so most seeds give a singular fit whose by-item B SD is far from zero (the
first try, seed 20140614, gave 26 ms, almost perfectly correlated with the A slope). Seeds
1-40 were fitted with lme4 (y ~ A * B + (1 + A + B | subj) + (1 + A + B | item), REML,
minqa bobyqa) and seed 40 kept: its by-item B SD is near zero in both fitted models
(2.45 ms; 0.56 ms with A*B slopes; sigma about 123 ms). The other estimates are
unremarkable (e.g. by-subject SDs 83, 38, 16 against 90, 35, 25).
"""

import pathlib
import sys

import numpy as np

SEED = 40  # chosen by looking at lme4 fits, see the module docstring
N_SUBJ, N_ITEM = 40, 24
BETA = {"(Intercept)": 600.0, "A": 40.0, "B": 25.0, "A:B": 20.0}
TERMS = ("(Intercept)", "A", "B", "A:B")
SUBJ_SD = np.array([90.0, 35.0, 25.0, 20.0])
SUBJ_CORR = np.array([
    [1.0, 0.4, 0.3, 0.1],
    [0.4, 1.0, 0.2, -0.1],
    [0.3, 0.2, 1.0, 0.0],
    [0.1, -0.1, 0.0, 1.0],
])
ITEM_SD = np.array([45.0, 20.0, 0.0, 15.0])  # by-item B slope: variance zero
ITEM_CORR = np.array([
    [1.0, 0.3, 0.0, -0.2],
    [0.3, 1.0, 0.0, 0.1],
    [0.0, 0.0, 1.0, 0.0],
    [-0.2, 0.1, 0.0, 1.0],
])
SIGMA = 120.0
# condition index -> (A, B)
CONDITIONS = {0: (-0.5, -0.5), 1: (0.5, -0.5), 2: (-0.5, 0.5), 3: (0.5, 0.5)}
CSV = pathlib.Path(__file__).with_name("psycholing_sim.csv")


def _chol_psd(sd, corr):
    """Lower factor L with L L' = diag(sd) corr diag(sd); zero-SD rows/columns stay zero."""
    cov = np.outer(sd, sd) * corr
    keep = sd > 0
    L = np.zeros_like(cov)
    L[np.ix_(keep, keep)] = np.linalg.cholesky(cov[np.ix_(keep, keep)])
    return L


def simulate():
    """Return the data set as a dict of column name -> list (rows ordered subj, item)."""
    rng = np.random.default_rng(SEED)
    b_subj = rng.standard_normal((N_SUBJ, 4)) @ _chol_psd(SUBJ_SD, SUBJ_CORR).T
    b_item = rng.standard_normal((N_ITEM, 4)) @ _chol_psd(ITEM_SD, ITEM_CORR).T
    eps = SIGMA * rng.standard_normal(N_SUBJ * N_ITEM)
    s_idx = np.repeat(np.arange(N_SUBJ), N_ITEM)
    i_idx = np.tile(np.arange(N_ITEM), N_SUBJ)
    cond = (s_idx + i_idx) % 4
    A = np.array([CONDITIONS[c][0] for c in cond])
    B = np.array([CONDITIONS[c][1] for c in cond])
    X = np.column_stack([np.ones_like(A), A, B, A * B])
    beta = np.array([BETA[t] for t in TERMS])
    eta = X @ beta + np.sum(X * b_subj[s_idx], axis=1) + np.sum(X * b_item[i_idx], axis=1)
    y = np.rint(eta + eps).astype(int)
    return {
        "subj": [f"s{k + 1:02d}" for k in s_idx],
        "item": [f"i{k + 1:02d}" for k in i_idx],
        "cond": [f"a{int(a > 0) + 1}b{int(b > 0) + 1}" for a, b in zip(A, B)],
        "A": A.tolist(),
        "B": B.tolist(),
        "y": y.tolist(),
    }


def to_csv_text(data):
    cols = list(data)
    lines = [",".join(cols)]
    for row in zip(*data.values()):
        lines.append(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def main(argv):
    text = to_csv_text(simulate())
    if "--check" in argv:
        same = CSV.read_text() == text
        print("psycholing_sim.csv reproduced" if same else "psycholing_sim.csv DIFFERS")
        return 0 if same else 1
    CSV.write_text(text)
    print(f"wrote {CSV} ({text.count(chr(10)) - 1} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
