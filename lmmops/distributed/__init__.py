"""Fits from a Dask DataFrame: the rows stay on the workers (``lmmops[dask]``).

The rows of an intercept-and-slope LMM enter the fit only through level-space sufficient
statistics, built in one pass; everything after that is level-space work. This package
is that pass over the partitions of a ``dask.dataframe.DataFrame`` (a map on the
workers and a tree reduction), plus the passes before it (level dictionaries, the
moments that fix the conditioning) and the row-level outputs after it
(``map_partitions``). :func:`lmmops.fit` dispatches here for a Dask DataFrame.

Dask is an optional dependency: the modules import it inside the functions that run a
pass, so ``import lmmops`` never needs it.

Modules: ``frame`` (the plan a partition needs and the arrays it makes of its rows),
``moments`` (global moments and the conditioning), ``passes`` (the map and combine
functions), ``reduction`` (map + tree reduction on Dask), ``levelspace`` (the design and
terms without rows), ``model`` (:class:`DaskLMM`, :class:`DaskResult`,
:func:`fit_dask`), ``files`` (globs and directories of Parquet/CSV files).
"""

from lmmops.distributed.model import DaskLMM, DaskResult, fit_dask, is_dask_dataframe

__all__ = ["DaskLMM", "DaskResult", "fit_dask", "is_dask_dataframe"]
