r"""The level-space Gram matrix kept on the workers: :class:`DistributedGram`.

When the cell table itself is too big for one machine (nnz of ``Z'WZ`` in the billions),
it stays on the workers as ``B`` persisted row blocks ``A_b = (Z'WZ)[rows_b, :]``, built
there from the partitions (each partition's cell tables are cut into the same row
blocks and the blocks are summed by a tree reduction per block; the client holds only
their futures). A product ``A U`` scatters the block vector ``U`` (``q x m``) to every
worker once, maps ``A_b U`` over the blocks where they live and gathers the ``q x m``
result: per product ``8 q m (W + 1)`` bytes move for ``W`` workers (a block vector below
:data:`INLINE_BYTES` travels inside the ``B`` task messages instead: ``8 q m (B + 1)``),
independent of ``n`` and of nnz. Lost blocks (a worker that dies) are recomputed by the
scheduler from their graph.

:class:`DistributedGram` is a ``scipy.sparse.linalg.LinearOperator``, so
``scipy.sparse.linalg.cg``, :func:`lmmops.linalg.krylov.cg` and the matrix-free fit
(:class:`~lmmops.estimation.iterative.IterativeObjective`, ``gram=``) use it unchanged.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from lmmops.data.statistics import SufficientStatistics
from lmmops.distributed.frame import prepare
from lmmops.distributed.passes import conditioned_rows
from lmmops.distributed.reduction import tree_reduce
from lmmops.errors import ArgumentError

__all__ = ["INLINE_BYTES", "DistributedGram", "block_rows"]

#: a block vector up to this size travels inside each block's task message; a larger one
#: is scattered once to every worker (``client.scatter(broadcast=True)``)
INLINE_BYTES = 1 << 20


def block_rows(q, n_blocks):
    """Boundaries of ``n_blocks`` contiguous row blocks of ``0 .. q``."""
    n_blocks = max(1, min(int(n_blocks), q))
    return np.linspace(0, q, n_blocks + 1).round().astype(np.int64)


def _partition_blocks(part, i, plan, bounds):
    """One partition's ``Z'WZ`` cut into the row blocks (CSR each)."""
    a = prepare(part, plan, i)
    Xc, yc = conditioned_rows(a, plan)
    q = [len(lv) for lv in plan.levels]
    G = SufficientStatistics.from_codes(a["codes"], q, Xc[:, :0], yc, a["w"]).gram()
    return [G[bounds[b]:bounds[b + 1]] for b in range(len(bounds) - 1)]


def _pick(blocks, b):
    return blocks[b]


def _sum_blocks(parts):
    out = parts[0].copy()
    for m in parts[1:]:
        out = out + m
    out = sp.csr_matrix(out)
    out.sum_duplicates()
    out.sort_indices()
    return out


def _block_product(block, U):
    return np.asarray(block @ U)


class DistributedGram(LinearOperator):
    """``Z'WZ`` (``q x q``) as row blocks persisted on a Dask cluster.

    Build it with :meth:`from_model`. Each product scatters the block vector once and
    gathers the result; :attr:`bytes_moved` and :attr:`products` count them.

    Parameters
    ----------
    client : distributed.Client
    blocks : list of distributed.Future
        The persisted row blocks (CSR), in order.
    bounds : ndarray of int
        Row boundaries of the blocks.
    q : int
    nnz : int
    """

    def __init__(self, client, blocks, bounds, q, nnz):
        super().__init__(dtype=np.float64, shape=(q, q))
        self.client = client
        self.blocks = list(blocks)
        self.bounds = np.asarray(bounds)
        self.nnz = int(nnz)
        self.products = 0
        self.bytes_moved = 0
        self.workers = len(client.scheduler_info().get("workers", {})) or 1

    @classmethod
    def from_model(cls, model, n_blocks=None, client=None):
        """The Gram matrix of a :class:`~lmmops.distributed.DaskLMM` (random
        intercepts), built and kept on the workers (one more pass over the partitions).

        Parameters
        ----------
        model : DaskLMM
        n_blocks : int, optional
            Row blocks; default twice the number of workers.
        client : distributed.Client, optional
            Default the current client.

        Returns
        -------
        DistributedGram
        """
        import dask
        import distributed

        if model.has_slopes:
            raise ArgumentError("DistributedGram is for random-intercept models (its "
                                "products are those of the intercepts' iterative solver)")
        client = client or distributed.get_client()
        workers = len(client.scheduler_info().get("workers", {})) or 1
        q = model.design.q
        bounds = block_rows(q, n_blocks or 2 * workers)
        plan = dask.delayed(model.plan, traverse=False)
        cut = [dask.delayed(_partition_blocks, pure=True)(p, i, plan, bounds)
               for i, p in enumerate(model.ddf.to_delayed())]
        roots = [tree_reduce([dask.delayed(_pick, pure=True)(c, b) for c in cut], _sum_blocks)
                 for b in range(len(bounds) - 1)]
        futures = client.compute(roots)  # persisted where they are computed
        nnz = sum(client.gather(client.map(lambda m: m.nnz, futures, pure=False)))
        return cls(client, futures, bounds, q, nnz)

    def _matmat(self, U):
        U = np.ascontiguousarray(np.asarray(U, dtype=np.float64))
        if U.ndim == 1:
            U = U[:, None]
        if U.nbytes <= INLINE_BYTES:  # small: inside the task messages, one per block
            arg, sent = U, U.nbytes * len(self.blocks)
        else:  # large: scattered once to every worker
            arg = self.client.scatter(U, broadcast=True, hash=False)
            sent = U.nbytes * self.workers
        futs = [self.client.submit(_block_product, blk, arg, pure=False)
                for blk in self.blocks]
        out = np.vstack(self.client.gather(futs))
        self.products += 1
        self.bytes_moved += sent + out.nbytes
        return out

    def _matvec(self, x):
        return self._matmat(np.asarray(x).reshape(-1, 1))[:, 0]

    def _rmatvec(self, x):  # symmetric
        return self._matvec(x)

    def matmat(self, X):
        """``Z'WZ X`` for a ``(q, m)`` block (one scatter, one gather)."""
        return self._matmat(X)

    def __repr__(self):
        return (f"<DistributedGram q={self.shape[0]} nnz={self.nnz} "
                f"blocks={len(self.blocks)} products={self.products}>")
