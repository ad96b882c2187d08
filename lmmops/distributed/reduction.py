"""Map a function over the partitions of a Dask DataFrame and combine the results by a
tree reduction, gathering only the root (level space) on the client.

The shape is dask's own ``reduction`` (``dask.array.reductions``, dask-ml's
``_partial`` sums): each partition is mapped by one task, then groups of ``fan_in``
results are combined by one task per group, level by level, so no task holds more than
``fan_in`` partial results and the depth is ``ceil(log_fan_in(P))``. Lost tasks (a
worker that dies) are recomputed by the scheduler from the graph, so a reduction's
result does not depend on which worker ran what.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import time

from tqdm import tqdm

from lmmops.errors import ArgumentError

__all__ = ["TreeReduction", "client_info", "client_peak_mb", "map_reduce", "pickled_nbytes",
           "tree_reduce"]

_last_bar = []  # partitions the last progress bar counted (for the tests)

#: partial results combined per task of the tree
FAN_IN = 8


class _Counter:
    """A write-only file that keeps the number of bytes written and nothing else."""

    def __init__(self):
        self.n = 0

    def write(self, data):
        n = memoryview(data).nbytes
        self.n += n
        return n


def pickled_nbytes(obj):
    """The size of ``obj`` pickled (protocol 5), counted without making the pickle.

    The pickler writes to a counter instead of a bytes object, and the large contiguous
    buffers (NumPy arrays, hence the arrays of SciPy sparse matrices) are handed out of
    band to a callback that adds up their sizes: nothing as large as ``obj`` is
    allocated, where ``len(pickle.dumps(obj))`` makes a whole second copy of it. The
    count is that of ``pickle.dumps(obj, protocol=5)`` up to a few bytes per buffer
    (an out-of-band buffer's opcode is 1 byte, an in-band one's 9 plus its length).

    Parameters
    ----------
    obj : object
        Picklable.

    Returns
    -------
    int

    Examples
    --------
    >>> import numpy as np
    >>> x = {"a": np.zeros(1000), "b": [1, 2, 3]}
    >>> n = pickled_nbytes(x)
    >>> abs(n - len(pickle.dumps(x, protocol=5))) < 16
    True
    """
    out = _Counter()
    buffers = [0]

    def count(buf):
        buffers[0] += memoryview(buf).nbytes
        # a false return leaves the buffer out of band: counted here, never copied

    pickle.Pickler(out, protocol=5, buffer_callback=count).dump(obj)
    return out.n + buffers[0]


def tree_reduce(parts, combine, fan_in=FAN_IN):
    """The root of a tree of ``combine`` tasks over a list of ``dask.delayed`` values."""
    import dask

    parts = list(parts)
    if not parts:
        raise ArgumentError("nothing to reduce: no partitions")
    # one partition is still combined once, so the root is always a combine output
    while True:
        parts = [dask.delayed(combine, pure=True)(parts[i:i + fan_in])
                 for i in range(0, len(parts), fan_in)]
        if len(parts) == 1:
            break
    return parts[0]


class TreeReduction:
    """The record of one map-reduce: partitions, seconds, bytes gathered."""

    def __init__(self, name, n_partitions, seconds, nbytes):
        self.name = name
        self.n_partitions = n_partitions
        self.seconds = seconds
        self.nbytes = nbytes

    def __repr__(self):
        return (f"TreeReduction({self.name!r}, partitions={self.n_partitions}, "
                f"{self.seconds:.2f} s, {self.nbytes} bytes gathered)")


def map_reduce(ddf, fn, combine, *args, fan_in=FAN_IN, name="pass", progress=None):
    """``combine`` over ``fn(partition, i, *args)`` for every partition of ``ddf``.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    fn : callable
        ``fn(pandas partition, position, *args)``; runs on the workers.
    combine : callable
        ``combine(list of results)``; runs on the workers, the root's result is gathered.
    *args
        Sent once (one key in the graph) and shared by every task.
    fan_in : int
    name : str
        For the record and the progress bar.
    progress : bool, optional
        Show a progress bar of the pass (``distributed.progress`` on a cluster, dask's
        ``ProgressBar`` otherwise).

    Returns
    -------
    (result, TreeReduction)
    """
    import dask

    t0 = time.perf_counter()
    shared = [dask.delayed(a, traverse=False) for a in args]
    parts = ddf.to_delayed()
    mapped = [dask.delayed(fn, pure=True)(p, i, *shared) for i, p in enumerate(parts)]
    if progress:
        result = _with_progress(mapped, combine, fan_in, name)
    else:
        (result,) = dask.compute(tree_reduce(mapped, combine, fan_in=fan_in))
    nbytes = pickled_nbytes(result)
    return result, TreeReduction(name, len(parts), time.perf_counter() - t0, nbytes)


def _with_progress(mapped, combine, fan_in, name):
    """The reduction with a tqdm bar over the partitions (on stderr)."""
    import dask

    bar = tqdm(total=len(mapped), desc=f"dask {name} pass", unit="partition",
               file=sys.stderr, leave=False)
    try:
        client = _client()
        if client is not None:
            import distributed

            futures = client.compute(mapped)
            for _ in distributed.as_completed(futures):
                bar.update(1)
            root = tree_reduce(futures, combine, fan_in=fan_in)
            return client.compute(root).result()
        from dask.callbacks import Callback

        class _Tick(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                if str(key[0] if isinstance(key, tuple) else key).startswith(
                        mapped[0].key.split("-")[0]):
                    bar.update(1)

        with _Tick():
            (result,) = dask.compute(tree_reduce(mapped, combine, fan_in=fan_in))
        return result
    finally:
        _last_bar[:] = [bar.n]
        bar.close()


def _client():
    try:
        import distributed
    except ImportError:  # pragma: no cover (distributed is in the extra)
        return None
    try:
        return distributed.get_client()
    except ValueError:
        return None


def _has_bokeh():
    return importlib.util.find_spec("bokeh") is not None


def client_info():
    """``(n_workers, dashboard link)`` of the current ``distributed`` client, or
    ``(None, None)`` when dask runs without one (its local scheduler)."""
    client = _client()
    if client is None:
        return None, None
    try:
        info = client.scheduler_info()
    except Exception:  # pragma: no cover (a scheduler that went away)
        return None, None
    n = len(info.get("workers", {}))
    # the link only when the scheduler serves the dashboard's pages (they need bokeh)
    link = getattr(client, "dashboard_link", None) \
        if "dashboard" in info.get("services", {}) and _has_bokeh() else None
    return n, link


def client_peak_mb():
    """The peak resident memory of this (the client's) process so far, in MiB, or None
    where the platform does not report it.

    ``getrusage``'s ``ru_maxrss`` (KiB on Linux, bytes on macOS): the whole process,
    which includes the scheduler of a ``LocalCluster`` started in it (its workers are
    other processes).

    Examples
    --------
    >>> client_peak_mb() > 0
    True
    """
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover (Windows)
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (2**20 if sys.platform == "darwin" else 2**10)
