"""Numba kernels: every compiled function of lmmops, and nothing else.

All kernels are pure functions of arrays and integers that write their result into a
preallocated ``out`` (and, for scatters, a scratch array ``work``); they allocate
nothing. :mod:`lmmops.linalg.operators` validates inputs, allocates and picks a variant; it is
the only caller of the matrix-free kernels. :mod:`lmmops.estimation.direct` calls the two
weighted-Gram kernels, which form its dense Schur block.

The K grouping factors are passed together as ``codes`` (int32, shape (K, n), C order)
with ``offsets`` (int64, shape (K + 1,), ``offsets[k]`` the start of factor k's block in
q-space), so a q-vector holds the K level vectors one after the other. One factor
``Z_k`` is the case K = 1: ``codes[k:k + 1]`` with ``offsets = [0, q_k]``.

Every kernel is written once as a plain Python function and compiled twice (the umap
pattern): ``<name>_serial`` (``cache=True``) and ``<name>_parallel`` (``prange``
loops run in parallel). :func:`get_kernel` picks one. With ``NUMBA_DISABLE_JIT=1`` all
variants are the plain Python functions.

Scatters (``Z' v``) in parallel are race-free by private bins: ``work`` has one row of
q bins per block of observation rows, each block (one ``prange`` iteration) writes only
its own row, and the rows are summed afterwards in a ``prange`` over levels. With one
block (the serial variants) the summation order is the row order; with more blocks the
results agree with the serial ones to rounding (about 1e-15 relative).

Kernels
-------
gather(codes, offsets, u, out)
    ``out = Z u``: ``out[i] = sum_k u[offsets[k] + codes[k, i]]``.
gather_block(codes, offsets, U, out)
    ``out = Z U`` for ``U`` of shape (q, m).
axpy_gather(codes, offsets, x, a, u, c, out), axpy_gather_block(codes, offsets, X, a, U, c, out)
    ``out = a x + c Z u`` (the lift ``(b - Z u) / sigma2_e`` of a level-space solution).
scatter(codes, offsets, v, work, out)
    ``out = Z' v``: ``out[offsets[k] + j] = sum_{i: codes[k, i] = j} v[i]``.
scatter_block(codes, offsets, V, work, out)
    ``out = Z' V`` for ``V`` of shape (n, m).
cov_matvec(codes, offsets, x, sigma2_e, sigma2, work, out)
    ``out = (sigma2_e I + sum_k sigma2[k] Z_k Z_k') x``, fused.
cov_matmat(codes, offsets, X, sigma2_e, sigma2, work, out)
    The same for ``X`` of shape (n, m).
level_matvec(codes, offsets, u, lam, work, out)
    ``out = (Z'Z + Lambda) u``, one pass over the rows.
level_matmat(codes, offsets, U, lam, work, out)
    The same for ``U`` of shape (q, m).
csr_matmat(indptr, indices, data, X, out)
    ``out = A X`` for a CSR matrix ``A`` and a dense block ``X`` (rows in parallel).
csr_sandwich(indptr, indices, data, lam, X, out)
    ``out = lam * (A (lam * X)) + X`` (rows scaled by ``lam``) in one pass.
offdiag_square_rows(indptr, indices, data, a, out)
    ``out[i] = sum_{j != i} A_ij^2 a_j`` for a CSR ``A``.
csr_residual(indptr, indices, data, x, b, scale, out)
    ``out = scale * (b - A x)`` for a CSR ``A``, fused (one block update of AMG's cycle).
dense_matmat(U, Ct, out), dense_tmatmat(U, T, work, out)
    ``out = U C`` and ``out = (U' T)'`` for a dense ``U`` (the D1 preconditioner's
    eigenvectors), in numba's threads rather than BLAS's: on a small machine the two
    thread pools contend (measured: a 3-6x slower preconditioner application).
cg_update(X, R, P, AP, pinv, a, nblocks, partial), cg_direction(P, R, pinv, b, nblocks)
    The fused updates of block preconditioned CG with a diagonal preconditioner.
weighted_gram(indptr, indices, data, w, out)
    Dense ``out = N' diag(w) N`` for a CSR matrix ``N`` (serial only).
csr_column_positions(indptr, indices, ncols)
    A CSR matrix's transpose as an index (rows and positions of each column's nonzeros).
schur_fill_rows(indptr, indices, data, cptr, crows, cpos, w, aptr, aidx, aval, scale, RN,
                Sxx, out)
    The exact solver's Schur block's upper triangle, ``out[b, b:r] = scale_b scale_a
    (A - N' diag(w) N)_ba + [a = b]`` row by row in place (no dense Gram), then the
    ``X``/``y`` columns ``scale RN`` and block ``Sxx``.
schur_trace_rows(indptr, indices, data, cptr, crows, cpos, w, scale, S)
    ``sum(S o scale (N' diag(w) N) scale)`` for a symmetric ``S`` given by its upper
    triangle (no dense Gram).
csr_gauss_seidel(indptr, indices, data, x, b, forward)
    One in-place Gauss-Seidel sweep on a CSR matrix (serial only; AMG's coarse levels).
csr_append(indptr, indices, data, row_offset, col_offset, transpose, fill, out_indices, out_data)
    Append a CSR block (or its transpose) to the rows of a preallocated CSR matrix
    (serial only; the level-space Gram ``Z'WZ`` from its cell tables without a copy).
union_csr(indptr, indices, row_offset, col_offset, parent), component_labels(parent, out)
    Connected components of a graph given by CSR blocks of edges, by union-find on their
    own index arrays (serial only; the level graph of a design from its cell tables).
"""

import types

import numba
import numpy as np
from numba import prange

from lmmops.errors import UnknownNameError

__all__ = [
    "KERNELS",
    "axpy_gather_block_parallel",
    "axpy_gather_block_serial",
    "axpy_gather_parallel",
    "axpy_gather_serial",
    "bj_apply_parallel",
    "bj_apply_serial",
    "block_chunks",
    "block_closed",
    "block_matmat_parallel",
    "block_matmat_serial",
    "cg_direction_parallel",
    "cg_direction_serial",
    "cg_direction_z_parallel",
    "cg_direction_z_serial",
    "cg_update_bj_parallel",
    "cg_update_bj_serial",
    "cg_update_parallel",
    "cg_update_serial",
    "component_labels",
    "cov_matmat_parallel",
    "cov_matmat_serial",
    "cov_matvec_parallel",
    "cov_matvec_serial",
    "csr_append",
    "csr_column_positions",
    "csr_gauss_seidel",
    "csr_matmat_parallel",
    "csr_matmat_serial",
    "csr_residual_parallel",
    "csr_residual_serial",
    "csr_sandwich_parallel",
    "csr_sandwich_serial",
    "dense_matmat_parallel",
    "dense_matmat_serial",
    "dense_tmatmat_parallel",
    "dense_tmatmat_serial",
    "gather_block_parallel",
    "gather_block_serial",
    "gather_parallel",
    "gather_serial",
    "get_block_rows_kernel",
    "get_cg_kernels",
    "get_csr_matmat",
    "get_dense_kernels",
    "get_kernel",
    "get_schur_kernels",
    "get_slope_kernels",
    "lam_sandwich_parallel",
    "lam_sandwich_serial",
    "level_matmat_parallel",
    "level_matmat_serial",
    "level_matvec_parallel",
    "level_matvec_serial",
    "merge_values_parallel",
    "merge_values_serial",
    "n_blocks",
    "offdiag_square_rows_parallel",
    "offdiag_square_rows_serial",
    "pair_sums_parallel",
    "pair_sums_serial",
    "sandwich_blocks_parallel",
    "sandwich_blocks_serial",
    "scatter_block_parallel",
    "scatter_block_serial",
    "scatter_parallel",
    "scatter_serial",
    "schur_fill_rows",
    "schur_rows_parallel",
    "schur_rows_serial",
    "schur_trace_rows",
    "sym_matmat_parallel",
    "sym_matmat_serial",
    "union_csr",
    "weighted_gram",
]

