"""Deprecated flat module paths of lmmops 0.1 (``lmmops.design``, ``lmmops.solvers``, ...).

Version 0.2 arranges the package in layers (``docs/architecture.rst``). Code written
against 0.1 keeps working for one release: ``import lmmops.solvers`` or
``from lmmops.direct import fit_direct`` gives the module at its new home, with a
:class:`DeprecationWarning` naming it. Where a 0.1 module was split (``solvers`` into
:mod:`lmmops.linalg.krylov` and :mod:`lmmops.linalg.solve`), the old name is a module whose
attributes are looked up in each new home in turn.

Only the old names are served here; nothing in the package imports through them.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: old module (relative to ``lmmops``) -> its new homes, searched in order
MOVED = {
    "formula": ("lmmops.data.formula",),
    "design": ("lmmops.data.design",),
    "simulate": ("lmmops.data.simulate",),
    "conditioning": ("lmmops.data.conditioning",),
    "kernels": ("lmmops.linalg.kernels",),
    "operators": ("lmmops.linalg.operators",),
    "trace": ("lmmops.linalg.trace",),
    "solvers": ("lmmops.linalg.krylov", "lmmops.linalg.solve", "lmmops.linalg.operators",
                "lmmops.linalg.preconditioners"),
    "preconditioners": ("lmmops.linalg.preconditioners",),
    "spectral": ("lmmops.paper.spectral",),
    "lowrank": ("lmmops.paper.lowrank",),
    "direct": ("lmmops.estimation.direct",),
    "reml": ("lmmops.estimation.iterative",),
    "mme": ("lmmops.estimation.mme",),
    "stochastic": ("lmmops.estimation.stochastic",),
    "inference": ("lmmops.analysis.inference",),
    "outliers": ("lmmops.analysis.outliers",),
    "predict": ("lmmops.analysis.predict",),
    "plots": ("lmmops.analysis.plots",),
    "compare": ("lmmops.analysis.compare",),
    "oneway": ("lmmops.analysis.oneway",),
    "_guard": ("lmmops.guard",),
}


def _warn(old, homes):
    warnings.warn(f"lmmops.{old} is deprecated since lmmops 0.2 and will be removed in 0.3; "
                  f"use {' or '.join(homes)}", DeprecationWarning, stacklevel=3)


class _SplitModule(types.ModuleType):
    """An old module whose contents now live in several modules."""

    def __init__(self, name, homes):
        super().__init__(name, f"Deprecated alias of {', '.join(homes)}.")
        self._homes = homes

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __dir__(self):
        names = set()
        for home in self._homes:
            names.update(n for n in dir(importlib.import_module(home))
                         if not n.startswith("_"))
        return sorted(names)


class _Loader(importlib.abc.Loader):
    def __init__(self, old):
        self.old = old

    def create_module(self, spec):
        homes = MOVED[self.old]
        _warn(self.old, homes)
        if len(homes) == 1:
            return importlib.import_module(homes[0])
        return _SplitModule(spec.name, homes)

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """Serves ``lmmops.<old>`` for the names in :data:`MOVED`."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.rpartition(".")
        if prefix != "lmmops" or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(old))


_FINDER = _Finder()


def install():
    """Put the finder on ``sys.meta_path`` (once)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def module_getattr(name):
    """``lmmops.<old>`` as an attribute (``lmmops.oneway`` without importing it)."""
    if name in MOVED:
        return importlib.import_module(f"lmmops.{name}")
    raise AttributeError(f"module 'lmmops' has no attribute {name!r}")
