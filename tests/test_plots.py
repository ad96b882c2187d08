"""Diagnostic plots render (Agg), the CLI writes them, and a missing matplotlib is reported."""

import builtins

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.errors import LmmopsError

mpl = pytest.importorskip("matplotlib")
mpl.use("Agg")


@pytest.fixture(scope="module")
def res():
    rng = np.random.default_rng(9)
    n = 300
    df = pd.DataFrame({"a": rng.integers(0, 20, n), "b": rng.integers(0, 6, n)})
    df["y"] = rng.normal(size=20)[df.a] + 0.5 * rng.normal(size=6)[df.b] + rng.normal(size=n)
    df.loc[3, "y"] += 8.0
    return lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)


@pytest.mark.parametrize("kind", ["caterpillar", "resid_fitted", "qq", "outliers"])
def test_each_kind_draws_into_an_axes(res, kind):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    out = res.plot(kind, ax=ax)
    assert out is ax
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()
    plt.close(fig)


def test_caterpillar_intervals_are_the_pev(res):
    import matplotlib.pyplot as plt

    ax = res.plot("caterpillar", factor="b")
    assert ax.get_title() == "Caterpillar plot: b"
    assert [t.get_text() for t in ax.get_yticklabels()]  # level labels shown
    plt.close(ax.figure)
    with pytest.raises(LmmopsError, match="unknown factor 'zz'"):
        res.plot("caterpillar", factor="zz")


def test_outlier_scan_labels_the_planted_outlier(res):
    import matplotlib.pyplot as plt

    ax = res.plot("outliers", top=1)
    assert [t.get_text() for t in ax.texts] == ["3"]
    plt.close(ax.figure)


def test_diagnostics_png(res, tmp_path):
    from lmmops.analysis.plots import save_diagnostics

    path = tmp_path / "d.png"
    save_diagnostics(res, str(path))
    assert path.stat().st_size > 20_000
    with pytest.raises(LmmopsError, match="unknown plot kind 'pie'"):
        res.plot("pie")


def test_cli_plot(tmp_path, capsys):
    from lmmops.cli import main

    rng = np.random.default_rng(2)
    n = 200
    df = pd.DataFrame({"a": rng.integers(0, 10, n), "b": rng.integers(0, 5, n)})
    df["y"] = rng.normal(size=10)[df.a] + rng.normal(size=n)
    data = tmp_path / "x.csv"
    df.to_csv(data, index=False)
    png = tmp_path / "out.png"
    assert main(["fit", str(data), "--formula", "y ~ 1 + (1|a) + (1|b)", "--solver", "direct",
                 "--plot", str(png)]) == 0
    assert png.exists()
    assert "diagnostic plots written to" in capsys.readouterr().out


def test_missing_matplotlib_is_a_clear_error(res, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    msg = r"plotting needs matplotlib: pip install 'lmmops\[plot\]'"
    with pytest.raises(LmmopsError, match=msg):
        res.plot("qq")