# Parallel variants are cached too: tests/test_kernels.py::test_numba_cache_hits shows the
# on-disk cache hits for them in a fresh process.
_PARALLEL_CACHE = True


def n_blocks(parallel):
    """Number of row blocks (rows of ``work``) the scatter kernels should use.

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    int
        Numba's maximum thread count (``NUMBA_NUM_THREADS``) for the parallel variants, 1
        for the serial ones. Not the current count (``numba.get_num_threads()``, which
        :mod:`lmmops.threads` lowers on a busy machine): the blocks fix the summation
        order, so the results do not depend on how many threads run them.
    """
    return int(numba.config.NUMBA_NUM_THREADS) if parallel else 1


# --------------------------------------------------------------------------- helpers
# Loop shape used throughout, found fastest by measurement: rows are cut into ``nb`` blocks
# (one per thread) and each block into chunks of _CHUNK rows; within a chunk the factors
# are the outer loop and the rows the inner one, over 1-d slices indexed from 0. This keeps
# the chunk of x/out in L1 while each inner loop is a plain indexed load/store (an inner
# loop over k with 2-d ``codes[k, i]`` indexing ran about 3x slower).
_CHUNK = 4096


def _factor_of(j, offsets):
    # j: int, a q-space index; offsets: (K + 1,) int64. Returns k with offsets[k] <= j.
    k = 0
    while j >= offsets[k + 1]:
        k += 1
    return k


_factor_of_nb = numba.njit(_factor_of, cache=True, inline="always")


# ------------------------------------------------------------- row-chunk building blocks
# One chunk of rows [c0, c1) at a time, inlined into every kernel below (Numba
# ``inline="always"``), so that each kernel is its loop structure plus these two pieces.
# Issue 13 keeps the four alike on purpose: _scatter_add is the transpose of _gather_add
# (and the block forms likewise), and one shared body would need a branch on the
# direction in the innermost loop; the vector forms stay apart from the block forms for
# the reason given above _gather.
def _gather_add(codes, offsets, u, c0, c1, ob):
    # ob[i] += sum_k u[offsets[k] + codes[k, c0 + i]]; ob: (c1 - c0,), u: (q,)
    for k in range(codes.shape[0]):
        ck = codes[k, c0:c1]
        ok = offsets[k]
        for i in range(c1 - c0):
            ob[i] += u[ok + ck[i]]


def _gather_add_block(codes, offsets, U, c0, c1, ob):
    # ob[i, :] += sum_k U[offsets[k] + codes[k, c0 + i], :]; ob: (c1 - c0, m), U: (q, m)
    m = U.shape[1]
    for k in range(codes.shape[0]):
        ck = codes[k, c0:c1]
        ok = offsets[k]
        for i in range(c1 - c0):
            j = ok + ck[i]
            for c in range(m):
                ob[i, c] += U[j, c]


def _scatter_add(codes, offsets, vb, c0, c1, w):
    # w[offsets[k] + codes[k, c0 + i]] += vb[i] for every k; vb: (c1 - c0,), w: (q,)
    # (the transpose of _gather_add, kept apart: see above)
    for k in range(codes.shape[0]):
        ck = codes[k, c0:c1]
        ok = offsets[k]
        for i in range(c1 - c0):
            w[ok + ck[i]] += vb[i]


def _scatter_add_block(codes, offsets, vb, c0, c1, w):
    # w[offsets[k] + codes[k, c0 + i], :] += vb[i, :]; vb: (c1 - c0, m), w: (q, m)
    # (the transpose of _gather_add_block, kept apart: see above)
    m = w.shape[1]
    for k in range(codes.shape[0]):
        ck = codes[k, c0:c1]
        ok = offsets[k]
        for i in range(c1 - c0):
            j = ok + ck[i]
            for c in range(m):
                w[j, c] += vb[i, c]


_gather_add_nb = numba.njit(_gather_add, cache=True, inline="always")
_gather_add_block_nb = numba.njit(_gather_add_block, cache=True, inline="always")
_scatter_add_nb = numba.njit(_scatter_add, cache=True, inline="always")
_scatter_add_block_nb = numba.njit(_scatter_add_block, cache=True, inline="always")


# One row block of a private-bin scatter, and the sum of the bins over the blocks: the
# bodies of the scatter kernels' two prange loops (the loops themselves stay in each
# kernel, see the note below).
def _scatter_rows(codes, offsets, v, r0, r1, w):
    # w[:] = Z' v over the rows [r0, r1), chunk by chunk; v: (n,), w: (q,) one block's bins
    w[:] = 0.0
    for c0 in range(r0, r1, _CHUNK):
        c1 = min(r1, c0 + _CHUNK)
        _scatter_add_nb(codes, offsets, v[c0:c1], c0, c1, w)


def _scatter_rows_block(codes, offsets, V, r0, r1, w):
    # w[:, :] = Z' V over the rows [r0, r1); V: (n, m), w: (q, m)
    w[:, :] = 0.0
    for c0 in range(r0, r1, _CHUNK):
        c1 = min(r1, c0 + _CHUNK)
        _scatter_add_block_nb(codes, offsets, V[c0:c1], c0, c1, w)


def _bin_sum(work, j):
    # sum_b work[b, j], in block order (with one block: the serial order); work: (nb, q)
    s = work[0, j]
    for b in range(1, work.shape[0]):
        s += work[b, j]
    return s


def _bin_sum_block(work, j, c):
    # sum_b work[b, j, c], in block order; work: (nb, q, m) (or the dense kernels' (nb, k, r))
    s = work[0, j, c]
    for b in range(1, work.shape[0]):
        s += work[b, j, c]
    return s


_scatter_rows_nb = numba.njit(_scatter_rows, cache=True, inline="always")
_scatter_rows_block_nb = numba.njit(_scatter_rows_block, cache=True, inline="always")
_bin_sum_nb = numba.njit(_bin_sum, cache=True, inline="always")
_bin_sum_block_nb = numba.njit(_bin_sum_block, cache=True, inline="always")


