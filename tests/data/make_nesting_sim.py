"""Simulated three-level nested design: schools / classes / pupils, unbalanced.

Writes ``nesting_sim.csv`` next to this file (``python tests/data/make_nesting_sim.py``);
the CSV is the single source of truth that ``make_lme4_nesting.R`` reads, and running this
script again reproduces it byte for byte (``--check`` compares instead of writing).

Design: 10 schools ``a`` (``s01``..``s10``), 4 classes ``b`` per school with labels
``k1``..``k4`` *reused* in every school (so ``b`` alone is not the class: the nesting
``a/b`` is needed), 3 pupils ``c`` per class with labels ``p1``..``p3`` reused likewise,
and 4 occasions per pupil: 480 rows, of which every 7th row (rows 3, 10, 17, ...) is
dropped, leaving 411 (unbalanced, but every pupil keeps at least 2 rows). ``x`` is a
within-pupil covariate (occasion-level, standard normal).

Generating model:

    y = 2 + 0.5 x + a[school] . (1, x) + b[school:class] . (1, x) + c[pupil] + e

with a ~ N(0, Sigma_a), Sigma_a = [[1.0, 0.3 * 1.0 * 0.5], [., 0.5^2]],
b ~ N(0, Sigma_b), Sigma_b = [[0.7^2, -0.2 * 0.7 * 0.4], [., 0.4^2]], c ~ N(0, 0.5^2),
e ~ N(0, 0.6^2).

Random numbers: ``numpy.random.default_rng(SEED)``, drawn in this order with
``standard_normal`` only: x (480), school effects (10 x 2), class effects (40 x 2), pupil
effects (120), residuals (480); correlated effects are z @ L.T with L the Cholesky factor.
The seed was not tuned. Values are written with 6 decimals (``%.6f``), and the fits in
``lme4_nesting.json`` are of the CSV's values.
"""

import pathlib
import sys

import numpy as np

SEED = 20261204
N_A, N_B, N_C, N_REP = 10, 4, 3, 4
HERE = pathlib.Path(__file__).parent
OUT = HERE / "nesting_sim.csv"


def _cov(sd, corr):
    return np.array([[sd[0] ** 2, corr * sd[0] * sd[1]], [corr * sd[0] * sd[1], sd[1] ** 2]])


def make():
    """The CSV text."""
    rng = np.random.default_rng(SEED)
    n = N_A * N_B * N_C * N_REP
    x = rng.standard_normal(n)
    la = np.linalg.cholesky(_cov((1.0, 0.5), 0.3))
    lb = np.linalg.cholesky(_cov((0.7, 0.4), -0.2))
    ua = rng.standard_normal((N_A, 2)) @ la.T
    ub = rng.standard_normal((N_A * N_B, 2)) @ lb.T
    uc = 0.5 * rng.standard_normal(N_A * N_B * N_C)
    e = 0.6 * rng.standard_normal(n)
    rows = ["a,b,c,x,y"]
    i = 0
    for ia in range(N_A):
        for ib in range(N_B):
            for ic in range(N_C):
                for _ in range(N_REP):
                    kb = ia * N_B + ib
                    kc = kb * N_C + ic
                    y = (2.0 + 0.5 * x[i] + ua[ia, 0] + ua[ia, 1] * x[i] + ub[kb, 0]
                         + ub[kb, 1] * x[i] + uc[kc] + e[i])
                    if i % 7 != 3:
                        rows.append(f"s{ia + 1:02d},k{ib + 1},p{ic + 1},{x[i]:.6f},{y:.6f}")
                    i += 1
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    text = make()
    if "--check" in sys.argv[1:]:
        same = OUT.read_text() == text
        print("nesting_sim.csv is reproduced" if same else "nesting_sim.csv DIFFERS")
        sys.exit(0 if same else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10)) - 1} rows)")
