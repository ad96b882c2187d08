"""Designs shared by several test modules (imported as ``from designs import ...``;
pytest puts this folder on ``sys.path``)."""

import numpy as np
import pandas as pd


def nine_level_frame(n=2400, seed=3):
    """A 2400-row crossed design: 50 levels of ``g`` (codes ``7 j + 3``) with a random
    slope on ``x``, 9 levels of ``h`` (strings), a 3-level fixed factor ``f`` and
    weights ``w`` in [0.5, 2]. The 9-level factor crosses everything, which makes the
    block-Jacobi control variate of the matrix-free slope solver poor."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 50, n)
    h = rng.choice([f"lev{j:02d}" for j in range(9)], n)
    hcode = np.array([int(s[3:]) for s in h])
    df = pd.DataFrame({"g": g * 7 + 3, "h": h, "x": rng.normal(size=n),
                       "f": rng.choice(["u", "v", "w"], n)})
    df["y"] = (4.0 + rng.normal(size=50)[g] + 0.8 * rng.normal(size=9)[hcode]
               + df.x * (1.0 + 0.4 * rng.normal(size=50)[g]) + (df.f == "v")
               + rng.normal(size=n))
    df["w"] = rng.uniform(0.5, 2.0, n)
    return df


def slope_frame(n, n_g, n_h, seed, intercept=1.0, h_label="h{:02d}"):
    """``y ~ x + (1 + x | g) + (1 | h)`` data: ``n`` rows, ``n_g`` levels of ``g``
    (labels ``g00``, ...) with a random slope on ``x`` (sd 0.6), ``n_h`` levels of ``h``
    (sd 0.7, labels ``h_label``), residual sd 1."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"g": rng.integers(0, n_g, n), "h": rng.integers(0, n_h, n),
                       "x": rng.normal(size=n)})
    df["y"] = (intercept + 0.5 * df.x + rng.normal(size=n_g)[df.g]
               + 0.6 * rng.normal(size=n_g)[df.g] * df.x
               + 0.7 * rng.normal(size=n_h)[df.h] + rng.normal(size=n))
    df["g"] = pd.Categorical(df.g.map(lambda i: f"g{i:02d}"))
    df["h"] = pd.Categorical(df.h.map(h_label.format))
    return df