# --------------------------------------------------------------------------- gather
# Why the kernels below repeat their loop headers (issue 13 keeps these copies on
# purpose): every kernel body is compiled twice by _compile, serially and with
# parallel=True, and Numba parallelises a prange loop only in the function it compiles; a
# prange moved into a helper, even one inlined with inline="always", runs serially in the
# caller (checked). So each kernel writes out its own prange loops and their row-block or
# chunk bounds (the n / nb / bs / c0 / c1 lines), in every kernel of this file down to
# _cg_direction, and shares what runs inside one iteration: the *_nb building blocks
# above (_gather_add, _scatter_add, _scatter_rows, _bin_sum and their block forms). The
# vector and block forms are kept apart because the vector forms index 1-d arrays and
# accumulate in a register (no (n, 1) views).
def _gather(codes, offsets, u, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; u: (q,) float64; out: (n,) float64
    n = codes.shape[1]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        ob = out[c0:c1]
        ob[:] = 0.0
        _gather_add_nb(codes, offsets, u, c0, c1, ob)


def _gather_block(codes, offsets, U, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; U: (q, m) float64; out: (n, m) float64
    n = codes.shape[1]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        ob = out[c0:c1]
        ob[:, :] = 0.0
        _gather_add_block_nb(codes, offsets, U, c0, c1, ob)


def _axpy_gather(codes, offsets, x, a, u, c, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; x: (n,) float64; a, c: float;
    # u: (q,) float64; out: (n,) float64. out = a x + c Z u (the lift of a level solution)
    n = codes.shape[1]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        ob = out[c0:c1]
        xb = x[c0:c1]
        ob[:] = 0.0
        _gather_add_nb(codes, offsets, u, c0, c1, ob)
        for i in range(c1 - c0):
            ob[i] = a * xb[i] + c * ob[i]


def _axpy_gather_block(codes, offsets, X, a, U, c, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; X: (n, m) float64; a, c: float;
    # U: (q, m) float64; out: (n, m) float64. out = a X + c Z U
    n = codes.shape[1]
    m = U.shape[1]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        ob = out[c0:c1]
        xb = X[c0:c1]
        ob[:, :] = 0.0
        _gather_add_block_nb(codes, offsets, U, c0, c1, ob)
        for i in range(c1 - c0):
            for col in range(m):
                ob[i, col] = a * xb[i, col] + c * ob[i, col]


# --------------------------------------------------------------------------- scatter
def _scatter(codes, offsets, v, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; v: (n,) float64;
    # work: (nb, q) float64 scratch, nb >= 1 row blocks; out: (q,) float64
    n = codes.shape[1]
    nb = work.shape[0]
    bs = (n + nb - 1) // nb
    for b in prange(nb):
        _scatter_rows_nb(codes, offsets, v, b * bs, min(n, b * bs + bs), work[b])
    for j in prange(work.shape[1]):
        out[j] = _bin_sum_nb(work, j)


def _scatter_block(codes, offsets, V, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; V: (n, m) float64;
    # work: (nb, q, m) float64 scratch; out: (q, m) float64
    n = codes.shape[1]
    nb = work.shape[0]
    bs = (n + nb - 1) // nb
    for b in prange(nb):
        _scatter_rows_block_nb(codes, offsets, V, b * bs, min(n, b * bs + bs), work[b])
    for j in prange(work.shape[1]):
        for c in range(work.shape[2]):
            out[j, c] = _bin_sum_block_nb(work, j, c)


# --------------------------------------------------------------------------- V x
def _cov_matvec(codes, offsets, x, sigma2_e, sigma2, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; x: (n,) float64; sigma2_e: float;
    # sigma2: (K,) float64; work: (nb, q) float64 scratch; out: (n,) float64
    n = codes.shape[1]
    nb = work.shape[0]
    bs = (n + nb - 1) // nb
    # pass 1: level sums of x for all K factors, one private row of bins per block
    for b in prange(nb):
        _scatter_rows_nb(codes, offsets, x, b * bs, min(n, b * bs + bs), work[b])
    # reduce the blocks into work[0], scaled by sigma2_k
    for j in prange(work.shape[1]):
        work[0, j] = sigma2[_factor_of_nb(j, offsets)] * _bin_sum_nb(work, j)
    # pass 2: out = sigma2_e x + sum_k sigma2_k (level sum of factor k at row i)
    sums = work[0]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        xb = x[c0:c1]
        ob = out[c0:c1]
        for i in range(c1 - c0):
            ob[i] = sigma2_e * xb[i]
        _gather_add_nb(codes, offsets, sums, c0, c1, ob)


def _cov_matmat(codes, offsets, X, sigma2_e, sigma2, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; X: (n, m) float64; sigma2_e: float;
    # sigma2: (K,) float64; work: (nb, q, m) float64 scratch; out: (n, m) float64
    n = codes.shape[1]
    nb = work.shape[0]
    m = work.shape[2]
    bs = (n + nb - 1) // nb
    for b in prange(nb):
        _scatter_rows_block_nb(codes, offsets, X, b * bs, min(n, b * bs + bs), work[b])
    for j in prange(work.shape[1]):
        s2 = sigma2[_factor_of_nb(j, offsets)]
        for c in range(m):
            work[0, j, c] = s2 * _bin_sum_block_nb(work, j, c)
    sums = work[0]
    nch = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(nch):
        c0 = ch * _CHUNK
        c1 = min(n, c0 + _CHUNK)
        xb = X[c0:c1]
        ob = out[c0:c1]
        for i in range(c1 - c0):
            for c in range(m):
                ob[i, c] = sigma2_e * xb[i, c]
        _gather_add_block_nb(codes, offsets, sums, c0, c1, ob)


# --------------------------------------------------------------------------- M u
def _level_matvec(codes, offsets, u, lam, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; u: (q,) float64; lam: (K,) float64;
    # work: (nb, q) float64 scratch; out: (q,) float64
    n = codes.shape[1]
    nb = work.shape[0]
    q = work.shape[1]
    bs = (n + nb - 1) // nb
    # one pass over the rows: t = (Z u) on a chunk of rows, then Z' t into private bins
    for b in prange(nb):
        w = work[b]
        w[:] = 0.0
        t = np.empty(_CHUNK)  # (chunk,) float64, once per block
        hi = min(n, b * bs + bs)
        for c0 in range(b * bs, hi, _CHUNK):
            c1 = min(hi, c0 + _CHUNK)
            tb = t[: c1 - c0]
            tb[:] = 0.0
            _gather_add_nb(codes, offsets, u, c0, c1, tb)
            _scatter_add_nb(codes, offsets, tb, c0, c1, w)
    for j in prange(q):
        out[j] = _bin_sum_nb(work, j) + lam[_factor_of_nb(j, offsets)] * u[j]


def _level_matmat(codes, offsets, U, lam, work, out):
    # codes: (K, n) int32; offsets: (K + 1,) int64; U: (q, m) float64; lam: (K,) float64;
    # work: (nb, q, m) float64 scratch; out: (q, m) float64
    n = codes.shape[1]
    nb = work.shape[0]
    q = work.shape[1]
    m = work.shape[2]
    bs = (n + nb - 1) // nb
    for b in prange(nb):
        w = work[b]
        w[:, :] = 0.0
        t = np.empty((_CHUNK, m))  # (chunk, m) float64, once per block
        hi = min(n, b * bs + bs)
        for c0 in range(b * bs, hi, _CHUNK):
            c1 = min(hi, c0 + _CHUNK)
            tb = t[: c1 - c0]
            tb[:, :] = 0.0
            _gather_add_block_nb(codes, offsets, U, c0, c1, tb)
            _scatter_add_block_nb(codes, offsets, tb, c0, c1, w)
    for j in prange(q):
        lj = lam[_factor_of_nb(j, offsets)]
        for c in range(m):
            out[j, c] = _bin_sum_block_nb(work, j, c) + lj * U[j, c]


# --------------------------------------------------------------------------- compile
def _nnz_block(indptr, blk, nb):
    # Rows [lo, hi) of block blk of nb for a CSR matrix, blocks of equal nnz (not of equal
    # row count: on Zipf-skewed designs a few levels hold most of the cells).
    r = indptr.size - 1
    nnz = indptr[r]
    lo = min(r, np.searchsorted(indptr, (nnz * blk) // nb))
    hi = r if blk == nb - 1 else min(r, np.searchsorted(indptr, (nnz * (blk + 1)) // nb))
    return lo, hi


_nnz_block_nb = numba.njit(_nnz_block, cache=True, inline="always")


# The CSR, dense and CG kernels below repeat their prange headers for the same reason as
# the kernels above (see the note above _gather).
def _csr_matmat(indptr, indices, data, X, out):
    # out = A X for a CSR matrix A. The rows are split into blocks of equal nnz (not of
    # equal row count: on Zipf-skewed designs a few levels hold most of the cells, and
    # equal row ranges would leave one thread with nearly all the work); blocks in prange,
    # each writing only its own rows of out, so the parallel variant is race-free.
    # indptr: (r + 1,) int; indices: (nnz,) int32/int64; data: (nnz,) float;
    # X: (c, m) float64 C order; out: (r, m) float64, overwritten
    m = X.shape[1]
    nb = min(indptr.size - 1, 64)
    for blk in prange(nb):
        lo, hi = _nnz_block_nb(indptr, blk, nb)
        if m == 1:  # one column: accumulate in a register
            for i in range(lo, hi):
                s = 0.0
                for p in range(indptr[i], indptr[i + 1]):
                    s += data[p] * X[indices[p], 0]
                out[i, 0] = s
        else:
            for i in range(lo, hi):
                for j in range(m):
                    out[i, j] = 0.0
                for p in range(indptr[i], indptr[i + 1]):
                    a = data[p]
                    col = indices[p]
                    for j in range(m):
                        out[i, j] += a * X[col, j]


def _csr_sandwich(indptr, indices, data, lam, X, out):
    # out = lam * (A (lam * X)) + X for a CSR matrix A and a vector lam (rows scaled):
    # the spherical product M X = Lambda Z'Z Lambda X + X of the iterative solver in one
    # pass, without the (r, m) temporary lam * X. The same operations in the same order
    # as the three steps (scale, csr_matmat, scale and add), so the same rounding.
    # Rows in blocks of equal nnz as in _csr_matmat. indptr: (r + 1,) int; indices:
    # (nnz,) int32/int64; data: (nnz,) float; lam: (r,) float64; X, out: (r, m) float64
    m = X.shape[1]
    nb = min(indptr.size - 1, 64)
    for blk in prange(nb):
        lo, hi = _nnz_block_nb(indptr, blk, nb)
        for i in range(lo, hi):
            for j in range(m):
                out[i, j] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                a = data[p]
                col = indices[p]
                lc = lam[col]
                for j in range(m):
                    out[i, j] += a * (lc * X[col, j])
            li = lam[i]
            for j in range(m):
                out[i, j] = li * out[i, j] + X[i, j]


def _offdiag_square_rows(indptr, indices, data, a, out):
    # out[i] = sum_{p in row i, indices[p] != i} data[p]^2 a[indices[p]]: the row sums of
    # the squared off-diagonal entries of a CSR matrix weighted by a (the closed forms
    # ||E||_F^2 = a' out and tr(C'P^{-1}C) of the iterative solver, from the Gram's own
    # arrays). Rows in blocks of equal nnz as in _csr_matmat. indptr: (r + 1,) int;
    # indices: (nnz,) int; data: (nnz,) float; a: (c,) float64; out: (r,) float64
    nb = min(indptr.size - 1, 64)
    for blk in prange(nb):
        lo, hi = _nnz_block_nb(indptr, blk, nb)
        for i in range(lo, hi):
            s = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                if j != i:
                    v = data[p]
                    s += v * v * a[j]
            out[i] = s


def _csr_residual(indptr, indices, data, x, b, scale, out):
    # out = scale * (b - A x) for a CSR matrix A and vectors x, b, scale (elementwise; the
    # fused form of one Gauss-Seidel block update or one residual). Rows split into blocks
    # of equal nnz as in _csr_matmat; each block writes only its own rows of out.
    # indptr: (r + 1,) int; indices: (nnz,) int32/int64; data: (nnz,) float;
    # x: (c,) float64; b, scale, out: (r,) float64
    nb = min(indptr.size - 1, 64)
    for blk in prange(nb):
        lo, hi = _nnz_block_nb(indptr, blk, nb)
        for i in range(lo, hi):
            s = b[i]
            for p in range(indptr[i], indptr[i + 1]):
                s -= data[p] * x[indices[p]]
            out[i] = scale[i] * s


def _dense_matmat(U, Ct, out):
    # out = U C for a dense U (m, r) and C given transposed, Ct (k, r) C order;
    # out: (m, k), overwritten. Rows of U in prange; the inner loop is a contiguous dot.
    r = U.shape[1]
    k = Ct.shape[0]
    for i in prange(U.shape[0]):
        for c in range(k):
            s = 0.0
            for j in range(r):
                s += U[i, j] * Ct[c, j]
            out[i, c] = s


def _dense_tmatmat(U, T, work, out):
    # out = (U' T)' for a dense U (m, r) and T (m, k): out (k, r), overwritten.
    # work: (nb, k, r) scratch, one private accumulator per block of rows of U.
    m = U.shape[0]
    r = U.shape[1]
    k = T.shape[1]
    nb = work.shape[0]
    bs = (m + nb - 1) // nb
    for b in prange(nb):
        w = work[b]
        for c in range(k):
            for j in range(r):
                w[c, j] = 0.0
        for i in range(b * bs, min(m, (b + 1) * bs)):
            for c in range(k):
                t = T[i, c]
                for j in range(r):
                    w[c, j] += U[i, j] * t
    for j in prange(r):
        for c in range(k):
            out[c, j] = _bin_sum_block_nb(work, c, j)


def _sym_matmat(A, Xt, work, out):
    # out = A X for a symmetric A (m, m) of which only the lower triangle (j <= i) is
    # read, so the matrix is streamed once at half its size; X given transposed, Xt
    # (k, m) C order; work (nb, k, m) scratch, one private accumulator per block of rows
    # (blocks of equal triangular area); out (m, k), overwritten.
    m = A.shape[0]
    k = Xt.shape[0]
    nb = work.shape[0]
    for b in prange(nb):
        lo = int(m * np.sqrt(b / nb))
        hi = m if b == nb - 1 else int(m * np.sqrt((b + 1) / nb))
        w = work[b]
        for c in range(k):
            for j in range(m):
                w[c, j] = 0.0
        for i in range(lo, hi):
            for c in range(k):
                xi = Xt[c, i]
                wc = w[c]
                xc = Xt[c]
                s = A[i, i] * xi
                for j in range(i):
                    a = A[i, j]
                    s += a * xc[j]
                    wc[j] += a * xi
                wc[i] += s
    for i in prange(m):
        for c in range(k):
            out[i, c] = _bin_sum_block_nb(work, c, i)


def _cg_update(X, R, P, AP, pinv, a, nblocks, partial):
    # One block-CG update, fused: X += P a, R -= AP a, and the per-column reductions
    # rz = sum R * pinv * R and rr = sum R * R into partial[block, 0, j] / [block, 1, j]
    # (one row of partial per block of rows: race-free), for the caller to sum.
    # X, R, P, AP: (q, m) float64; pinv: (q,); a: (m,); partial: (nblocks, 2, m)
    q, m = X.shape
    size = (q + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        lo = blk * size
        hi = min(q, lo + size)
        for j in range(m):
            partial[blk, 0, j] = 0.0
            partial[blk, 1, j] = 0.0
        for i in range(lo, hi):
            w = pinv[i]
            for j in range(m):
                aj = a[j]
                X[i, j] += aj * P[i, j]
                r = R[i, j] - aj * AP[i, j]
                R[i, j] = r
                partial[blk, 0, j] += r * r * w
                partial[blk, 1, j] += r * r


def _cg_direction(P, R, pinv, b, nblocks):
    # P = pinv * R + P b (the new search directions), rows in blocks
    q, m = P.shape
    size = (q + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        lo = blk * size
        hi = min(q, lo + size)
        for i in range(lo, hi):
            w = pinv[i]
            for j in range(m):
                P[i, j] = w * R[i, j] + b[j] * P[i, j]


def _block_matmat(B, X, out):
    # out = blockdiag_j(B_j) X for d x d blocks: row block j of X (rows j d .. j d + d - 1)
    # times B_j, or times the one shared B_0 when B has a single block (Lambda's I (x) T).
    # B: (nb, d, d) float64 with nb = 1 or r / d; X, out: (r, m) float64 C order, out
    # overwritten. Levels in prange, each writing only its own rows (race-free).
    d = B.shape[1]
    nl = X.shape[0] // d
    m = X.shape[1]
    step = 0 if B.shape[0] == 1 else 1  # block j * step: the shared one or level j's
    for j in prange(nl):
        bj = j * step
        for a in range(d):
            r = j * d + a
            for c in range(m):
                out[r, c] = 0.0
            for b in range(d):
                v = B[bj, a, b]
                if v != 0.0:
                    rb = j * d + b
                    for c in range(m):
                        out[r, c] += v * X[rb, c]


def _block_of(i, offsets, dims):
    # (start, size) of the d x d diagonal block holding row i, for terms with rows
    # offsets[k] .. offsets[k + 1] - 1 in blocks of dims[k] (level by level)
    k = 0
    while offsets[k + 1] <= i:
        k += 1
    d = dims[k]
    return i - (i - offsets[k]) % d, d


_block_of_nb = numba.njit(_block_of, cache=True, inline="always")


def _block_closed(indptr, indices, offsets, dims):
    # True when the CSR pattern is closed under the block structure: the rows of a block
    # share one column list, made of whole column blocks (each in order), and the
    # diagonal block is present. Lambda' C Lambda + I then has exactly C's pattern.
    q = indptr.size - 1
    i = 0
    while i < q:
        s, d = _block_of_nb(i, offsets, dims)
        lo, hi = indptr[s], indptr[s + 1]
        ln = hi - lo
        diag = False
        p = lo
        while p < hi:
            c0, e = _block_of_nb(indices[p], offsets, dims)
            if indices[p] != c0 or p + e > hi:
                return False
            for b in range(e):
                if indices[p + b] != c0 + b:
                    return False
            if c0 == s:
                diag = True
            p += e
        if not diag:
            return False
        for a in range(1, d):
            la = indptr[s + a]
            if indptr[s + a + 1] - la != ln:
                return False
            for t in range(ln):
                if indices[la + t] != indices[lo + t]:
                    return False
        i = s + d
    return True


def _merge_values(indptr, indices, data, pptr, pind, out):
    # The values of a CSR matrix (indptr, indices, data) on a pattern (pptr, pind) that
    # contains it, both with sorted column indices: out zero where the matrix has none.
    # Rows in prange, each writing only its own entries.
    for i in prange(indptr.size - 1):
        t = pptr[i]
        for p in range(indptr[i], indptr[i + 1]):
            c = indices[p]
            while pind[t] != c:
                out[t] = 0.0
                t += 1
            out[t] = data[p]
            t += 1
        for u in range(t, pptr[i + 1]):
            out[u] = 0.0


def _lam_sandwich(indptr, indices, data, offsets, dims, T, chunks, out):
    # out = Lambda' C Lambda + I on C's block-closed pattern (see _block_closed), with
    # Lambda = blockdiag_k(I (x) T_k): entry ((j, a), (l, c)) is
    # sum_{a', b'} T_k[a', a] C[(j, a'), (l, b')] T_l[b', c].
    # indptr, indices, data: C (CSR, q x q, sorted, block-closed); offsets: (K + 1,) int64;
    # dims: (K,) int64; T: (K, dmax, dmax) float64, term k's T_k in its top-left corner;
    # chunks: (nch + 1,) block-aligned row boundaries; out: (nnz,) float64, overwritten.
    # Chunks in prange, each writing only its own rows.
    for ch in prange(chunks.size - 1):
        i = chunks[ch]
        while i < chunks[ch + 1]:
            k = 0
            while offsets[k + 1] <= i:
                k += 1
            d = dims[k]
            lo = indptr[i]
            ln = indptr[i + 1] - lo
            t = 0
            while t < ln:
                c0 = indices[lo + t]
                m = 0
                while offsets[m + 1] <= c0:
                    m += 1
                e = dims[m]
                for a in range(d):
                    pa = indptr[i + a] + t
                    for c in range(e):
                        acc = 0.0
                        for a2 in range(d):
                            ta = T[k, a2, a]
                            if ta != 0.0:
                                pb = indptr[i + a2] + t
                                inner = 0.0
                                for b2 in range(e):
                                    inner += data[pb + b2] * T[m, b2, c]
                                acc += ta * inner
                        if i + a == c0 + c:
                            acc += 1.0
                        out[pa + c] = acc
                t += e
            i += d


def _bj_apply(Dr, offsets, dims, R, Z, chunks):
    # Z = blockdiag_j(D_j^{-1}) R for the d x d blocks of rows (offsets, dims); Dr (q, dmax)
    # holds row a of block j's D_j^{-1} in row j d + a (only its first d entries read).
    # R, Z: (q, m) C order. Chunks (block-aligned row boundaries) in prange.
    m = R.shape[1]
    for ch in prange(chunks.size - 1):
        i = chunks[ch]
        while i < chunks[ch + 1]:
            s, d = _block_of_nb(i, offsets, dims)
            for a in range(d):
                r = s + a
                for j in range(m):
                    acc = 0.0
                    for b in range(d):
                        acc += Dr[r, b] * R[s + b, j]
                    Z[r, j] = acc
            i = s + d


def _cg_update_bj(X, R, P, AP, Z, Dr, offsets, dims, a, chunks, partial):
    # One block-CG update with the block-Jacobi preconditioner, fused: X += P a,
    # R -= AP a, Z = D^{-1} R (per d x d block, after the block's rows of R are updated)
    # and per-chunk partial sums of R * Z and R * R per column into partial[ch, 0 / 1, j]
    # (race-free), for the caller to sum. Shapes as _cg_update and _bj_apply;
    # partial: (nch, 2, m).
    m = X.shape[1]
    for ch in prange(chunks.size - 1):
        for j in range(m):
            partial[ch, 0, j] = 0.0
            partial[ch, 1, j] = 0.0
        i = chunks[ch]
        while i < chunks[ch + 1]:
            s, d = _block_of_nb(i, offsets, dims)
            for r in range(s, s + d):
                for j in range(m):
                    aj = a[j]
                    X[r, j] += aj * P[r, j]
                    R[r, j] -= aj * AP[r, j]
            for r in range(s, s + d):
                for j in range(m):
                    acc = 0.0
                    for b in range(d):
                        acc += Dr[r, b] * R[s + b, j]
                    Z[r, j] = acc
                    rr = R[r, j]
                    partial[ch, 0, j] += rr * acc
                    partial[ch, 1, j] += rr * rr
            i = s + d


def _cg_direction_z(P, Z, b, chunks):
    # P = Z + P b (the new search directions from preconditioned residuals Z)
    m = P.shape[1]
    for ch in prange(chunks.size - 1):
        for i in range(chunks[ch], chunks[ch + 1]):
            for j in range(m):
                P[i, j] = Z[i, j] + b[j] * P[i, j]


def _pair_sums(G, W, E, lo, nl, d, m, chunks, work):
    # Per-probe sums of the slope gradient's trace part for one term (rows lo ..
    # lo + nl d - 1, blocks of d): work[ch, a, b, i] = sum over the chunk's levels l of
    # G[(l, a), i] E[(l, b), i] + G[(l, a), m + i] W[(l, b), i], with G = [C Lambda W,
    # C Lambda E] (q, 2 m), W, E (q, m); chunks: level boundaries (nch + 1,); the caller
    # sums work over chunks. Race-free (one row of work per chunk).
    for ch in prange(chunks.size - 1):
        for a in range(d):
            for b in range(d):
                for i in range(m):
                    work[ch, a, b, i] = 0.0
        for lev in range(chunks[ch], chunks[ch + 1]):
            r0 = lo + lev * d
            for a in range(d):
                ra = r0 + a
                for b in range(d):
                    rb = r0 + b
                    for i in range(m):
                        work[ch, a, b, i] += G[ra, i] * E[rb, i] + G[ra, m + i] * W[rb, i]


def _renamed(fn, suffix):
    # A copy of ``fn`` under another qualified name. Numba names on-disk cache entries by
    # qualified name and line and does not key them by ``parallel``, so without this the
    # parallel variant would load the serial variant's cached machine code.
    new = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__
    )
    new.__qualname__ = fn.__qualname__ + suffix
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    return new


def _schur_rows(mp, mi, mx, ap, ai, ax, kp, ki, kx, S):  # pragma: no cover (compiled)
    """``S = M22 + I - A21 K`` (dense, row-major) from the CSR matrices ``M22`` (m x m),
    ``A21`` (m x q1) and ``K`` (q1 x m): row ``r`` of ``A21 K`` sums ``A21[r, j] K[j, :]``
    over the nonzeros ``j`` of row ``r``; one thread per row."""
    m = S.shape[0]
    for r in prange(m):
        row = S[r]
        for c in range(m):
            row[c] = 0.0
        row[r] = 1.0
        for p in range(mp[r], mp[r + 1]):
            row[mi[p]] += mx[p]
        for p in range(ap[r], ap[r + 1]):
            j = ai[p]
            v = ax[p]
            for t in range(kp[j], kp[j + 1]):
                row[ki[t]] -= v * kx[t]


def _sandwich_blocks(indptr, indices, data, S, d, out):  # pragma: no cover (compiled)
    """``out[j] += K_j S K_j'`` for every level ``j`` (rows ``j d .. j d + d - 1`` of the
    CSR matrix ``K``, column indices sorted within rows), over the pairs of nonzeros of
    the level's rows, for a symmetric ``S`` of which only the upper triangle
    ``S[r, c]``, ``c >= r``, is read (so LAPACK's column-major lower triangle, viewed
    transposed, serves as it is; each row of the triangle is read along its length).

    Two rows with the same columns (a two-column term's level, as ``K = B^{-1} A_12``
    makes them unless a value cancels exactly) read each ``S`` entry of their pattern
    once for the three products, not twice."""
    for j in prange(out.shape[0]):
        if d == 2:
            r0 = 2 * j
            lo0, hi0, hi1 = indptr[r0], indptr[r0 + 1], indptr[r0 + 2]
            same = hi1 - hi0 == hi0 - lo0
            if same:
                for p in range(hi0 - lo0):
                    if indices[lo0 + p] != indices[hi0 + p]:
                        same = False
                        break
            if same:
                s00 = 0.0
                s01 = 0.0
                s11 = 0.0
                for p in range(hi0 - lo0):
                    cp = indices[lo0 + p]
                    x0 = data[lo0 + p]
                    x1 = data[hi0 + p]
                    t0 = 0.0
                    t1 = 0.0
                    for r in range(p + 1, hi0 - lo0):
                        v = S[cp, indices[lo0 + r]]
                        t0 += data[lo0 + r] * v
                        t1 += data[hi0 + r] * v
                    v = S[cp, cp]
                    s00 += x0 * (x0 * v + 2.0 * t0)
                    s11 += x1 * (x1 * v + 2.0 * t1)
                    s01 += x0 * (x1 * v + t1) + x1 * t0
                out[j, 0, 0] += s00
                out[j, 0, 1] += s01
                out[j, 1, 0] += s01
                out[j, 1, 1] += s11
                continue
        for a in range(d):
            ra = j * d + a
            # the diagonal entry: each unordered pair once, the off-diagonal ones twice
            acc = 0.0
            for p in range(indptr[ra], indptr[ra + 1]):
                ca = indices[p]
                va = data[p]
                row = 0.0
                for r in range(p + 1, indptr[ra + 1]):
                    row += data[r] * S[ca, indices[r]]
                acc += va * (va * S[ca, ca] + 2.0 * row)
            out[j, a, a] += acc
            for b in range(a + 1, d):
                rb = j * d + b
                acc = 0.0
                for p in range(indptr[ra], indptr[ra + 1]):
                    ca = indices[p]
                    va = data[p]
                    for r in range(indptr[rb], indptr[rb + 1]):
                        cb = indices[r]
                        if cb >= ca:
                            acc += va * data[r] * S[ca, cb]
                        else:
                            acc += va * data[r] * S[cb, ca]
                out[j, a, b] += acc
                out[j, b, a] += acc


def _block_rows_left_multiply(indptr, data, B, d, out):  # pragma: no cover (compiled)
    """``out`` on the pattern of a CSR matrix whose rows come in groups of ``d`` sharing
    their columns (level ``j``: rows ``j d .. j d + d - 1``): each group's ``d x n_j``
    values left-multiplied by ``B[j]`` (``d x d``). One thread per level."""
    for j in prange(B.shape[0]):
        r0 = j * d
        n = indptr[r0 + 1] - indptr[r0]
        for a in range(d):
            oa = indptr[r0 + a]
            for t in range(n):
                acc = 0.0
                for b in range(d):
                    acc += B[j, a, b] * data[indptr[r0 + b] + t]
                out[oa + t] = acc


def _compile(fn, fastmath=False):
    serial = numba.njit(fn, cache=True, fastmath=fastmath)
    parallel = numba.njit(
        _renamed(fn, "_parallel"), parallel=True, cache=_PARALLEL_CACHE, fastmath=fastmath
    )
    return serial, parallel


gather_serial, gather_parallel = _compile(_gather)
gather_block_serial, gather_block_parallel = _compile(_gather_block)
axpy_gather_serial, axpy_gather_parallel = _compile(_axpy_gather)
axpy_gather_block_serial, axpy_gather_block_parallel = _compile(_axpy_gather_block)
scatter_serial, scatter_parallel = _compile(_scatter)
scatter_block_serial, scatter_block_parallel = _compile(_scatter_block)
cov_matvec_serial, cov_matvec_parallel = _compile(_cov_matvec)
cov_matmat_serial, cov_matmat_parallel = _compile(_cov_matmat)
level_matvec_serial, level_matvec_parallel = _compile(_level_matvec)
level_matmat_serial, level_matmat_parallel = _compile(_level_matmat)
csr_matmat_serial, csr_matmat_parallel = _compile(_csr_matmat)
csr_sandwich_serial, csr_sandwich_parallel = _compile(_csr_sandwich)
offdiag_square_rows_serial, offdiag_square_rows_parallel = _compile(_offdiag_square_rows)
block_matmat_serial, block_matmat_parallel = _compile(_block_matmat)
csr_residual_serial, csr_residual_parallel = _compile(_csr_residual)
schur_rows_serial, schur_rows_parallel = _compile(_schur_rows)
sandwich_blocks_serial, sandwich_blocks_parallel = _compile(_sandwich_blocks)
block_rows_lmul_serial, block_rows_lmul_parallel = _compile(_block_rows_left_multiply)
# fastmath lets the contiguous dot products and axpys use SIMD (reassociated float64 sums)
dense_matmat_serial, dense_matmat_parallel = _compile(_dense_matmat, fastmath=True)
dense_tmatmat_serial, dense_tmatmat_parallel = _compile(_dense_tmatmat, fastmath=True)
sym_matmat_serial, sym_matmat_parallel = _compile(_sym_matmat, fastmath=True)
cg_update_serial, cg_update_parallel = _compile(_cg_update)
merge_values_serial, merge_values_parallel = _compile(_merge_values)
lam_sandwich_serial, lam_sandwich_parallel = _compile(_lam_sandwich)
bj_apply_serial, bj_apply_parallel = _compile(_bj_apply)
cg_update_bj_serial, cg_update_bj_parallel = _compile(_cg_update_bj)
cg_direction_z_serial, cg_direction_z_parallel = _compile(_cg_direction_z)
pair_sums_serial, pair_sums_parallel = _compile(_pair_sums)
block_closed = numba.njit(_block_closed, cache=True)
cg_direction_serial, cg_direction_parallel = _compile(_cg_direction)

@numba.njit(cache=True, nogil=True)
def weighted_gram(indptr, indices, data, w, out):  # pragma: no cover - compiled
    """Dense ``out = N' diag(w) N`` for a CSR matrix ``N`` of shape (q1, qr).

    indptr : (q1 + 1,) int64; indices : (nnz,) int64; data : (nnz,) float64;
    w : (q1,) float64; out : (qr, qr) float64, overwritten. Cost: sum over the rows of N
    of nnz_row^2, the Schur complement's fill, not q1 * qr^2.
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
def csr_column_positions(indptr, indices, ncols):  # pragma: no cover - compiled
    """Where each column's nonzeros sit in a CSR matrix ``N`` (shape ``(q1, ncols)``).

    For column ``b`` and ``t`` in ``ptr[b] .. ptr[b + 1]``: the nonzero's row ``rows[t]``
    and its position ``pos[t]`` in ``indices``/``data`` (rows increasing): the transpose
    as an index, for :func:`schur_fill_rows` and :func:`schur_trace_rows` (symbolic, once).

    Returns
    -------
    ptr : (ncols + 1,) int64; rows, pos : (nnz,) int64
    """
    q1 = indptr.size - 1
    ptr = np.zeros(ncols + 1, dtype=np.int64)
    for p in range(indptr[q1]):
        ptr[indices[p] + 1] += 1
    for b in range(ncols):
        ptr[b + 1] += ptr[b]
    rows = np.empty(indptr[q1], dtype=np.int64)
    pos = np.empty(indptr[q1], dtype=np.int64)
    nxt = ptr[:ncols].copy()
    for i in range(q1):
        for p in range(indptr[i], indptr[i + 1]):
            t = nxt[indices[p]]
            rows[t] = i
            pos[t] = p
            nxt[indices[p]] = t + 1
    return ptr, rows, pos


@numba.njit(cache=True, nogil=True)
def schur_fill_rows(indptr, indices, data, cptr, crows, cpos, w, aptr, aidx, aval,
                    scale, RN, Sxx, out):  # pragma: no cover - compiled
    """The exact solver's Schur block's upper triangle, in place: for ``b < r``,
    ``out[b, b:r] = scale_b scale_a (A - N' diag(w) N)_ba + [a = b]`` and
    ``out[b, r:] = scale_b RN[b]``; then the upper triangle of ``out[r:, r:] = Sxx``.

    ``N`` is CSR (``(q1, r)``, column indices sorted within rows) with
    :func:`csr_column_positions` ``(cptr, crows, cpos)``; ``A`` (``r x r``) is given by
    its CSR upper triangle ``(aptr, aidx, aval)``. Row ``b`` of the Gram sums, over the
    rows ``i`` of ``N`` with a nonzero in column ``b``, ``w_i N_ib`` times the rest of row
    ``i`` from ``b`` on: ``sum_i nnz_i (nnz_i + 1) / 2`` products reading ``N`` (small)
    and writing one output row at a time (in cache): no dense Gram, and the zeroing and
    scaling are done row by row in the same sweep.
    ``out`` is square of size ``r + c`` (``RN``: ``(r, c)``, ``Sxx``: ``(c, c)``); only
    its upper triangle is written (a C-ordered ``out`` is the lower triangle of
    LAPACK's column-major ``out.T``).
    """
    r = cptr.size - 1
    for b in range(r):
        row = out[b]
        for a in range(b, r):
            row[a] = 0.0
        for t in range(cptr[b], cptr[b + 1]):
            i = crows[t]
            p = cpos[t]
            c = w[i] * data[p]
            for q in range(p, indptr[i + 1]):
                row[indices[q]] -= c * data[q]
        for t in range(aptr[b], aptr[b + 1]):
            row[aidx[t]] += aval[t]
        sb = scale[b]
        for a in range(b, r):
            row[a] *= sb * scale[a]
        row[b] += 1.0
        for j in range(RN.shape[1]):
            row[r + j] = sb * RN[b, j]
    for i in range(Sxx.shape[0]):
        for j in range(i, Sxx.shape[0]):
            out[r + i, r + j] = Sxx[i, j]


@numba.njit(cache=True, nogil=True)
def schur_trace_rows(indptr, indices, data, cptr, crows, cpos, w, scale,
                     S):  # pragma: no cover - compiled
    """``sum_{a,b} S_ab scale_a scale_b (N' diag(w) N)_ab``, the trace of ``S`` times
    the dense Gram without forming it (:func:`schur_fill_rows`' arguments).

    ``S`` is symmetric and only its upper triangle ``S[b, a]``, ``a >= b``, is read (a
    C-ordered view of LAPACK's column-major lower triangle); off-diagonal entries
    count twice.
    """
    r = cptr.size - 1
    total = 0.0
    for b in range(r):
        row = S[b]
        acc = 0.0
        for t in range(cptr[b], cptr[b + 1]):
            i = crows[t]
            p = cpos[t]
            sp_ = 0.0
            for q in range(p + 1, indptr[i + 1]):
                sp_ += data[q] * scale[indices[q]] * row[indices[q]]
            acc += w[i] * data[p] * (data[p] * scale[b] * row[b] + 2.0 * sp_)
        total += scale[b] * acc
    return total


@numba.njit(cache=True, nogil=True)
def csr_gauss_seidel(indptr, indices, data, x, b, forward):  # pragma: no cover - compiled
    """One in-place Gauss-Seidel sweep on ``A x = b`` for a CSR matrix ``A`` (serial).

    indptr : (r + 1,) int; indices : (nnz,) int; data : (nnz,) float64 (the diagonal
    entries must be present and nonzero); x, b : (r,) float64; forward : bool (rows in
    increasing order) or False (decreasing; a forward then a backward sweep is the
    symmetric Gauss-Seidel smoother).
    """
    nr = indptr.size - 1
    for t in range(nr):
        i = t if forward else nr - 1 - t
        s = b[i]
        d = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j == i:
                d = data[p]
            else:
                s -= data[p] * x[j]
        x[i] = s / d


@numba.njit(cache=True, nogil=True)
def csr_append(indptr, indices, data, row_offset, col_offset, transpose, fill, out_indices,
               out_data):  # pragma: no cover - compiled
    """Append the entries of a CSR block ``N`` (``transpose``: of ``N'``) to the rows of
    a preallocated CSR matrix, at ``row_offset`` and ``col_offset``.

    indptr : (r + 1,) int; indices : (nnz,) int; data : (nnz,) float64; fill : (q,)
    int64, the next free position of each output row (advanced); out_indices : int32,
    out_data : float64 (the output's arrays). Entry ``a`` of row ``i`` goes to row
    ``row_offset + i`` and column ``col_offset + indices[a]`` (transposed: row
    ``row_offset + indices[a]``, column ``col_offset + i``), so appending blocks in
    increasing column order with sorted ``N`` keeps every output row sorted.
    """
    for i in range(indptr.size - 1):
        for a in range(indptr[i], indptr[i + 1]):
            if transpose:
                r = row_offset + indices[a]
                c = col_offset + i
            else:
                r = row_offset + i
                c = col_offset + indices[a]
            p = fill[r]
            out_indices[p] = c
            out_data[p] = data[a]
            fill[r] = p + 1


@numba.njit(cache=True, nogil=True)
def _find(parent, i):  # pragma: no cover - compiled
    """The root of ``i`` in the union-find forest ``parent``, halving the path."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def union_csr(indptr, indices, row_offset, col_offset, parent):  # pragma: no cover
    """Join, in the union-find forest ``parent``, the vertices ``row_offset + i`` and
    ``col_offset + indices[a]`` of every stored entry ``a`` of row ``i`` of a CSR pattern.

    indptr : (r + 1,) int; indices : (nnz,) int; parent : (q,) int64, updated (start
    with ``parent[i] = i``). Reads the pattern only (any stored entry is an edge); the
    root of a union is the smaller vertex.
    """
    for i in range(indptr.size - 1):
        for a in range(indptr[i], indptr[i + 1]):
            ri = _find(parent, row_offset + i)
            rj = _find(parent, col_offset + indices[a])
            if ri < rj:
                parent[rj] = ri
            elif rj < ri:
                parent[ri] = rj


@numba.njit(cache=True, nogil=True)
def component_labels(parent, out):  # pragma: no cover - compiled
    """Component labels of a union-find forest, numbered by their smallest vertex (as
    ``scipy.sparse.csgraph.connected_components`` numbers them); returns the number of
    components.

    parent : (q,) int64, compressed in place; out : (q,) int32, overwritten.
    """
    n = 0
    for i in range(parent.size):
        r = _find(parent, i)
        if r == i:  # the smallest vertex of its component (roots are minimal)
            out[i] = n
            n += 1
        else:
            out[i] = out[r]
    return n


#: name -> (serial, parallel) compiled variants
KERNELS = {
    "gather": (gather_serial, gather_parallel),
    "gather_block": (gather_block_serial, gather_block_parallel),
    "axpy_gather": (axpy_gather_serial, axpy_gather_parallel),
    "axpy_gather_block": (axpy_gather_block_serial, axpy_gather_block_parallel),
    "scatter": (scatter_serial, scatter_parallel),
    "scatter_block": (scatter_block_serial, scatter_block_parallel),
    "cov_matvec": (cov_matvec_serial, cov_matvec_parallel),
    "cov_matmat": (cov_matmat_serial, cov_matmat_parallel),
    "level_matvec": (level_matvec_serial, level_matvec_parallel),
    "level_matmat": (level_matmat_serial, level_matmat_parallel),
}


def block_chunks(offsets, dims, n_chunks, indptr=None):
    """Row boundaries of about ``n_chunks`` chunks that start on ``d x d`` block starts.

    Parameters
    ----------
    offsets : ndarray of int, shape (K + 1,)
        First row of each term (and ``q``).
    dims : ndarray of int, shape (K,)
        Block size of each term.
    n_chunks : int
    indptr : ndarray, shape (q + 1,), optional
        A CSR row pointer: chunks of equal non-zeros rather than equal rows.

    Returns
    -------
    ndarray of int64, shape (m + 1,)
        Increasing, from 0 to ``q``, every entry a block start.

    Examples
    --------
    >>> block_chunks(np.array([0, 6, 9]), np.array([2, 1]), 4).tolist()
    [0, 2, 4, 6, 9]
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    dims = np.asarray(dims, dtype=np.int64)
    q = int(offsets[-1])
    if q == 0:
        return np.zeros(1, dtype=np.int64)
    if indptr is None:
        cuts = (np.arange(1, n_chunks) * q) // n_chunks
    else:
        ip = np.asarray(indptr, dtype=np.int64)
        cuts = np.searchsorted(ip, (np.arange(1, n_chunks) * ip[-1]) // n_chunks)
        cuts = np.minimum(cuts, q)
    k = np.searchsorted(offsets, cuts, side="right") - 1
    k = np.minimum(k, dims.size - 1)
    cuts = cuts - (cuts - offsets[k]) % dims[k]  # snap down to the block start
    return np.unique(np.r_[0, cuts, q]).astype(np.int64)


def get_slope_kernels(parallel=False):
    """The serial or parallel kernels of the random-slope iterative solver, by name.

    ``lam_sandwich(indptr, indices, data, offsets, dims, T, chunks, out)``: the values
    of ``Lambda' C Lambda + I`` on ``C``'s block-closed pattern (:data:`block_closed`);
    ``bj_apply(Dr, offsets, dims, R, Z, chunks)``: ``Z = D^{-1} R`` for the block-Jacobi
    inverse blocks given by rows ``Dr``; ``cg_update_bj(X, R, P, AP, Z, Dr, offsets, dims,
    a, chunks, partial)`` and ``cg_direction_z(P, Z, b, chunks)``: the fused block-CG
    update and direction; ``pair_sums(G, W, E, lo, nl, d, m, chunks, work)``: per-probe
    sums of the gradient's trace part; ``merge_values(indptr, indices, data, pptr, pind,
    out)``: a CSR matrix's values on a larger pattern. ``chunks`` are block-aligned row
    boundaries (:func:`block_chunks`).

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    dict of str to callable
    """
    v = 1 if parallel else 0
    return {
        "lam_sandwich": (lam_sandwich_serial, lam_sandwich_parallel)[v],
        "bj_apply": (bj_apply_serial, bj_apply_parallel)[v],
        "cg_update_bj": (cg_update_bj_serial, cg_update_bj_parallel)[v],
        "cg_direction_z": (cg_direction_z_serial, cg_direction_z_parallel)[v],
        "pair_sums": (pair_sums_serial, pair_sums_parallel)[v],
        "merge_values": (merge_values_serial, merge_values_parallel)[v],
    }


def get_cg_kernels(parallel=False):
    """The fused block-CG kernels ``(cg_update, cg_direction)``, serial or parallel.

    ``cg_update(X, R, P, AP, pinv, a, nblocks, partial)`` does ``X += P a``,
    ``R -= AP a`` and writes per-block partial sums of ``R * pinv * R`` and ``R * R`` per
    column; ``cg_direction(P, R, pinv, b, nblocks)`` sets ``P = pinv * R + P b``. Each is
    one pass over the (q, m) blocks; blocks of rows make the reductions race-free.

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    tuple of callable
    """
    if parallel:
        return cg_update_parallel, cg_direction_parallel
    return cg_update_serial, cg_direction_serial


def get_block_matmat(parallel=False):
    """The serial or parallel ``block_matmat`` kernel: ``out = blockdiag_j(B_j) X`` for
    ``d x d`` blocks ``B`` of shape ``(n_levels, d, d)``, or ``(1, d, d)`` for one block
    shared by every level (``(I (x) T) X``). Called as ``block_matmat(B, X, out)`` with
    ``X`` and ``out`` of shape ``(n_levels d, m)``, C order, ``out`` overwritten; the
    parallel variant (``parallel=True``) runs the levels in ``prange``.
    """
    return block_matmat_parallel if parallel else block_matmat_serial


def get_csr_matmat(parallel=False):
    """The serial or parallel ``csr_matmat`` kernel (``out = A X`` for CSR ``A``).

    Kept out of :data:`KERNELS`, whose members share the ``(codes, offsets, ...)``
    signature.

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    callable
    """
    return csr_matmat_parallel if parallel else csr_matmat_serial


def get_schur_kernels(parallel=False):
    """The serial or parallel ``(schur_rows, sandwich_blocks)`` kernels of the exact
    slope solver: the dense Schur block ``S = M22 + I - A21 K`` (row-major, from CSR
    matrices) and ``out[j] += K_j S K_j'`` per level (the first term's diagonal blocks of
    the inverse; it reads the upper triangle of a symmetric ``S`` only).

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    (callable, callable)
    """
    if parallel:
        return schur_rows_parallel, sandwich_blocks_parallel
    return schur_rows_serial, sandwich_blocks_serial


def get_block_rows_kernel(parallel=False):
    """The serial or parallel ``block_rows_left_multiply(indptr, data, B, d, out)``:
    the values of ``blockdiag_j(B_j) M`` on the pattern of a CSR matrix ``M`` whose rows
    come in groups of ``d`` (one per level) sharing their columns (the exact slope
    solver's ``K = A_11^{-1} A_12``).

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    callable
    """
    return block_rows_lmul_parallel if parallel else block_rows_lmul_serial


def get_dense_kernels(parallel=False):
    """The serial or parallel ``(dense_matmat, dense_tmatmat)`` kernels.

    Parameters
    ----------
    parallel : bool

    Returns
    -------
    tuple of callable
    """
    if parallel:
        return dense_matmat_parallel, dense_tmatmat_parallel
    return dense_matmat_serial, dense_tmatmat_serial


def get_kernel(name, parallel=False):
    """Return the serial or parallel compiled variant of a kernel.

    Parameters
    ----------
    name : str
        A key of :data:`KERNELS` (``"gather"``, ``"scatter"``, ``"cov_matvec"``, ...).
    parallel : bool, optional
        Whether to return the ``prange`` variant.

    Returns
    -------
    callable

    Examples
    --------
    >>> codes = np.array([[0, 1, 1]], dtype=np.int32)
    >>> offsets = np.array([0, 2], dtype=np.int64)
    >>> out = np.empty(2)
    >>> get_kernel("scatter")(codes, offsets, np.array([1.0, 2.0, 3.0]), np.empty((1, 2)), out)
    >>> out
    array([1., 5.])
    """
    try:
        pair = KERNELS[name]
    except KeyError:
        msg = f"no kernel named '{name}'; kernels are {sorted(KERNELS)}"
        raise UnknownNameError(msg) from None
    return pair[1] if parallel else pair[0]
