"""Prediction with and without BLUPs, new levels, and prediction variances (dense oracle)."""

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.errors import LmmopsError


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(5)
    n = 120
    df = pd.DataFrame({"a": rng.choice(list("pqrstuvw"), n), "b": rng.integers(0, 5, n),
                       "x": rng.normal(size=n),
                       "f": pd.Categorical(rng.choice(["lo", "hi"], n))})
    codes_a = pd.Categorical(df.a).codes
    df["y"] = (1 + 0.5 * df.x + (df.f == "hi") + rng.normal(size=8)[codes_a]
               + 0.5 * rng.normal(size=5)[df.b] + rng.normal(size=n))
    return df, lmmops.fit("y ~ x + f + (1|a) + (1|b)", df)


def test_predict_on_the_data_is_the_fitted_values(fitted):
    df, res = fitted
    np.testing.assert_allclose(res.predict(), res.fitted, rtol=1e-12)
    np.testing.assert_allclose(res.predict(df), res.fitted, rtol=1e-10)
    np.testing.assert_allclose(res.predict(df, random=False), df.y - res.residuals("marginal"),
                               rtol=1e-10)


def test_new_levels_get_the_population_prediction(fitted):
    df, res = fitted
    new = pd.DataFrame({"a": ["p", "zz"], "b": [3, 99], "x": [0.2, 0.2],
                        "f": ["hi", "hi"]})
    pred = res.predict(new)
    pop = res.fixef["(Intercept)"] + 0.2 * res.fixef["x"]  # "hi" is the baseline
    assert pred[1] == pytest.approx(pop, rel=1e-12)
    assert pred[0] == pytest.approx(pop + res.ranef["a"]["p"] + res.ranef["b"][3], rel=1e-12)


def test_prediction_variances_against_dense_pev(fitted):
    df, res = fitted
    d = res.model.design
    X = res.model.X
    Z = d.indicator_all().toarray()
    s2 = res.sigma ** 2
    g = np.concatenate([np.full(d.n_levels[k], res.variances[nm])
                        for k, nm in enumerate(d.names)])
    W = np.hstack([X, Z])
    C = W.T @ W / s2
    C[X.shape[1]:, X.shape[1]:] += np.diag(1 / g)
    Cinv = np.linalg.inv(C)
    rows = df.iloc[[0, 5, 17]]
    out = res.predict(rows, interval="confidence")
    H = W[[0, 5, 17]]
    np.testing.assert_allclose(out["se"] ** 2, np.einsum("ij,jk,ik->i", H, Cinv, H), rtol=1e-8)
    pred = res.predict(rows, interval="prediction")
    np.testing.assert_allclose(pred["se"] ** 2, out["se"] ** 2 + s2, rtol=1e-10)
    assert list(out.columns) == ["fit", "se", "lower", "upper"]
    np.testing.assert_allclose(out["upper"] - out["fit"], 1.959964 * out["se"], rtol=1e-6)
    fixed = res.predict(rows, random=False, interval="confidence")
    Xr = X[[0, 5, 17]]
    np.testing.assert_allclose(fixed["se"] ** 2,
                               np.einsum("ij,jk,ik->i", Xr, res.vcov.to_numpy(), Xr),
                               rtol=1e-10)
    # a new level adds its variance
    new = rows.assign(a="zz")
    o2 = res.predict(new, interval="confidence")
    H2 = H.copy()
    H2[:, X.shape[1]:X.shape[1] + d.n_levels[0]] = 0.0
    np.testing.assert_allclose(o2["se"] ** 2,
                               np.einsum("ij,jk,ik->i", H2, Cinv, H2) + res.variances["a"],
                               rtol=1e-8)


def test_errors(fitted):
    df, res = fitted
    with pytest.raises(LmmopsError, match="unknown interval 'wide'"):
        res.predict(df, interval="wide")
    with pytest.raises(LmmopsError, match="newdata has no column 'b'"):
        res.predict(df.drop(columns="b"))
    with pytest.raises(LmmopsError, match="cannot build the fixed effects for newdata"):
        res.predict(df.drop(columns="x"))
    with pytest.raises(LmmopsError, match="newdata must be a pandas DataFrame"):
        res.predict({"x": [1.0]})
    d = res.model.design
    bare = lmmops.LMM(d, res.model.X, res.model.y).fit()
    with pytest.raises(LmmopsError, match="needs a model built from a formula"):
        bare.predict(df)
