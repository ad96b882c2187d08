"""How many threads BLAS and Numba use: ``threads="auto"`` (the default) or a count.

A fit runs inside :func:`limit_threads`, which sets the number of BLAS threads (OpenBLAS,
MKL, ... through threadpoolctl) and of Numba's parallel threads for the duration of the
fit and restores both on exit, also when the fit raises.

Why. BLAS libraries start one thread per core, and their threads spin while they wait
for work or for each other (numpy and scipy even bundle one OpenBLAS each, with a pool
each). The exact solver's dense steps are small: with InstEval's 1145 x 1145 Schur block
a factorisation is tens of milliseconds, the scale of the scheduler's time slice. When
other processes compete for the cores (cross-validation, joblib workers, a test suite
next door), one BLAS thread is descheduled in the middle of a call while its partner
spins, and every call waits a time slice or more. Measured on the two-core development
machine under load (``asv_benchmarks/peers/LOAD.md``, made by
``asv_benchmarks/peers/load.py``): a Cholesky factorisation and inverse took 8 to 60 times
longer with two threads than with one for every size from 100 to 4000 rows, and the
InstEval fit used 3 to 10 times the CPU time; one thread per fit does not have that
problem. The user's guide is ``docs/quickstart.rst`` (Threads).

Policy for ``threads="auto"``:

- BLAS: one thread while the largest dense matrix of the fit (the exact solver's Schur
  block) has fewer than :data:`AUTO_BLAS_MIN_DENSE` rows; from that size on, one thread
  plus the number of idle cores (see :func:`idle_cores`), at most the available cores.
  The iterative solver's dense blocks (probes, deflation basis) are always small.
- Numba (the iterative solver's parallel kernels): one thread plus the number of idle
  cores, at most Numba's maximum (``NUMBA_NUM_THREADS``). The exact solver runs no
  parallel kernel, so its fits leave Numba's count alone and probe the load only for a
  large dense block.

``threads=n`` (a positive integer) uses ``n`` BLAS threads and ``min(n, NUMBA_NUM_THREADS)``
Numba threads whatever the sizes and the load; ``threads=1`` makes a fit single-threaded,
the right choice for a fit that is itself one of several running in parallel.

Examples
--------
>>> import numba
>>> before = numba.get_num_threads()
>>> with limit_threads(1) as plan:
...     (plan.blas, plan.numba, numba.get_num_threads())
(1, 1, 1)
>>> numba.get_num_threads() == before
True
>>> check_threads("auto"), check_threads(2), check_threads("3")
('auto', 2, 3)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import numba
import threadpoolctl
from threadpoolctl import ThreadpoolController

from lmmops.errors import LmmopsError

__all__ = [
    "AUTO_BLAS_MIN_DENSE",
    "ThreadPlan",
    "available_cores",
    "blas_threads",
    "check_threads",
    "idle_cores",
    "limit_threads",
    "limits_active",
    "plan_threads",
]

#: ``threads="auto"`` gives BLAS more than one thread only for a dense block (the exact
#: solver's Schur complement) of at least this many rows, and then only on idle cores.
#: Measured on the idle two-core development machine (load 0.3, ``potrf`` + ``potri``
#: of a random SPD matrix, best of five, OpenBLAS): 1 thread / 2 threads 5.1 / 3.4 ms at
#: 500 rows, 29.4 / 18.5 at 1000, 82.9 / 49.0 at 1500, 174 / 105 at 2000, 326 / 196 at
#: 2500, so two threads win from 500 rows on when a core is idle; below 1000 rows a
#: call is shorter than a few scheduler time slices, and a competitor that arrives
#: mid-fit would cost more than the second thread gains, so the threshold is 1000. On
#: a busy machine one thread wins at every size (the module notes), and the idle-core
#: probe keeps it at one.
AUTO_BLAS_MIN_DENSE = 1000

@dataclass(frozen=True)
class ThreadPlan:
    """The thread counts of one fit.

    Attributes
    ----------
    requested : "auto" or int
        The ``threads=`` argument, validated.
    blas : int
        BLAS threads.
    numba : int or None
        Numba threads (``None``: left as they are, because no parallel kernel can run).
    reason : str
        Why, in words (it goes into the fit's notes).
    """

    requested: object
    blas: int
    numba: int | None
    reason: str

    @property
    def note(self):
        """One line for a result's notes."""
        nb = "unchanged" if self.numba is None else str(self.numba)
        return f"threads={self.requested!r}: BLAS {self.blas}, Numba {nb} ({self.reason})"


def check_threads(threads):
    """Validate a ``threads=`` argument.

    Parameters
    ----------
    threads : "auto", int or str
        ``"auto"`` (any case) or a positive integer; a string of digits (from the command
        line) counts as the integer.

    Returns
    -------
    "auto" or int

    Raises
    ------
    LmmopsError
        For anything else: 0, a negative number, a non-integer, a boolean, other strings.

    Examples
    --------
    >>> check_threads(0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.LmmopsError: threads must be 'auto' or a positive integer, got 0
    """
    if isinstance(threads, str):
        text = threads.strip()
        if text.lower() == "auto":
            return "auto"
        if text.isdecimal() and int(text) >= 1:
            return int(text)
    elif not isinstance(threads, bool):
        try:
            n = int(threads)
        except (TypeError, ValueError, OverflowError):
            n = None
        if n is not None and n >= 1 and n == threads:
            return n
    raise LmmopsError(f"threads must be 'auto' or a positive integer, got {threads!r}")


def available_cores():
    """Cores this process may run on (its CPU affinity, else ``os.cpu_count()``).

    Returns
    -------
    int
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _runnable_others():
    """Runnable tasks other than this one right now, or None where that is unknown."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - 1)  # minus the thread reading the file


def idle_cores(samples=3, interval=1e-3):
    """Cores not used by other processes, estimated from the scheduler's run queue.

    On Linux, the number of runnable tasks in ``/proc/loadavg`` (an instantaneous count,
    so a competitor that has just started counts), minimum over a few samples so that a
    task that ran for a moment does not; elsewhere the one-minute load average
    (``os.getloadavg``); where neither exists, every core counts as idle.

    Parameters
    ----------
    samples : int
        Reads of the run queue.
    interval : float
        Seconds between reads.

    Returns
    -------
    int
        Between 0 and ``available_cores() - 1`` (this process needs one).
    """
    busy = None
    for i in range(max(1, samples)):
        r = _runnable_others()
        if r is None:
            break
        busy = r if busy is None else min(busy, r)
        if i + 1 < samples:
            time.sleep(interval)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    cores = available_cores()
    return int(max(0, min(cores - 1, cores - 1 - busy)))


def plan_threads(threads="auto", *, dense_size=0, parallel=False):
    """Decide the BLAS and Numba thread counts of a fit.

    Parameters
    ----------
    threads : "auto" or int
        See :func:`check_threads` and the module's policy.
    dense_size : int
        Rows of the largest dense matrix the fit factors (the exact solver's Schur block;
        0 for the iterative solver).
    parallel : bool
        Whether the fit runs Numba's parallel kernels (the iterative solver does).

    Returns
    -------
    ThreadPlan

    Examples
    --------
    >>> plan = plan_threads("auto", dense_size=800)
    >>> plan.blas, plan.numba
    (1, None)
    >>> plan.note
    "threads='auto': BLAS 1, Numba unchanged (a 800-row dense block is below 1000 rows)"
    >>> plan_threads(2).blas
    2
    """
    threads = check_threads(threads)
    nmax = int(numba.config.NUMBA_NUM_THREADS)
    if threads != "auto":
        reason = "requested"
        nb = min(threads, nmax)
        if nb < threads:
            reason += f"; Numba is capped at NUMBA_NUM_THREADS={nmax}"
        return ThreadPlan(threads, threads, nb, reason)
    big_dense = dense_size >= AUTO_BLAS_MIN_DENSE
    parallel_kernels = bool(parallel) and nmax > 1
    parts = []
    if not big_dense:
        parts.append(f"a {int(dense_size)}-row dense block is below {AUTO_BLAS_MIN_DENSE} "
                     "rows" if dense_size else "no large dense block")
    idle = None
    if big_dense or parallel_kernels:
        idle = idle_cores()
        parts.append(f"{idle} idle core{'s' if idle != 1 else ''} of {available_cores()}")
    blas = min(available_cores(), 1 + idle) if big_dense else 1
    nb = min(nmax, 1 + idle) if parallel_kernels else None
    return ThreadPlan("auto", blas, nb, "; ".join(parts))


# ------------------------------------------------------------------------- the limits
# BLAS thread counts are process-wide. Within one Python thread the innermost block wins;
# across Python threads (concurrent fits) the smallest of their requests does, since
# concurrency means the cores are shared. The original counts are saved when the first
# block starts and restored when the last one ends. Numba's count is per Python thread
# (numba.set_num_threads), so it is simply saved and restored around each block.
_LOCK = threading.Lock()
_BLAS_REQUESTS = {}  # Python thread id -> stack of requested counts
_BLAS_STATE = {"controller": None, "restore": None, "current": None}


def _controller():
    # Building a ThreadpoolController scans the loaded libraries (tens of milliseconds),
    # so it is built once; numpy's and scipy's BLAS are loaded by then (lmmops imports
    # scipy.linalg).
    if _BLAS_STATE["controller"] is None:
        _BLAS_STATE["controller"] = ThreadpoolController()
    return _BLAS_STATE["controller"]


def _release_blas_control():
    # Recent threadpoolctl lets only one Python thread, the first to set a limit, change a
    # process-wide OpenBLAS pool, and silently ignores the others until that thread's
    # ``with`` blocks are done. lmmops arbitrates between its own blocks under _LOCK, so it
    # releases that claim around each change (the documented clear_controlling_thread;
    # ``force`` where it exists, since the claim may be another thread's).
    openblas = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(openblas, "clear_controlling_thread", None)
    if clear is not None:
        try:
            clear(force=True)
        except TypeError:
            clear()


def _apply_blas_locked():
    state = _BLAS_STATE
    _release_blas_control()
    try:
        if not _BLAS_REQUESTS:
            if state["restore"] is not None:
                state["restore"].restore_original_limits()
            state["restore"] = state["current"] = None
            return
        n = min(stack[-1] for stack in _BLAS_REQUESTS.values())
        if state["restore"] is None:
            state["restore"] = _controller().limit(limits=n, user_api="blas")
        elif n != state["current"]:
            _controller().limit(limits=n, user_api="blas")
        state["current"] = n
    finally:
        _release_blas_control()


def _push_blas(n):
    key = threading.get_ident()
    with _LOCK:
        _BLAS_REQUESTS.setdefault(key, []).append(int(n))
        try:
            _apply_blas_locked()
        except BaseException:
            _pop_blas_locked(key)
            raise


def _pop_blas_locked(key):
    stack = _BLAS_REQUESTS[key]
    stack.pop()
    if not stack:
        del _BLAS_REQUESTS[key]


def _pop_blas():
    with _LOCK:
        _pop_blas_locked(threading.get_ident())
        _apply_blas_locked()


def blas_threads():
    """The BLAS libraries' current thread counts.

    Returns
    -------
    list of int
        One per loaded BLAS library (numpy's and scipy's may be two).
    """
    return [int(info["num_threads"]) for info in _controller().info()
            if info.get("user_api") == "blas"]


def limits_active():
    """Whether a :func:`limit_threads` block is active in this Python thread.

    An ``inner=True`` block would then do nothing; building blocks called many times
    inside a fit (the exact solver's criterion) test this first and skip the context
    manager, whose set-up costs a few microseconds.

    Returns
    -------
    bool

    Examples
    --------
    >>> limits_active()
    False
    >>> with limit_threads(1):
    ...     limits_active()
    True
    """
    return threading.get_ident() in _BLAS_REQUESTS


@contextlib.contextmanager
def limit_threads(threads="auto", *, dense_size=0, parallel=False, inner=False):
    """Run a block with the BLAS and Numba thread counts of :func:`plan_threads`.

    Both counts are restored on exit, also when the block raises. Blocks nest (the
    innermost wins in its Python thread); blocks in concurrent Python threads share the
    process-wide BLAS setting, which is then the smallest of their counts.

    Parameters
    ----------
    threads : "auto", int or ThreadPlan
        A ``threads=`` argument (planned with ``dense_size`` and ``parallel``) or a plan.
    dense_size : int
    parallel : bool
        See :func:`plan_threads`.
    inner : bool
        Do nothing when a ``limit_threads`` block is already active in this Python thread
        (for building blocks such as :meth:`lmmops.estimation.direct.DirectObjective.evaluate`, so
        that the fit's choice wins).

    Yields
    ------
    ThreadPlan or None
        The plan in force (``None`` for an ``inner`` block that deferred).

    Raises
    ------
    LmmopsError
        For an invalid ``threads``.
    """
    if inner and threading.get_ident() in _BLAS_REQUESTS:
        yield None
        return
    if isinstance(threads, ThreadPlan):
        plan = threads
    else:
        plan = plan_threads(threads, dense_size=dense_size, parallel=parallel)
    _push_blas(plan.blas)
    old_numba = None
    try:
        if plan.numba is not None:
            old_numba = numba.get_num_threads()
            numba.set_num_threads(plan.numba)
        yield plan
    finally:
        if old_numba is not None:
            numba.set_num_threads(old_numba)
        _pop_blas()
