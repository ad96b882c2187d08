"""Benchmarks of :mod:`lmmops.linalg.operators`: the covariance operator V and its kernels.

``V = sigma2_e I + sum_k sigma2_k Z_k Z_k'`` on a synthetic crossed design with
Zipf-skewed levels (see :mod:`benchmarks.common`), at n = 10^6 and 10^7, K = 2 and 3,
with the serial and the parallel kernels. ``time_numpy_copy`` copies the same number
of bytes a matvec must read (x and the codes: ``n * (8 + 4 K)`` bytes) with
``np.copyto``, so the matvec/copy ratio can be read off one run (the acceptance
target is a ratio of at most 3 at n = 10^7, K = 2).
"""

import numpy as np

from .common import TINY_N, crossed_codes, pick, safe_import

with safe_import():
    from lmmops.data.design import CrossedDesign
    from lmmops.linalg import kernels
    from lmmops.linalg.operators import CovarianceOperator

SIZES = pick([10**6, 10**7], [TINY_N])
FACTORS = [2, 3]
PARALLEL = [False, True]


def _codes_cache():
    # Built once per benchmark class and run (asv pickles it between processes). The
    # K = 2 design is the first two rows of the K = 3 one.
    return {n: crossed_codes(n, 3) for n in SIZES}


def _operator(codes, K, parallel):
    try:
        design = CrossedDesign.from_codes(codes[:K])
        sigma2 = [0.5, 0.25, 0.125][:K]
        return CovarianceOperator(design, 1.0, sigma2, parallel=parallel)
    except NameError:  # lmmops.linalg.operators missing at this commit
        raise NotImplementedError("lmmops.linalg.operators is not available") from None


class CovarianceMatvec:
    """``V @ x`` for one vector, against a numpy copy of the same number of bytes."""

    params = [SIZES, FACTORS, PARALLEL]
    param_names = ["n", "K", "parallel"]
    timeout = 600

    def setup_cache(self):
        return _codes_cache()

    setup_cache.timeout = 600

    def setup(self, cache, n, K, parallel):
        self.V = _operator(cache[n], K, parallel)
        self.x = np.random.default_rng(0).standard_normal(n)
        design = self.V.design
        self.kernel = kernels.get_kernel("cov_matvec", parallel)
        self.codes = design.codes
        self.offsets = design.offsets
        self.sigma2 = np.asarray(self.V.sigma2, dtype=np.float64)
        self.work = np.empty((kernels.n_blocks(parallel), design.q))
        self.out = np.empty(n)
        nbytes = n * (8 + 4 * K)
        self.src = np.ones(nbytes, dtype=np.uint8)
        self.dst = np.empty_like(self.src)
        # warm up: compile or load the kernels, touch every page
        self.V @ self.x
        self.time_kernel_matvec(cache, n, K, parallel)
        np.copyto(self.dst, self.src)

    def time_matvec(self, cache, n, K, parallel):
        """Through the LinearOperator (allocates the result)."""
        self.V @ self.x

    def time_kernel_matvec(self, cache, n, K, parallel):
        """The fused kernel alone, writing into a preallocated ``out``."""
        self.kernel(self.codes, self.offsets, self.x, 1.0, self.sigma2, self.work, self.out)

    def time_numpy_copy(self, cache, n, K, parallel):
        """Baseline: ``np.copyto`` of ``n * (8 + 4 K)`` bytes (x plus the int32 codes)."""
        np.copyto(self.dst, self.src)


class CovarianceMatmat:
    """``V @ X`` for a block of m = 8 vectors (trace probes, block CG)."""

    params = [SIZES, FACTORS, PARALLEL]
    param_names = ["n", "K", "parallel"]
    timeout = 900
    m = 8

    def setup_cache(self):
        return _codes_cache()

    setup_cache.timeout = 600

    def setup(self, cache, n, K, parallel):
        self.V = _operator(cache[n], K, parallel)
        self.X = np.random.default_rng(1).standard_normal((n, self.m))
        self.V @ self.X  # warm up

    def time_matmat(self, cache, n, K, parallel):
        self.V @ self.X


class CovarianceBuild:
    """Peak memory of building the design and the operator at the largest size."""

    params = [pick([10**7], [TINY_N]), FACTORS]
    param_names = ["n", "K"]
    timeout = 600

    def setup(self, n, K):
        # The peak includes these codes (4 K n bytes) held by the benchmark itself.
        self.codes = crossed_codes(n, K)
        _operator(crossed_codes(TINY_N, K), K, None)  # import and warm up

    def peakmem_build_operator(self, n, K):
        _operator(self.codes, K, None)

    def peakmem_build_and_matvec(self, n, K):
        V = _operator(self.codes, K, None)
        V @ np.ones(n)
