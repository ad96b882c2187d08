"""A glob or a directory of Parquet/CSV files as the data of a fit.

:func:`resolve_files` expands the data argument of ``lmmops fit`` (a file, a glob such
as ``'data/part-*.parquet'``, or a directory) to the sorted list of files;
:func:`read_frame` concatenates them in memory (in that order), :func:`read_dask` opens
them as a Dask DataFrame with one partition per file, whose errors then name the file.
"""

from __future__ import annotations

import glob
import os

import pandas as pd

from lmmops.errors import DataSourceError, UserError

__all__ = ["DATA_SUFFIXES", "read_dask", "read_frame", "resolve_files"]

#: file types a directory or a glob may hold (one kind per data set)
DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".tab")


def _kind(path):
    low = path.lower()
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith((".tsv", ".tsv.gz", ".tab")):
        return "tsv"
    return "csv"


def resolve_files(arg):
    """The data files of a path, a glob or a directory, sorted by name.

    Parameters
    ----------
    arg : str

    Returns
    -------
    list of str

    Raises
    ------
    UserError
        When nothing matches, or the files are of more than one kind.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("b.csv", "a.csv", "notes.txt"):
    ...     _ = (d / name).write_text("y\\n1\\n")
    >>> [os.path.basename(f) for f in resolve_files(str(d))]
    ['a.csv', 'b.csv']
    """
    if os.path.isdir(arg):
        files = [os.path.join(arg, f) for f in os.listdir(arg)
                 if f.lower().endswith(DATA_SUFFIXES) and not f.startswith((".", "_"))]
        where = f"directory {arg}"
    elif os.path.exists(arg):
        files = [arg]
        where = arg
    else:
        files = [f for f in glob.glob(arg) if os.path.isfile(f)]
        where = f"the pattern {arg!r}"
    if not files:
        if any(ch in arg for ch in "*?["):
            raise UserError(f"no data files match {where}")
        if os.path.isdir(arg):
            raise UserError(f"no data files ({', '.join(DATA_SUFFIXES)}) in {where}")
        raise UserError(f"data file not found: {arg}")
    files = sorted(files)
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{where} mixes file types ({', '.join(sorted(kinds))}); use one")
    return files


def _read_one(path):
    kind = _kind(path)
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if kind == "tsv" else ",")
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise DataSourceError(f"file '{path}': could not read it: {exc}") from None


def read_frame(files):
    """The files' rows in one pandas DataFrame, in the given order.

    Raises
    ------
    DataSourceError
        For a file that cannot be read, or whose columns differ from the first file's
        (naming the file and the column).
    """
    frames = []
    for f in files:
        df = _read_one(f)
        if frames:
            _same_schema(frames[0], df, files[0], f)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _same_schema(first, df, first_name, name):
    a, b = list(first.columns), list(df.columns)
    if a != b:
        missing = [c for c in a if c not in b]
        extra = [c for c in b if c not in a]
        what = (f"column '{missing[0]}' is missing" if missing
                else f"it has column '{extra[0]}' that '{first_name}' has not" if extra
                else "its columns are in another order")
        raise DataSourceError(f"file '{name}': the schema differs from '{first_name}': "
                              f"{what}")
    for c in a:
        num_a = pd.api.types.is_numeric_dtype(first[c])
        num_b = pd.api.types.is_numeric_dtype(df[c])
        if num_a != num_b:
            raise DataSourceError(f"file '{name}': the schema differs from "
                                  f"'{first_name}': column '{c}' has dtype {df[c].dtype}, "
                                  f"there {first[c].dtype}")


def _schema(path):
    """An empty frame with the columns and dtypes of a file (without reading its rows:
    the Parquet schema, or the first rows of a CSV)."""
    try:
        if _kind(path) == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path).empty_table().to_pandas()
        return pd.read_csv(path, sep="\t" if _kind(path) == "tsv" else ",",
                           nrows=1000).iloc[:0]
    except Exception as exc:  # pyarrow/pandas raise many types for malformed files
        raise DataSourceError(f"file '{path}': could not read its schema: {exc}") from None


def read_dask(files):
    """The files as a Dask DataFrame with one partition per file.

    Returns
    -------
    (dask.dataframe.DataFrame, list of str)
        The frame and, per partition, its label for error messages
        (``"file 'data/part-3.parquet'"``).

    Raises
    ------
    DataSourceError
        When the first file cannot be read (its schema is the frame's metadata).
    """
    import dask
    import dask.dataframe as dd

    meta = _schema(files[0])
    parts = [dask.delayed(_read_one, pure=True)(f) for f in files]
    ddf = dd.from_delayed(parts, meta=meta, verify_meta=False)
    return ddf, [f"file '{f}'" for f in files]
