"""Size guard for dense helpers.

Nothing on the large-data path forms a dense ``n x n`` or ``q x q`` matrix. Dense
helpers (``todense``, the exact solver's Schur block) call :func:`check_dense` first,
which raises :class:`~lmmops.errors.DenseTooLargeError` with the size in GiB.

The limit defaults to 4 GiB per array and can be changed with the environment
variable ``LMMOPS_MAX_DENSE_GIB``.
"""

import os

from lmmops.errors import DenseTooLargeError

__all__ = ["check_dense", "max_dense_bytes"]


def max_dense_bytes():
    """Return the largest dense array, in bytes, that lmmops will allocate.

    Returns
    -------
    int
        ``LMMOPS_MAX_DENSE_GIB`` (default 4) times 2**30.
    """
    gib = float(os.environ.get("LMMOPS_MAX_DENSE_GIB", "4"))
    return int(gib * 2**30)


def check_dense(shape, what, itemsize=8, limit=None):
    """Raise if a dense array of ``shape`` would exceed the size limit.

    Parameters
    ----------
    shape : tuple of int
        Shape of the dense array about to be formed.
    what : str
        What the array is, for the message (``"V.todense()"``).
    itemsize : int, optional
        Bytes per entry (8 for float64).
    limit : int, optional
        Limit in bytes; default :func:`max_dense_bytes`.

    Raises
    ------
    DenseTooLargeError
        If the array would be larger than the limit.

    Examples
    --------
    >>> check_dense((10, 10), "a small matrix")
    >>> check_dense((10**6, 10**6), "V.todense()")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.DenseTooLargeError: V.todense() would need a dense 1000000 x 1000000 ...
    """
    limit = max_dense_bytes() if limit is None else limit
    nbytes = itemsize
    for s in shape:
        nbytes *= int(s)
    if nbytes > limit:
        dims = " x ".join(str(int(s)) for s in shape)
        raise DenseTooLargeError(
            f"{what} would need a dense {dims} array ({nbytes / 2**30:.2f} GiB), above the "
            f"limit of {limit / 2**30:.2f} GiB. Use a matrix-free route instead, or raise the "
            "limit with the environment variable LMMOPS_MAX_DENSE_GIB."
        )
