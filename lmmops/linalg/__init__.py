"""Matrix-free linear algebra: Numba kernels, the operators V and its level-space forms,
Krylov solvers, stochastic trace estimators, preconditioners and the ``solve_V`` driver.

See ``docs/architecture.rst`` for the layers and ``docs/embedding.rst`` for use from
other codes (``scipy.sparse.linalg.cg(V, b, M=P)``).
"""
