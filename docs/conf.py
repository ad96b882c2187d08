"""Sphinx configuration for the lmmops documentation.

Build with ``sphinx-build -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import os
import pkgutil
import re
import sys

DOCS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS_DIR))  # build from a checkout without installing

import lmmops  # noqa: E402

# -- Project -----------------------------------------------------------------------------
project = "lmmops"
author = "the lmmops developers"
copyright = "the lmmops developers"
version = lmmops.__version__
release = lmmops.__version__

# -- General -----------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "literal"  # `x` in docstrings renders as code, never as a broken reference

# autosummary only draws summary tables here (api.rst uses no :toctree:), so nothing is
# ever written into the source tree.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

# -- HTML --------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"lmmops {release}"
html_theme_options = {
    "description": "Linear mixed models with crossed random effects at scale",
    "fixed_sidebar": True,
}

# -- Generated parts of the index and the API reference --------------------------------
# Pages that other parts of the project add when they are ready. Each is linked from the
# index only when its source file exists, so a missing page never breaks the build.
OPTIONAL_DOCS = [
    "tutorial",
    "embedding",
    "theory_inverse",
    "studies",
]
OPTIONAL_MARKER = ".. optional-documents"
# api.rst documents the known modules by hand; these markers are filled in from the
# package itself, so a new public module or top-level name is never left out.
MODULE_TABLE_MARKER = ".. public-module-table"
TOP_LEVEL_MARKER = ".. top-level-names"
OTHER_MODULES_MARKER = ".. other-public-modules"


def optional_docs(docs_dir=DOCS_DIR):
    """The names in :data:`OPTIONAL_DOCS` whose ``.rst`` source exists in ``docs_dir``."""
    return [name for name in OPTIONAL_DOCS
            if os.path.exists(os.path.join(docs_dir, name + ".rst"))]


def expand_index(text, docs_dir=DOCS_DIR):
    """Replace the optional-documents marker of index.rst by a toctree of existing pages."""
    present = optional_docs(docs_dir)
    block = ""
    if present:
        block = ".. toctree::\n   :maxdepth: 2\n   :caption: Further reading\n\n" + "".join(
            f"   {name}\n" for name in present
        )
    return text.replace(OPTIONAL_MARKER, block)


def public_modules():
    """``lmmops`` and its modules and subpackages, at any depth, whose names do not start
    with an underscore (in the order of the layers' package walk)."""
    subs = [m.name for m in pkgutil.walk_packages(lmmops.__path__, prefix="lmmops.")
            if not any(part.startswith("_") for part in m.name.split("."))]
    return ["lmmops"] + subs


def _autosummary(entries):
    return ".. autosummary::\n   :nosignatures:\n\n" + "".join(f"   {e}\n" for e in entries)


def expand_api(text):
    """Fill in the module table, the top-level names and any undocumented module."""
    documented = re.findall(r"^\.\. automodule:: (\S+)", text, flags=re.MULTILINE)
    modules = public_modules()
    missing = [m for m in modules if m not in documented]
    order = [m for m in documented if m in modules] + missing
    text = text.replace(MODULE_TABLE_MARKER, _autosummary(order))
    top = []
    for name in lmmops.__all__:
        obj = getattr(lmmops, name)
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("lmmops.") and hasattr(obj, "__qualname__"):
            top.append(f"~{module[len('lmmops.'):]}.{obj.__qualname__}")
    text = text.replace(TOP_LEVEL_MARKER, _autosummary(top))
    sections = []
    for m in missing:
        head = f"``{m}``"
        sections.append(f"{head}\n{'-' * len(head)}\n\n.. automodule:: {m}\n   :members:\n")
    return text.replace(OTHER_MODULES_MARKER, "\n".join(sections))


def _source_read(app, docname, source):
    if docname == root_doc:
        source[0] = expand_index(source[0], str(app.srcdir))
    elif docname == "api":
        source[0] = expand_api(source[0])


def _always_reread(app, env, added, changed, removed):
    # the generated parts depend on files other than their own sources
    return [root_doc, "api"]


def setup(app):
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _always_reread)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
