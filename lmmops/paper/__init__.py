"""The seed paper's constructions for unbalanced crossed designs (Lyu, Sisson and Welsh):
the balanced spectrum, the approximate inverses D1 and D2, the asymptotic inverse and the
exact low-rank correction.

These are the reference implementations the tests compare against and the source of the
spectral and low-rank preconditioners (:mod:`lmmops.linalg.preconditioners`). The
mathematics is in ``docs/theory_inverse.rst``.
"""
