"""Estimation: the profiled REML/ML criterion, its exact (direct) and matrix-free
(iterative) evaluations, the optimisers and the mixed-model equations.

See ``docs/architecture.rst``.
"""
