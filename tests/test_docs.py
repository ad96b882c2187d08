"""Documentation tests.

- The quick start's examples run (``doctest`` on ``docs/quickstart.rst``).
- The reference pages cover the package: every public module in the API reference, every
  option of the ``lmmops`` command and every field of the ``--json`` contract in
  ``docs/cli.rst`` (exactly the keys of :meth:`lmmops.LMMResult.to_dict`).
- The Sphinx build succeeds, and the hand-written pages build without warnings.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmmops
from lmmops.cli import build_parser
from lmmops.data.simulate import simulate_crossed

DOCS = Path(__file__).resolve().parents[1] / "docs"
OWN_PAGES = ["index", "quickstart", "theory", "cli", "api", "changelog"]


def _conf():
    """docs/conf.py as a module (it needs only lmmops, not Sphinx)."""
    spec = importlib.util.spec_from_file_location("_lmmops_docs_conf", DOCS / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def _cli_text():
    return (DOCS / "cli.rst").read_text(encoding="utf-8")


# ------------------------------------------------------------------------- quick start
def test_quickstart_doctests():
    result = doctest.testfile(
        str(DOCS / "quickstart.rst"),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )
    assert result.attempted >= 40, "the quick start lost its examples"
    assert result.failed == 0, f"{result.failed} quick-start examples failed (see stdout)"


# ------------------------------------------------------------------------- the CLI page
def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_cli_page_documents_every_subcommand_and_option():
    text = _cli_text()
    parser, subcommands = _subcommands()
    assert set(subcommands) == {"fit", "demo", "simulate"}
    assert "``lmmops --version``" in text
    for name, sp in subcommands.items():
        assert f"``lmmops {name}``" in text, f"subcommand {name} is not documented"
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                for opt in action.option_strings:
                    assert f"``{opt}" in text, f"lmmops {name} {opt} is not documented"
            else:
                assert f"``{action.dest.upper()}``" in text, (
                    f"argument {action.dest} of lmmops {name} is not documented"
                )


def _documented_json_fields():
    """The field names of the --json contract section of cli.rst."""
    section = _cli_text().split(".. _json-contract:")[1].split("An ML fit")[0]
    section = section.split("The fields:")[1]
    fields = []
    for line in section.splitlines():
        if line.startswith("``"):
            fields += re.findall(r"``(\w+)``", line.split(" (")[0])
    return fields


def _documented_json_example():
    text = _cli_text()
    block = text.split(".. code-block:: json")[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    return json.loads("\n".join(lines))


@pytest.fixture(scope="module")
def fits():
    df = simulate_crossed(400, [12, 6], zipf=[0.5, 0.0], seed=3)
    formula = "y ~ 1 + (1|g1) + (1|g2)"
    return {m: lmmops.fit(formula, df, method=m).to_dict() for m in ("REML", "ML")}


def test_json_contract_matches_to_dict(fits):
    documented = _documented_json_fields()
    assert len(documented) == len(set(documented)), "a field is documented twice"
    expected = set(fits["REML"]) | set(fits["ML"])
    assert set(fits["REML"]) ^ set(fits["ML"]) == {"reml_criterion", "deviance"}
    assert set(documented) == expected, (
        "docs/cli.rst's --json field list is out of date with LMMResult.to_dict: "
        f"undocumented {sorted(expected - set(documented))}, "
        f"no longer produced {sorted(set(documented) - expected)}"
    )
    # the fields the contract promises at least
    required = {"formula", "method", "solver", "n_obs", "n_levels", "loglik", "aic", "bic",
                "fixef", "fixef_se", "variances", "converged", "iterations", "elapsed_s"}
    assert required <= set(documented)


def test_json_example_is_valid_and_current(fits):
    example = _documented_json_example()
    assert set(example) == set(fits["ML"]), "the JSON example in docs/cli.rst is out of date"
    assert example["method"] == "ML"
    assert set(example["variances"]) == set(example["n_levels"]) | {"Residual"}
    assert np.isclose(example["deviance"], -2 * example["loglik"])


# ------------------------------------------------------------------------- API and index
def test_api_reference_covers_every_public_module():
    conf = _conf()
    text = conf.expand_api((DOCS / "api.rst").read_text(encoding="utf-8"))
    for marker in (conf.MODULE_TABLE_MARKER, conf.TOP_LEVEL_MARKER,
                   conf.OTHER_MODULES_MARKER):
        assert marker not in text
    modules = conf.public_modules()
    for name in ("data.design", "linalg.operators", "linalg.kernels", "linalg.krylov",
                 "linalg.solve", "linalg.preconditioners", "estimation.direct", "model",
                 "data.formula", "data.simulate", "paper.spectral", "analysis.inference",
                 "cli", "errors", "testing"):
        assert f"lmmops.{name}" in modules
    for module in modules:
        importlib.import_module(module)  # autodoc must be able to import it
        assert f".. automodule:: {module}\n" in text
    for name in lmmops.__all__:
        if name != "__version__":
            assert re.search(rf"^   ~[\w.]+\.{name}$", text, flags=re.MULTILINE), name


def test_index_links_optional_documents_only_when_present(tmp_path):
    conf = _conf()
    text = (DOCS / "index.rst").read_text(encoding="utf-8")
    assert conf.OPTIONAL_MARKER in text
    assert "theory_inverse" not in conf.expand_index(text, tmp_path)
    (tmp_path / "theory_inverse.rst").write_text("Inverse\n=======\n")
    (tmp_path / "studies.rst").write_text("Studies\n=======\n")
    expanded = conf.expand_index(text, tmp_path)
    assert "   theory_inverse\n" in expanded
    assert "   studies\n" in expanded
    assert conf.OPTIONAL_MARKER not in expanded


def test_conf_settings():
    conf = _conf()
    assert conf.project == "lmmops"
    assert conf.version == lmmops.__version__
    assert conf.numpydoc_show_class_members is False
    assert conf.html_theme == "alabaster"
    for ext in ("sphinx.ext.autodoc", "sphinx.ext.autosummary", "numpydoc",
                "sphinx.ext.mathjax", "sphinx.ext.viewcode"):
        assert ext in conf.extensions


# ------------------------------------------------------------------------- the build
def test_sphinx_build(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    from sphinx.cmd.build import build_main

    out = tmp_path / "html"
    warnings_file = tmp_path / "warnings.txt"
    rc = build_main(["-b", "html", "-q", "-d", str(tmp_path / "doctrees"),
                     "-w", str(warnings_file), str(DOCS), str(out)])
    warnings = warnings_file.read_text(encoding="utf-8") if warnings_file.exists() else ""
    assert rc == 0, warnings
    assert "ERROR" not in warnings, warnings
    own = [line for line in warnings.splitlines()
           if any(f"docs/{page}.rst" in line for page in OWN_PAGES)]
    assert not own, "\n".join(own)
    for page in OWN_PAGES:
        assert (out / f"{page}.html").exists()
    modindex = (out / "py-modindex.html").read_text(encoding="utf-8")
    for module in _conf().public_modules():
        assert f">{module}<" in modindex, module


@pytest.mark.parametrize("script", sorted((Path(__file__).parents[1] / "docs" / "studies")
                                          .glob("*.py")), ids=lambda p: p.name)
def test_study_scripts_import_and_parse_arguments(script):
    """Every study script still imports against the package (a renamed module or function
    fails here, not when someone reruns the study) and answers --help."""
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=300, cwd=script.parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout
