"""Numba kernels of the exact solver (to be merged into lmmops.kernels)."""

import numba


__all__ = ["weighted_gram", "weighted_gram2"]


@numba.njit(cache=True, nogil=True)
def weighted_gram(indptr, indices, data, w, out):
    """Dense ``out = N' diag(w) N`` for a CSR matrix N (rows = levels of the first factor).

    indptr : (q1 + 1,) int64; indices : (nnz,) int64; data : (nnz,) float64
    w : (q1,) float64; out : (qr, qr) float64, overwritten.
    Cost: sum over rows of nnz_row^2.
    """
    out[:, :] = 0.0
    for i in range(indptr.size - 1):
        wi = w[i]
        lo, hi = indptr[i], indptr[i + 1]
        for a in range(lo, hi):
            ja = indices[a]
            va = wi * data[a]
            for b in range(lo, hi):
                out[ja, indices[b]] += va * data[b]


@numba.njit(cache=True, nogil=True)
def weighted_gram2(indptr, indices, data, w1, w2, out1, out2):
    """``out1 = N' diag(w1) N`` and ``out2 = N' diag(w2) N`` in one pass (see weighted_gram)."""
    out1[:, :] = 0.0
    out2[:, :] = 0.0
    for i in range(indptr.size - 1):
        wi1 = w1[i]
        wi2 = w2[i]
        lo, hi = indptr[i], indptr[i + 1]
        for a in range(lo, hi):
            ja = indices[a]
            da = data[a]
            for b in range(lo, hi):
                prod = da * data[b]
                jb = indices[b]
                out1[ja, jb] += wi1 * prod
                out2[ja, jb] += wi2 * prod




