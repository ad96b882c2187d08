"""lme4 formulas: split ``y ~ fixed + (1|g) + ...`` into a response, a fixed part and random terms.

The fixed part goes through formulaic with R's default treatment contrasts, and the
coefficient names are rewritten to lme4's (``service[T.1]`` becomes ``service1``,
``Intercept`` becomes ``(Intercept)``). Random terms ``(effects | group)`` follow lme4:

- ``(1|g)``: a random intercept per level of ``g``; ``(1|a:b)``: per observed
  combination of ``a`` and ``b``; ``(e|a/b)``: nesting, ``(e|b:a) + (e|a)``, with
  lme4's names (``b:a``; ``c:(b:a)`` for ``a/b/c``);
- ``(x|g)``, ``(1 + x|g)``, ``(1 + x + z|g)``, ``(1 + A*B|s)``, ``(1 + f|g)`` for a
  factor ``f``: correlated random intercept and slopes, the columns of the effects'
  model matrix (built as the fixed part's, with treatment contrasts);
- ``(0 + x|g)``: a slope without an intercept; ``(0 + f|g)``: one column per level of f;
- ``(x||g)``: uncorrelated terms, lme4's ``expandDoubleVerts``: ``(1|g) + (0 + x|g)``.

:func:`parse_formula` expands them into :class:`RandomTermSpec` entries without looking
at data; :func:`lmmops.data.terms.build_terms` turns those into
:class:`~lmmops.data.terms.RandomEffectsTerm` objects for a data set.

Formula text never runs code. A formula is parsed here, not by Python, and everything
in it must be on an allow-list before anything is evaluated:

- the formula operators ``+ - * / : ** ^ %in%`` and parentheses, data columns (R names
  such as ``Sepal.Length`` and backtick-quoted names such as ```a b```), numbers;
- inside a call or a ``{...}`` block: data columns, numbers, ``+ - * / // % **``,
  comparisons, ``& | ~``, and calls of :data:`ALLOWED_FUNCTIONS` (``I``, ``C`` and
  ``factor``, ``log``, ``log1p``, ``exp``, ``sqrt``, ``abs``, ``scale``, ``center``,
  ``poly``, ``bs``, ``np.log``-style numpy ufuncs, and in ``C(x, ...)`` the contrasts
  ``Treatment('b')``, ``Sum``, ``Helmert``, ``Poly``, ``Diff``, ``contr.treatment`` ...,
  with ``levels=[...]`` of literals);
- no builtins, no other attribute access, no subscripts, strings only where ``C()``
  takes a level or ``bs`` an option, no lambdas, comprehensions, starred or keyword
  arguments outside the allow-list, no names starting with ``__``.

Anything else raises :class:`~lmmops.errors.FormulaError` naming the offending token and
its position, before evaluation. formulaic then evaluates the checked formula in a
namespace holding only the allowed transforms, in which every builtin name is shadowed
by a stub that refuses to run, and its own parse of the formula is checked against the
same allow-list: the refusal does not depend on how formulaic tokenises a string.
Error messages carry no terminal escape sequences.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import formulaic
import numpy as np
import pandas as pd
from formulaic.materializers import PandasMaterializer
from formulaic.transforms import TRANSFORMS as _FORMULAIC_TRANSFORMS
from interface_meta import override

from lmmops.data.conditioning import orthogonalise
from lmmops.errors import FormulaError, RankDeficientError, RankDeficientWarning

__all__ = [
    "ALLOWED_FUNCTIONS",
    "ParsedFormula",
    "RandomTermSpec",
    "RankDeficientWarning",
    "check_full_rank",
    "fixed_effects_matrix",
    "grouping_columns",
    "lme4_names",
    "parse_formula",
    "rank_columns",
    "rank_message",
    "response_vector",
    "varcorr_names",
]


@dataclass(frozen=True)
class ParsedFormula:
    """A parsed lme4 formula.

    Attributes
    ----------
    formula : str
        The formula as given.
    response : str
        Left-hand side.
    fixed : str
        Right-hand side without the random terms (``"1"`` if nothing is left).
    random : tuple of str
        Grouping factors, unique, in the order they first appear in
        ``random_terms`` (``"s"``, ``"a:b"``; ``(1|a/b)`` gives ``"b:a"`` and ``"a"``,
        lme4's names and order); one factor of the design each
        (:func:`grouping_columns` gives a name's columns).
    random_terms : tuple of RandomTermSpec
        The random-effects terms after lme4's expansion of ``/`` and ``||``, in
        ``findbars`` order (before lme4's reordering by number of levels, which
        :func:`lmmops.data.terms.build_terms` does).
    """

    formula: str
    response: str
    fixed: str
    random: tuple
    random_terms: tuple = ()


@dataclass(frozen=True)
class RandomTermSpec:
    """One random-effects term ``(effects | group)`` as written, after expansion.

    Attributes
    ----------
    effects : str
        The effects formula on the left of the bar (``"1"``, ``"1 + Days"``,
        ``"0 + Days"``), checked against the allow-list.
    group : str
        The grouping factor (``"Subject"``, ``"a:b"``).
    correlated : bool
        False for a term that came from ``||`` (then it has one term label, and is
        uncorrelated with the other terms of that ``||``).

    Examples
    --------
    >>> t = RandomTermSpec("1 + Days", "Subject", True)
    >>> str(t), t.is_intercept
    ('(1 + Days | Subject)', False)
    """

    effects: str
    group: str
    correlated: bool = True

    def __str__(self):
        return f"({self.effects} | {self.group})"

    @property
    def is_intercept(self):
        """Whether the term is a scalar random intercept ``(1 | group)``."""
        where = _Where("random-term effects", self.effects)
        return _intercept_only(_Parser(self.effects, 0, where).parse())


# ---------------------------------------------------------------- messages
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def _printable(text):
    """``text`` with every non-printable character written as an escape (``\\x1b``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _clean(msg):
    """One printable line: no ANSI colour codes, formulaic's markers or control characters."""
    msg = _ANSI.sub("", str(msg)).replace("\u29db", "").replace("\u29da", "")
    return _printable(" ".join(msg.split()))


def _fail(msg):
    return FormulaError(_clean(msg))


def _short(text, width=60):
    text = str(text)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- the allow-list
# Argument kinds: a column-valued expression, one literal (number, bool or None),
# a string, one level (a number or a string), a list of levels, a list of numbers,
# a contrast.
_VALUE, _LITERAL, _STRING, _LEVEL, _LEVELS, _NUMBERS, _CONTRAST_ARG = (
    "value", "literal", "string", "level", "levels", "numbers", "contrast")
_NUMPY_UNARY = ("abs", "absolute", "arccos", "arccosh", "arcsin", "arcsinh", "arctan",
                "arctanh", "cbrt", "ceil", "cos", "cosh", "exp", "exp2", "expm1", "fabs",
                "floor", "log", "log10", "log1p", "log2", "rint", "sign", "sin", "sinh",
                "sqrt", "square", "tan", "tanh", "trunc")
_NUMPY_BINARY = ("arctan2", "fmax", "fmin", "hypot", "maximum", "minimum", "power")
_NUMPY_CONSTANTS = ("e", "pi")
_BARE_UNARY = ("abs", "exp", "exp2", "expm1", "log", "log10", "log1p", "log2", "sqrt")
_C_ARGS = ((_VALUE, _CONTRAST_ARG),
           {"contrasts": _CONTRAST_ARG, "levels": _LEVELS, "spans_intercept": _LITERAL})
_FUNCTIONS = {  # name -> (kinds of the positional arguments, kinds of the keywords)
    "I": ((_VALUE,), {}),
    "C": _C_ARGS,
    "factor": _C_ARGS,
    "scale": ((_VALUE, _LITERAL, _LITERAL, _LITERAL),
              {"center": _LITERAL, "scale": _LITERAL, "ddof": _LITERAL}),
    "center": ((_VALUE,), {}),
    "poly": ((_VALUE, _LITERAL, _LITERAL), {"degree": _LITERAL, "raw": _LITERAL}),
    "bs": ((_VALUE,), {"df": _LITERAL, "knots": _NUMBERS, "degree": _LITERAL,
                       "include_intercept": _LITERAL, "lower_bound": _LITERAL,
                       "upper_bound": _LITERAL, "extrapolation": _STRING}),
    **{f: ((_VALUE,), {}) for f in _BARE_UNARY},
}
for _m in ("np", "numpy"):
    _FUNCTIONS.update({f"{_m}.{f}": ((_VALUE,), {}) for f in _NUMPY_UNARY})
    _FUNCTIONS.update({f"{_m}.{f}": ((_VALUE, _VALUE), {}) for f in _NUMPY_BINARY})
    _FUNCTIONS[f"{_m}.round"] = ((_VALUE, _LITERAL), {"decimals": _LITERAL})
    _FUNCTIONS[f"{_m}.clip"] = ((_VALUE, _VALUE, _VALUE), {})
_CONSTANTS = {f"{m}.{c}" for m in ("np", "numpy") for c in _NUMPY_CONSTANTS}
_TREATMENT = ((_LEVEL,), {"base": _LEVEL})
_HELMERT = ((_LITERAL, _LITERAL), {"reverse": _LITERAL, "scale": _LITERAL})
_POLY = ((_NUMBERS,), {"scores": _NUMBERS})
_DIFF = ((_LITERAL,), {"backward": _LITERAL})
_CONTRASTS = {  # allowed as the contrasts of C(), called or not
    "Treatment": ((_LEVEL,), {"reference": _LEVEL}),
    "Sum": ((), {}), "Helmert": _HELMERT, "Poly": _POLY, "Diff": _DIFF,
    "contr.treatment": _TREATMENT, "contr.SAS": _TREATMENT, "contr.sum": ((), {}),
    "contr.helmert": _HELMERT, "contr.poly": _POLY, "contr.diff": _DIFF,
}
_NAMESPACES = ("np", "numpy", "contr")

#: Functions a formula may call (``np.f`` also as ``numpy.f``; contrasts inside ``C()``).
ALLOWED_FUNCTIONS = tuple(sorted(k for k in _FUNCTIONS if not k.startswith("numpy."))
                          + sorted(_CONTRASTS))
_ALLOWED_TEXT = ("a formula may use data columns, numbers, arithmetic operators and the "
                 "transforms of lmmops.data.formula.ALLOWED_FUNCTIONS (I, C or factor, log, "
                 "exp, sqrt, abs, scale, center, poly, bs, np.log-style ufuncs, ...)")


class _Refused:
    """Stands in for a builtin or an unlisted transform in the evaluation namespace."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise _fail(f"'{self.name}' is not allowed in a formula; {_ALLOWED_TEXT}")

    def __repr__(self):
        return f"<refused {self.name}>"


def _evaluation_context():
    t = _FORMULAIC_TRANSFORMS
    npns = types.SimpleNamespace(**{f: getattr(np, f) for f in
                                    _NUMPY_UNARY + _NUMPY_BINARY + ("round", "clip")},
                                 **{c: getattr(np, c) for c in _NUMPY_CONSTANTS})
    contr = types.SimpleNamespace(**{k.split(".")[1]: getattr(t["contr"], k.split(".")[1])
                                     for k in _CONTRASTS if k.startswith("contr.")})
    ctx = {name: _Refused(name) for name in t}
    ctx.update({f: getattr(np, f) for f in _BARE_UNARY})
    ctx.update({k: t[k] for k in ("I", "C", "scale", "center", "poly", "bs", "Treatment",
                                  "Sum", "Helmert", "Poly", "Diff")})
    ctx.update(factor=t["C"], np=npns, numpy=npns, contr=contr)
    return _Namespace(ctx)


class _Namespace(Mapping):
    """The allowed transforms, and a refusing stub for every builtin name.

    Builtins are looked up when asked for, so a name added to :mod:`builtins` later
    (``_`` by the interpreter's display hook, ``_`` by :func:`gettext.install`) is
    shadowed too.
    """

    def __init__(self, allowed):
        self._allowed = dict(allowed)

    def __getitem__(self, name):
        if name in self._allowed:
            return self._allowed[name]
        if isinstance(name, str) and hasattr(builtins, name):
            return _Refused(name)
        raise KeyError(name)  # protocol: a Mapping's __getitem__ raises KeyError

    def __iter__(self):
        return iter(set(self._allowed) | set(dir(builtins)))

    def __len__(self):
        return len(set(self._allowed) | set(dir(builtins)))


# The only namespace formulaic evaluates formula code in (besides the data's columns).
_CONTEXT = _evaluation_context()


# ---------------------------------------------------------------- where an error is
class _Where:
    """Names the formula text being checked, for messages."""

    def __init__(self, what, text, data=None):
        self.text = text
        self.label = f"{what} '{_short(text, 200)}'"
        self.columns = None if data is None else ", ".join(map(str, data.columns))

    def error(self, msg, pos=None):
        at = "" if pos is None else f" at character {pos + 1}"
        return _fail(f"{self.label}: {msg}{at}")

    def refuse(self, what, token, pos=None, hint=""):
        at = "" if pos is None else f" at character {pos + 1}"
        token = _short(token)
        shown = f'"{token}"' if "'" in token else f"'{token}'"
        return _fail(f"{self.label}: {what} {shown}{at} is not allowed{hint}; {_ALLOWED_TEXT}")


def _is_dunder(name):
    return any(part.startswith("__") for part in str(name).split("."))


# ---------------------------------------------------------------- Python inside calls
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
            ast.BitAnd, ast.BitOr)
_UNARY_OPS = (ast.USub, ast.UAdd, ast.Invert)
_CMP_OPS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_MAX_LITERAL_EXPONENT = 64
_KIND_NAMES = {
    ast.Lambda: "lambda", ast.ListComp: "list comprehension", ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension", ast.GeneratorExp: "generator expression",
    ast.Subscript: "subscript", ast.Starred: "starred argument", ast.Slice: "slice",
    ast.NamedExpr: "assignment expression", ast.IfExp: "conditional expression",
    ast.Dict: "dict", ast.Set: "set", ast.List: "list", ast.Tuple: "tuple",
    ast.JoinedStr: "f-string", ast.BoolOp: "'and'/'or'", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.Attribute: "attribute access",
    ast.Constant: "literal", ast.Call: "call", ast.Name: "name",
}


def _dotted(node):
    """``np.log`` for ``Attribute(Name('np'), 'log')``; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


# Strings and backtick-quoted names that formulaic, Python and this module all delimit
# the same way: no quotes, backslashes or backticks inside, no prefixes, no triple quotes.
_QUOTES = "'\"\\\\`"  # quotes, backslash and backtick (a regex class body)
_PLAIN_STRING = re.compile(f"'[^{_QUOTES}]*'|\"[^{_QUOTES}]*\"")
_PLAIN_QUOTED_NAME = re.compile(f"`[^{_QUOTES}]+`")


def _unquote(src):
    """Replace backtick-quoted names by placeholder identifiers.

    Returns the new text, a map placeholder -> quoted name, the list of (position in
    the new text, shift to the old position) at each replacement, and the offset of an
    unterminated quote or of a quoted name holding quotes or backslashes (else None).
    """
    out, aliases, shifts, i, k = [], {}, [], 0, 0
    while i < len(src):
        ch = src[i]
        j = _quote_end(src, i) if ch in "'\"`" else i + 1
        if j < 0:
            return "", {}, [], i
        if ch in "'\"":
            out.append(src[i:j])
            i = j
        elif ch == "`":
            if not _PLAIN_QUOTED_NAME.fullmatch(src, i, j):
                return "", {}, [], i
            while f"_q{k}_" in src:
                k += 1
            name = f"_q{k}_"
            aliases[name] = src[i + 1:j - 1]
            out.append(name)
            pos = sum(len(p) for p in out)
            shifts.append((pos, j - pos))
            k += 1
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out), aliases, shifts, None


def _quote_end(text, i):
    """Index after the string literal (or backtick name) opened at ``text[i]``."""
    q, k, n = text[i], i + 1, len(text)
    while k < n and text[k] != q:
        k += 2 if (text[k] == "\\" and q != "`") else 1
    return k + 1 if k < n else -1


class _PythonCheck:
    """Walk the ast of the Python code in a call or ``{...}`` block with the allow-list.

    ``columns`` is the set of data columns, or None to check the structure only (a name
    is then taken to be a column).
    """

    def __init__(self, where, columns):
        self.where = where
        self.columns = columns

    def run(self, src, pos=None):
        self.pos = pos
        sub, self.aliases, self.shifts, bad = _unquote(src)
        if bad is not None:
            raise self.where.error(f"unterminated quote or a backtick-quoted name with "
                                   f"quotes or backslashes in '{_short(src)}'",
                                   None if pos is None else pos + bad)
        body = sub.strip()
        self.lead = len(sub) - len(sub.lstrip())
        self.src = body
        try:
            with warnings.catch_warnings():  # e.g. "'int' object is not callable"
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(body, mode="eval")
        except SyntaxError as exc:
            off = max(0, min((exc.offset or 1) - 1, len(body)))
            raise self.where.error(f"cannot parse '{_short(src)}' ({exc.msg})",
                                   self._at(off)) from None
        except (RecursionError, MemoryError, ValueError):
            raise self.where.error(f"'{_short(src)}' is too deeply nested or too large",
                                   pos) from None
        try:
            self.visit(tree.body, _VALUE)
        except RecursionError:
            raise self.where.error(f"'{_short(src)}' is too deeply nested", pos) from None

    # positions and text of a node, in the formula's terms
    def _at(self, off):
        if self.pos is None:
            return None
        off += self.lead
        shift = 0
        for p, s in self.shifts:
            if p <= off:
                shift = s
        return self.pos + off + shift

    def _node_pos(self, node):
        line = self.src.encode("utf-8")[: node.col_offset]
        return self._at(len(line.decode("utf-8", "ignore")))

    def _text(self, node):
        seg = ast.get_source_segment(self.src, node) or type(node).__name__
        for alias, name in self.aliases.items():
            seg = seg.replace(alias, f"`{name}`")
        return seg

    def _refuse(self, what, node, hint=""):
        return self.where.refuse(what, self._text(node), self._node_pos(node), hint)

    # the walk
    def visit(self, node, kind):
        if kind == _VALUE:
            return self._value(node)
        if kind == _CONTRAST_ARG:
            return self._contrast(node)
        if kind in (_LEVELS, _NUMBERS):
            if not isinstance(node, (ast.List, ast.Tuple)):
                raise self._refuse(_KIND_NAMES.get(type(node), "expression"), node,
                                   " (a list of literals is expected here)")
            for elt in node.elts:
                self.visit(elt, _LEVEL if kind == _LEVELS else _LITERAL)
            return None
        return self._literal(node, kind)

    def _literal(self, node, kind):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            node = node.operand
            numeric_only = True
        else:
            numeric_only = False
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str):
                self._check_string(node)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = {_LITERAL: number or (not numeric_only and (v is None or isinstance(v, bool))),
                  _STRING: isinstance(v, str) and not numeric_only,
                  _LEVEL: number or (not numeric_only and isinstance(v, (str, bool)))}[kind]
            if ok:
                return None
        raise self._refuse(_KIND_NAMES.get(type(node), "expression"), node,
                           " (a literal is expected here)")

    def _check_string(self, node):
        seg = ast.get_source_segment(self.src, node) or ""
        if not _PLAIN_STRING.fullmatch(seg) or any(a in seg for a in self.aliases):
            raise self._refuse("string", node, " (a plain 'text' or \"text\" without "
                               "quotes, backslashes or backticks inside is expected here)")

    def _name(self, node):
        name = self.aliases.get(node.id)
        if name is None:
            name = node.id
            if _is_dunder(name):
                raise self._refuse("dunder name", node)
        if self.columns is None or name in self.columns:
            return
        if name in _FUNCTIONS or name in _CONTRASTS or name in _NAMESPACES:
            raise self.where.error(f"'{name}' is a function or namespace, not a data "
                                   f"column (call it, as {name}(x))", self._node_pos(node))
        raise _unknown_column(name, self.where, self.columns)

    def _value(self, node):
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return
            raise self._refuse("string or other literal" if isinstance(v, (str, bytes))
                               else "literal", node)
        if isinstance(node, ast.Name):
            return self._name(node)
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if _is_dunder(node.attr) or (dotted is not None and _is_dunder(dotted)):
                raise self.where.refuse("dunder name", node.attr, self._node_pos(node))
            if dotted in _CONSTANTS:
                return
            if dotted is None:  # report what is refused inside first
                self._value(node.value)
            raise self._refuse("attribute access", node)
        if isinstance(node, ast.Call):
            return self._call(node, _FUNCTIONS)
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BIN_OPS):
                raise self._refuse(f"operator {type(node.op).__name__}", node)
            if isinstance(node.op, ast.Pow):
                self._check_power(node)
            self._value(node.left)
            return self._value(node.right)
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARY_OPS):
                raise self._refuse(f"operator {type(node.op).__name__}", node)
            return self._value(node.operand)
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if not isinstance(op, _CMP_OPS):
                    raise self._refuse(f"comparison {type(op).__name__}", node)
            for sub in (node.left, *node.comparators):
                self._value(sub)
            return None
        raise self._refuse(_KIND_NAMES.get(type(node), f"{type(node).__name__} expression"),
                           node)

    def _contrast(self, node):
        target = node.func if isinstance(node, ast.Call) else node
        dotted = _dotted(target)
        if dotted is not None and _is_dunder(dotted):
            raise self._refuse("dunder name", target)
        if isinstance(node, ast.Call):
            return self._call(node, _CONTRASTS)
        if dotted in _CONTRASTS:
            return None
        raise self._refuse(_KIND_NAMES.get(type(node), "expression"), node,
                           " as a contrast (use Treatment('level'), Sum, Helmert, Poly, Diff "
                           "or contr.*)")

    def _call(self, node, table):
        dotted = _dotted(node.func)
        if dotted is None:  # report what is refused inside first
            self._value(node.func)
            raise self._refuse("call of a computed function", node)
        if _is_dunder(dotted):
            raise self._refuse("dunder name", node.func)
        if dotted not in table:
            raise self._refuse("call of", node.func)
        head = dotted.split(".")[0]
        if self.columns is not None and head in self.columns:
            raise self.where.error(f"data column '{head}' hides the transform {dotted}(); "
                                   "rename the column", self._node_pos(node))
        positional, keywords = table[dotted]
        if len(node.args) > len(positional):
            raise self._refuse("call", node, f" with {len(node.args)} positional arguments "
                               f"(at most {len(positional)})")
        for arg, kind in zip(node.args, positional):
            if isinstance(arg, ast.Starred):
                raise self._refuse("starred argument", arg)
            self.visit(arg, kind)
        for kw in node.keywords:
            if kw.arg is None:
                raise self._refuse("** argument", kw.value)
            if kw.arg not in keywords:
                raise self.where.refuse(f"keyword argument of {dotted}()", kw.arg,
                                        self._node_pos(kw.value))
            self.visit(kw.value, keywords[kw.arg])
        return None

    def _check_power(self, node):
        """No unbounded integer powers: a column-free exponent is a small literal."""
        if _mentions_column(node.right):
            return
        exp = node.right.operand if isinstance(node.right, ast.UnaryOp) else node.right
        small = (isinstance(exp, ast.Constant) and isinstance(exp.value, (int, float))
                 and not isinstance(exp.value, bool)
                 and abs(exp.value) <= _MAX_LITERAL_EXPONENT)
        base_ok = _mentions_column(node.left) or (
            isinstance(node.left, ast.Constant) and isinstance(node.left.value, (int, float)))
        if not (small and base_ok):
            raise self._refuse("power", node, " (a constant exponent must be a literal of "
                               f"at most {_MAX_LITERAL_EXPONENT} on a column or a number)")


def _mentions_column(node):
    funcs = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and id(n) not in funcs and n.id not in _NAMESPACES:
            return True
    return False


def _unknown_column(name, where, columns):
    listing = where.columns or ", ".join(sorted(columns))
    return _fail(f"unknown column '{name}' in the {where.label}; available columns: {listing}")


# ---------------------------------------------------------------- formula level
class _Tok(NamedTuple):
    kind: str  # name, qname, num, op, py (a call), block ({...}), end
    text: str
    start: int
    end: int


class _Node(NamedTuple):
    kind: str  # atom, bin, neg, group, random
    start: int
    end: int
    op: str = ""
    parts: tuple = ()
    tok: _Tok | None = None


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>(?:[^\W\d]|\.)[\w.]*)
  | (?P<qname>`[^`]*`)
  | (?P<op>\*\*|\|\||%in%|[-+*/:^~|()])
""", re.VERBOSE)
_ATTR = re.compile(r"\.[^\W\d]\w*")
_PAIRS = {"(": ")", "[": "]", "{": "}"}
_MAX_DEPTH = 50
_MAX_LENGTH = 100_000


def _closing(text, i, where):
    """Index after the bracket matching ``text[i]``, skipping string literals."""
    stack, j, n = [], i, len(text)
    while j < n:
        ch = text[j]
        if ch in "'\"`":
            k = _quote_end(text, j)
            if k < 0:
                raise where.error(f"unterminated quote {ch}", j)
            j = k
            continue
        if ch in _PAIRS:
            stack.append(_PAIRS[ch])
        elif ch in ")]}":
            if stack.pop() != ch:
                raise where.error(f"unbalanced brackets: '{ch}' does not close "
                                  f"'{text[i]}'", j)
            if not stack:
                return j + 1
        j += 1
    raise where.error(f"unbalanced parentheses: '{text[i]}' is never closed", i)


def _tokenize(text, start, where):
    toks, i, n = [], start, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"":
            raise where.refuse("string literal", text[i:_quote_end(text, i)], i,
                               " (strings are only allowed as levels in C() and options of "
                               "bs())")
        if ch == "{":
            j = _closing(text, i, where)
            toks.append(_Tok("block", text[i:j], i, j))
            i = j
            continue
        m = _TOKEN.match(text, i)
        if m is None:
            raise where.refuse("character", ch, i)
        kind, j = m.lastgroup, m.end()
        if kind == "ws":
            i = j
            continue
        if kind == "name" and j < n and text[j] in "([":
            while j < n and text[j] in "([":  # a call: name(...)(...)[...].attr ...
                j = _closing(text, j, where)
                attr = _ATTR.match(text, j)
                if attr:
                    j = attr.end()
            kind = "py"
        toks.append(_Tok(kind, text[i:j], i, j))
        i = j
    toks.append(_Tok("end", "", n, n))
    return toks


class _Parser:
    """Recursive descent over formula tokens, with formulaic's precedences.

    ``sum: ['-'] prod (('+'|'-') prod)*``, ``prod: inter (('*'|'/'|'%in%') inter)*``,
    ``inter: power (':' power)*``, ``power: atom (('**'|'^') number)*``,
    ``atom: name | `name` | number | call | {block} | '(' sum ')' | '(' sum '|' grouping ')'``.
    """

    def __init__(self, text, start, where):
        self.text, self.where = text, where
        self.toks = _tokenize(text, start, where)
        self.i = 0
        self.depth = 0

    def peek(self):
        return self.toks[self.i]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at_op(self, *ops):
        tok = self.peek()
        return tok.kind == "op" and tok.text in ops

    def parse(self):
        node = self.parse_sum()
        self.expect_end(node)
        return node

    def expect_end(self, node, closer=None):
        tok = self.peek()
        if closer is not None and tok.kind == "op" and tok.text == closer:
            return self.take()
        if tok.kind == "end":
            if closer is None:
                return tok
            raise self.where.error("unbalanced parentheses: '(' is never closed",
                                   self.open_pos)
        if tok.kind == "op" and tok.text == ")":
            raise self.where.error("unbalanced parentheses: ')' has no matching '('",
                                   tok.start)
        if tok.kind == "op" and tok.text == "~":
            raise self.where.error("more than one '~'", tok.start)
        if tok.kind == "op" and tok.text in ("|", "||"):
            raise self.where.error(f"'{tok.text}' outside parentheses (write random terms "
                                   "as (1|g))", tok.start)
        prev = self.text[node.start:node.end]
        raise self.where.error(f"missing '+' between '{_short(prev, 40)}' and "
                               f"'{_short(tok.text, 40)}'", tok.start)

    def operand_expected(self):
        tok = self.peek()
        prev = self.toks[self.i - 1] if self.i else None
        if prev is not None and prev.kind == "op" and prev.text not in ("(", ")"):
            if tok.kind == "end":
                return self.where.error(f"'{prev.text}' has no term after it (a trailing "
                                        f"'{prev.text}')", prev.start)
            return self.where.error(f"'{prev.text}' is followed by '{tok.text}' instead of "
                                    "a term", tok.start)
        if tok.kind == "end":
            return self.where.error("a term is missing", tok.start)
        return self.where.error(f"'{tok.text}' has no term before it", tok.start)

    def parse_sum(self):
        if self.at_op("-"):
            tok = self.take()
            operand = self.parse_prod()
            node = _Node("neg", tok.start, operand.end, "-", (operand,))
        else:
            node = self.parse_prod()
        while self.at_op("+", "-"):
            op = self.take().text
            right = self.parse_prod()
            node = _Node("bin", node.start, right.end, op, (node, right))
        return node

    def _binary(self, ops, sub):
        node = sub()
        while self.at_op(*ops):
            op = self.take().text
            right = sub()
            node = _Node("bin", node.start, right.end, op, (node, right))
        return node

    def parse_prod(self):
        return self._binary(("*", "/", "%in%"), self.parse_inter)

    def parse_inter(self):
        return self._binary((":",), self.parse_power)

    def parse_power(self):
        node = self.parse_atom()
        while self.at_op("**", "^"):
            op = self.take()
            tok = self.take()
            if tok.kind != "num":
                raise self.where.error(f"the exponent of '{op.text}' must be a number, got "
                                       f"'{tok.text}'", tok.start)
            node = _Node("bin", node.start, tok.end, op.text,
                         (node, _Node("atom", tok.start, tok.end, tok=tok)))
        return node

    def parse_atom(self):
        tok = self.peek()
        if tok.kind in ("name", "qname", "num", "py", "block"):
            self.take()
            return _Node("atom", tok.start, tok.end, tok=tok)
        if not (tok.kind == "op" and tok.text == "("):
            raise self.operand_expected()
        self.take()
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.where.error(f"more than {_MAX_DEPTH} nested parentheses", tok.start)
        bar = self._bar_ahead()
        inner = self.parse_sum()
        if bar:
            node = self.parse_random(tok, inner)
        else:
            self.open_pos = tok.start
            close = self.expect_end(inner, ")")
            node = _Node("group", tok.start, close.end, parts=(inner,))
        self.depth -= 1
        return node

    def _bar_ahead(self):
        depth = 0
        for tok in self.toks[self.i:]:
            if tok.kind == "op" and tok.text == "(":
                depth += 1
            elif tok.kind == "op" and tok.text == ")":
                if depth == 0:
                    return False
                depth -= 1
            elif tok.kind == "op" and tok.text in ("|", "||") and depth == 0:
                return True
        return False

    def parse_random(self, open_tok, left):
        if not self.at_op("|", "||"):
            self.open_pos = open_tok.start
            self.expect_end(left, "|")  # raises: something between the effects and '|'
        bar = self.take()
        group, depth = [], 0
        while True:
            tok = self.take()
            if tok.kind == "end":
                raise self.where.error("unbalanced parentheses: '(' is never closed",
                                       open_tok.start)
            if tok.kind == "op" and tok.text == ")":
                if depth == 0:
                    break
                depth -= 1
            elif tok.kind == "op" and tok.text == "(":
                depth += 1
            group.append(tok)
        close = tok
        return _Node("random", open_tok.start, close.end, bar.text, (left, tuple(group)))


def _terms(node):
    """The top-level sum as a list of (sign, node)."""
    out = []
    while node.kind == "bin" and node.op in ("+", "-"):
        out.append((node.op, node.parts[1]))
        node = node.parts[0]
    out.append(("-", node.parts[0]) if node.kind == "neg" else ("+", node))
    return out[::-1]


def _check_fixed(node, where, columns):
    """Check a fixed-effects node: every atom on the allow-list, no random term inside."""
    stack = [node]
    while stack:
        node = stack.pop()
        if node.kind == "random":
            raise where.error(f"random term '{where.text[node.start:node.end]}' must be "
                              "added to the model with '+' at the top level", node.start)
        if node.kind == "atom":
            _check_atom(node.tok, where, columns)
        else:
            stack.extend(reversed(node.parts))


def _check_atom(tok, where, columns):
    if tok.kind == "py":
        _PythonCheck(where, columns).run(tok.text, tok.start)
    elif tok.kind == "block":
        _PythonCheck(where, columns).run(tok.text[1:-1], tok.start + 1)
    elif tok.kind in ("name", "qname"):
        name = tok.text[1:-1] if tok.kind == "qname" else tok.text
        if tok.kind == "name" and _is_dunder(name):
            raise where.refuse("dunder name", name, tok.start)
        if tok.kind == "name" and keyword.iskeyword(name):
            raise where.refuse("Python keyword", name, tok.start,
                               f" (quote a column of that name as `{name}`)")
        if tok.kind == "name" and name.strip(".") == "":
            raise where.refuse("name", name, tok.start)
        if columns is not None and name not in columns:
            raise _unknown_column(name, where, columns)


#: R's reserved words: deparse quotes them (and any other non-syntactic name) in backticks.
_R_RESERVED = frozenset(
    "if else repeat while function for next break in TRUE FALSE NULL Inf NaN NA "
    "NA_integer_ NA_real_ NA_character_ NA_complex_ ...".split())
_R_SYNTACTIC = re.compile(r"(?:[^\W\d_]|\.(?!\d))[\w.]*|\.")
_GROUP_PART = re.compile(r"`([^`]*)`|([^:()`]+)|[:()`]")


def _r_deparse(name):
    """A column name as R's ``deparse`` prints it in an expression (backticks if needed)."""
    if _R_SYNTACTIC.fullmatch(name) and name not in _R_RESERVED \
            and not re.fullmatch(r"\.\.\d+", name):
        return name
    return f"`{name}`"


def grouping_columns(group):
    """The data columns of a grouping factor named as lme4 names it.

    The inverse of the names :func:`parse_formula` gives: a column ``g``, an interaction
    ``a:b`` (levels ordered by ``a``, then ``b``), lme4's names of nested factors
    (``(1|a/b/c)`` gives ``c:(b:a)``, ``b:a`` and ``a``), and names that R quotes in
    backticks. A name that is itself a column should be looked up as that column first.

    Parameters
    ----------
    group : str

    Returns
    -------
    tuple of str
        The component columns, the first one slowest in the level order.

    Examples
    --------
    >>> grouping_columns("cask:batch"), grouping_columns("c:(b:a)")
    (('cask', 'batch'), ('c', 'b', 'a'))
    >>> grouping_columns("b:`my a`")
    ('b', 'my a')
    """
    out = []
    for m in _GROUP_PART.finditer(str(group)):
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None and m.group(2).strip():
            out.append(m.group(2).strip())
    return tuple(out)


def _r_make_name(name):
    """R's ``make.names`` of one name: invalid characters become ``.``, ``X`` is prepended
    if the name does not start with a letter or a dot not followed by a digit, and a
    reserved word gains a dot."""
    out = "".join(ch if ch.isalnum() or ch in "._" else "." for ch in name)
    if not (out[:1].isalpha() or (out[:1] == "." and not out[1:2].isdigit())):
        out = "X" + out
    return out + "." if out in _R_RESERVED else out


def varcorr_names(groups):
    """lme4's names of the entries of ``VarCorr``, one per random-effects term.

    The grouping factors' names as they are, or, if one repeats (a factor with several
    terms), R's ``make.names(groups, unique = TRUE)`` (``make.unique`` of ``make.names``),
    as lme4's ``mkVarCorr`` does: the second term on ``Subject`` is ``Subject.1``, and with
    ``(x || a/b)`` the factor ``b:a`` becomes ``b.a`` and ``b.a.1``.

    Parameters
    ----------
    groups : sequence of str
        The terms' grouping factors, in term order.

    Returns
    -------
    list of str

    Examples
    --------
    >>> varcorr_names(["cask:batch", "batch"])
    ['cask:batch', 'batch']
    >>> varcorr_names(["b:a", "b:a", "a", "a", "a.1"])
    ['b.a', 'b.a.1', 'a', 'a.2', 'a.1']
    """
    if len(set(groups)) == len(groups):
        return list(groups)
    names = [_r_make_name(nm) for nm in groups]
    used, first, nxt, out = set(names), set(), {}, []
    for nm in names:
        if nm not in first:
            first.add(nm)
            out.append(nm)
            continue
        k = nxt.get(nm, 1)
        while f"{nm}.{k}" in used:
            k += 1
        out.append(f"{nm}.{k}")
        used.add(out[-1])
        nxt[nm] = k + 1
    return out


def _random_grouping(node, where):
    """Grouping factors of a random term, named as lme4 names them, outermost first.

    ``g`` is ``["g"]`` (a quoted name without its backticks), ``a:b`` is ``["a:b"]``
    (as written), and nesting follows lme4's ``expandSlash``, whose names are R's
    ``deparse`` of the interaction it builds: ``a/b`` is ``["a", "b:a"]``, ``a/b/c`` is
    ``["a", "b:a", "c:(b:a)"]``, ``a/b:c`` is ``["a", "b:c:a"]``. In an interaction a
    name that is not syntactic in R keeps its backticks (``b:`my a```), as in lme4.
    """
    term = where.text[node.start + 1:node.end - 1].strip()
    toks = node.parts[1]
    if not toks:
        raise where.error(f"random term '({term})' has no grouping factor after "
                          f"'{node.op}'", node.end - 1)
    names, ops = toks[0::2], toks[1::2]
    ok = (len(toks) % 2 == 1 and all(t.kind in ("name", "qname") for t in names)
          and all(t.kind == "op" and t.text in (":", "/") for t in ops))
    if not ok:
        expr = where.text[toks[0].start:toks[-1].end]
        raise where.error(f"grouping factor '{expr}' in '({term})' is not supported; use a "
                          "column name, a:b for an interaction or a/b for nesting",
                          toks[0].start)
    for t in names:
        if t.kind == "name" and _is_dunder(t.text):
            raise where.refuse("dunder name", t.text, t.start)
    if len(names) == 1:
        t = names[0]
        return [t.text[1:-1] if t.kind == "qname" else t.text]
    parts, cur = [], [names[0]]
    for op, t in zip(ops, names[1:]):
        if op.text == "/":
            parts.append(cur)
            cur = []
        cur.append(t)
    parts.append(cur)
    labels = [":".join(_r_deparse(t.text[1:-1] if t.kind == "qname" else t.text)
                       for t in p) for p in parts]
    # expandSlash: the next part times the factor so far, substitute(foo:bar); deparse
    # brackets the right operand when it is itself an interaction
    out, inner = [], labels[0]
    compound = len(parts[0]) > 1
    for label in labels[1:]:
        inner = f"{label}:({inner})" if compound else f"{label}:{inner}"
        out.append(inner)
        compound = True
    t = parts[0][0]
    outer = labels[0] if len(parts[0]) > 1 else t.text[1:-1] if t.kind == "qname" else t.text
    return [outer, *out]


def _intercept_only(left):
    """Whether the effects node is ``1`` (or ``1 + 1``): a pure random intercept."""
    return all(sign == "+" and n.kind == "atom" and n.tok.kind == "num"
               and n.tok.text == "1" for sign, n in _terms(left))


class _Effects(NamedTuple):
    """R's reading of an effects formula: its terms (tuples of factor texts) and whether
    it sets the intercept (True for ``1``, False for ``0`` or ``- 1``, None if silent)."""

    terms: tuple
    intercept: bool | None


def _effect_terms(node, where, order):
    """The terms of an effects node as R's ``terms()`` reads them (``attr(, "term.labels")``).

    ``a * b`` is ``a + b + a:b``, ``a / b`` is ``a + a:b``, ``a %in% b`` is ``a:b``,
    ``(a + b)^2`` is ``a + b + a:b``, ``-`` removes terms; the factors of an interaction
    are in the order in which they first appear in the effects (``order``), as R orders
    them. A ``0`` or ``1`` is accepted only at the top level of the sum, where its meaning
    is the same in R and formulaic.
    """
    text = where.text

    def unique(terms):
        out = []
        for t in terms:
            if t not in out:
                out.append(t)
        return tuple(out)

    def merge(a, b):
        return tuple(sorted(set(a) | set(b), key=order.__getitem__))

    def no_intercept(e, at):
        if e.intercept is not None:
            raise where.error("'0' or '1' inside parentheses or an interaction cannot be "
                              "expanded by '||'; write it at the top level of the effects",
                              at.start)
        return e.terms

    def walk(n):
        if n.kind == "atom":
            if n.tok.kind == "num":
                if n.tok.text in ("0", "1"):
                    return _Effects((), n.tok.text == "1")
                raise where.error(f"number '{n.tok.text}' in the effects of a random term "
                                  "(only 0 or 1 may stand alone)", n.start)
            return _Effects(((text[n.start:n.end],),), None)
        if n.kind == "group":
            return _Effects(no_intercept(walk(n.parts[0]), n), None)
        if n.kind == "neg":
            inner = walk(n.parts[0])
            if inner.intercept is True:
                return _Effects((), False)
            if inner.intercept is False:
                raise where.error("'- 0' is not supported in the effects of a random term",
                                  n.start)
            return _Effects((), None)  # removing terms from nothing
        op, (a, b) = n.op, n.parts
        if op in ("+", "-"):
            left, right = walk(a), walk(b)
            if op == "+":
                icpt = left.intercept if right.intercept is None else right.intercept
                return _Effects(unique(left.terms + right.terms), icpt)
            if right.intercept is False:
                raise where.error("'- 0' is not supported in the effects of a random term",
                                  b.start)
            icpt = False if right.intercept else left.intercept
            return _Effects(tuple(t for t in left.terms if t not in right.terms), icpt)
        left = no_intercept(walk(a), a)
        if op in ("**", "^"):
            k = float(b.tok.text)
            if k != int(k) or k < 1:
                raise where.error(f"the exponent of '{op}' must be a whole number >= 1",
                                  b.start)
            out = left
            for _ in range(int(k) - 1):
                out = unique(out + tuple(merge(s, t) for s in out for t in left))
            return _Effects(out, None)
        right = no_intercept(walk(b), b)
        cross = tuple(merge(s, t) for s in left for t in right)
        if op in (":", "%in%"):
            return _Effects(unique(cross), None)
        if op == "*":
            return _Effects(unique(left + right + cross), None)
        if op == "/":  # a/b = a + a:b, with every factor of a in the interaction
            base = tuple(sorted({f for t in left for f in t}, key=order.__getitem__))
            return _Effects(unique(left + tuple(merge(base, t) for t in right)), None)
        raise where.error(f"operator '{op}' in the effects of a random term", n.start)

    return walk(node)


def _double_vert(node, where):
    """lme4's ``expandDoubleVerts``: the effects of ``(e || g)``, one per uncorrelated term.

    ``(1 + x + z || g)`` is ``(1 | g) + (0 + x | g) + (0 + z | g)``: the intercept (unless
    the effects remove it) and then ``0 + label`` for each of R's term labels of ``e``,
    in R's order (by degree, then as written). A factor ``f`` is one term, so
    ``(f || g)`` gives ``(1 | g) + (0 + f | g)`` with all of f's dummies in the second,
    as in lme4.
    """
    left = node.parts[0]
    order = {}
    stack = [left]
    atoms = []
    while stack:
        n = stack.pop()
        if n.kind == "atom":
            atoms.append(n)
        else:
            stack.extend(reversed(n.parts))
    for n in sorted(atoms, key=lambda n: n.start):
        order.setdefault(where.text[n.start:n.end], len(order))
    e = _effect_terms(left, where, order)
    terms = sorted(e.terms, key=len)  # R: by degree, stable
    out = (["1"] if e.intercept is not False else []) + ["0 + " + ":".join(t) for t in terms]
    if not out:
        term = where.text[node.start + 1:node.end - 1].strip()
        raise where.error(f"random term '({term})' has no random effects", node.start)
    return out


def _canonical(effects, where):
    """Effects text without the spaces between tokens, to recognise a repeated term."""
    return "".join(t.text for t in _tokenize(effects, 0, where))


def _normalise(text, what):
    if not isinstance(text, str):
        raise _fail(f"the {what} must be a string, got {type(text).__name__}")
    if len(text) > _MAX_LENGTH:
        raise _fail(f"the {what} is {len(text)} characters long, more than {_MAX_LENGTH}")
    for i, ch in enumerate(text):
        if not (ch.isprintable() or ch.isspace()):
            raise _fail(f"the {what} '{_printable(_short(text))}' has a control character "
                        f"{_printable(ch)} at character {i + 1}")
    return "".join(" " if ch.isspace() else ch for ch in text)  # newlines, tabs, NBSP


def parse_formula(formula):
    """Parse an lme4 formula: response, fixed part and random-effects terms.

    The right-hand side is parsed and checked against the formula allow-list (see the
    module documentation) without looking at any data and without evaluating anything.
    The effects on the left of ``|`` or ``||`` are checked against the same allow-list as
    the fixed part. The random terms are expanded as lme4's ``findbars`` does:

    - ``(e | a/b)`` is ``(e | b:a) + (e | a)``, lme4's ``expandSlash``: the inner
      factor first, named as lme4 names it (``b:a``, its levels ``"b_level:a_level"``
      ordered by ``b``, then ``a``); ``(e | a/b/c)`` is ``(e | c:(b:a)) + (e | b:a) +
      (e | a)``, and ``(e | a/b:c)`` is ``(e | b:c:a) + (e | a)``, as in lme4 1.1-31
      (which cannot fit ``(e | a:b/c)``; lmmops names it by the same rule, ``c:(a:b)``
      and ``a:b``). An interaction written out, ``(e | a:b)``, keeps the name ``a:b``;
    - ``(e || g)`` is lme4's ``expandDoubleVerts``: ``(1 | g)`` (unless ``e`` removes the
      intercept) and ``(0 + t | g)`` for each term label ``t`` of ``e``, so
      ``(1 + x + z || g)`` is ``(1 | g) + (0 + x | g) + (0 + z | g)``; a factor is one
      term, ``(0 + f | g)``, correlated within itself.

    The same effects on the same grouping factor twice, such as ``(1|g) + (1|g)`` or
    ``(1|a/b) + (1|a)``, is refused: lme4 fits it, but the two variances cannot be told
    apart (only their sum is identified). A factor may carry several different terms,
    ``(1|g) + (0 + x|g)``.

    Parameters
    ----------
    formula : str
        For example ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"`` or
        ``"Reaction ~ Days + (Days | Subject)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        If there is no ``~``, no response, no random term, a term cannot be parsed (a
        trailing ``+``, two terms without ``+``, unbalanced parentheses), a random term
        is repeated, or the formula uses anything outside the allow-list (the message
        names the token and its position).

    Examples
    --------
    >>> pf = parse_formula("y ~ x + (1|a/b) + (1|c)")
    >>> pf.response, pf.fixed, pf.random
    ('y', 'x', ('b:a', 'a', 'c'))
    >>> parse_formula("y ~ (1|a/b/c)").random
    ('c:(b:a)', 'b:a', 'a')
    >>> [str(t) for t in parse_formula("y ~ x + (1 + x + z || g) + (x | h)").random_terms]
    ['(1 | g)', '(0 + x | g)', '(0 + z | g)', '(x | h)']
    >>> parse_formula("y ~ x + (1|g) +")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.FormulaError: formula 'y ~ x + (1|g) +': '+' has no term after it ...
    """
    if not isinstance(formula, str) or "~" not in formula:
        raise _fail(f"a formula needs the form 'response ~ terms', got {_short(repr(formula))}")
    text = _normalise(formula, "formula")
    where = _Where("formula", text)
    lhs = text.split("~", 1)[0]
    response = lhs.strip()
    if not response:
        raise _fail(f"formula '{_short(text.strip())}' has no response on the left of '~'")
    if len(response) > 1 and response[0] == response[-1] == "`":
        response = response[1:-1]
    terms = _terms(_Parser(text, len(lhs) + 1, where).parse())
    groups, fixed, specs, seen = [], [], [], set()
    for sign, node in terms:
        if node.kind != "random":
            _check_fixed(node, where, None)
            fixed.append((sign, text[node.start:node.end]))
            continue
        if sign != "+":
            raise where.error(f"random term '{text[node.start:node.end]}' must be added "
                              "with '+', not subtracted", node.start)
        left = node.parts[0]
        _check_fixed(left, where, None)
        grouping = _random_grouping(node, where)
        if node.op == "||":
            effects = _double_vert(node, where)
        else:
            effects = [text[left.start:left.end].strip()]
        for eff in effects:
            for g in reversed(grouping):  # lme4's expandSlash: b:a before a
                spec = RandomTermSpec(eff, g, node.op == "|")
                key = (_canonical(eff, where), g)
                if key in seen:
                    raise _fail(f"random term {spec} appears twice in {where.label}: only "
                                "the sum of the two variances is identifiable; drop one")
                seen.add(key)
                specs.append(spec)
        for g in reversed(grouping):  # findbars order: b:a before a
            if g not in groups:
                groups.append(g)
    if not groups:
        raise _fail(
            f"{where.label} has no random-effects term such as (1|group); lmmops fits "
            "mixed models (use ordinary least squares for a purely fixed model)"
        )
    pieces = [("-" if sign == "-" else "") + t if i == 0 else f"{sign} {t}"
              for i, (sign, t) in enumerate(fixed)]
    return ParsedFormula(formula.strip(), response, " ".join(pieces) or "1", tuple(groups),
                         tuple(specs))


_CONTRAST = re.compile(r"\[(?:T\.)?([^\]]*)\]")


def lme4_names(columns):
    """Rewrite formulaic column names in lme4's style.

    Parameters
    ----------
    columns : sequence of str

    Returns
    -------
    list of str

    Examples
    --------
    >>> lme4_names(["Intercept", "service[T.1]", "f[T.b]:x"])
    ['(Intercept)', 'service1', 'fb:x']
    """
    out = []
    for c in columns:
        if c == "Intercept":
            out.append("(Intercept)")
            continue
        out.append(_CONTRAST.sub(lambda m: m.group(1), c))
    return out


class _SandboxMaterializer(PandasMaterializer):
    """formulaic's pandas materializer, confined to the formula sandbox.

    It evaluates in :data:`_CONTEXT` whatever context it is given, and checks every
    Python expression against the allow-list just before formulaic evaluates it. A model
    spec it builds records it by name, so rebuilding the matrix for new data (as
    :func:`lmmops.analysis.predict.predict` does) runs in the sandbox too.
    """

    REGISTER_NAME = "lmmops_sandbox"

    @override
    def __init__(self, data, context=None, **params):
        super().__init__(data, context=_CONTEXT, **params)

    @override
    def _evaluate(self, expr, metadata, spec):
        columns = {c for c in self.data.columns if isinstance(c, str)}
        _PythonCheck(_Where("formula term", expr, self.data), columns).run(expr)
        return super()._evaluate(expr, metadata, spec)


def _check_formulaic(formula, where, columns):
    """Check formulaic's own parse: every factor it would evaluate is on the allow-list."""
    if not isinstance(formula, formulaic.formula.SimpleFormula):
        raise where.error("formulaic reads it as a structured formula (with '|' or '~')")
    for term in formula:
        for factor in term.factors:
            method = factor.eval_method.value
            if method == "python":
                _PythonCheck(where, columns).run(factor.expr)
            elif method == "lookup":
                if factor.expr not in columns:
                    raise _unknown_column(factor.expr, where, columns)
            else:
                try:
                    float(factor.expr)
                except ValueError:
                    raise where.refuse("literal", factor.expr) from None


def fixed_effects_matrix(fixed, data, return_spec=False, what="fixed effects"):
    """Build the fixed-effects model matrix with formulaic, inside the formula sandbox.

    ``fixed`` is parsed and checked against the allow-list and the data's columns, then
    formulaic's parse of it is checked the same way, and formulaic evaluates it in a
    namespace holding only the allowed transforms (see the module documentation).

    Parameters
    ----------
    fixed : str
        Right-hand side of the fixed part (``"1 + service"``).
    data : pandas.DataFrame
    return_spec : bool
        Also return the model spec, which rebuilds the same columns (same factor
        levels and contrasts) for new data.
    what : str
        What the formula is, for messages: ``"fixed effects"``, or ``"random effects"``
        for the effects of a random term (:func:`lmmops.data.terms.build_terms`).

    Returns
    -------
    X : ndarray of float64, shape (n_obs, p)
    names : list of str
        lme4-style coefficient names.
    spec : formulaic.ModelSpec
        Only with ``return_spec=True``. It rebuilds the matrix in the sandbox too.

    Raises
    ------
    FormulaError
        For an unknown column, a missing value, anything outside the allow-list, or a
        term formulaic cannot evaluate.

    Examples
    --------
    >>> df = pd.DataFrame({"x": [1.0, 2.0, 4.0], "f": ["a", "b", "a"]})
    >>> X, names = fixed_effects_matrix("log(x) + f", df)
    >>> names
    ['(Intercept)', 'log(x)', 'fb']
    >>> fixed_effects_matrix("I(open('/etc/passwd'))", df)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.FormulaError: fixed effects ...: call of 'open' at character 3 is not allowed
    """
    if not isinstance(data, pd.DataFrame):
        raise _fail(f"data must be a pandas DataFrame, got {type(data).__name__}")
    text = _normalise(fixed, what)
    where = _Where(what, text, data)
    columns = {c for c in data.columns if isinstance(c, str)}
    for _, node in _terms(_Parser(text, 0, where).parse()):
        _check_fixed(node, where, columns)
    hit = _plain_matrix(text, what, data)
    if hit is not None:
        X, names, spec = hit
        return (X, names, spec) if return_spec else (X, names)
    try:
        formula = formulaic.Formula(text)
    except Exception as exc:  # formulaic raises several types; name the problem
        raise where.error(f"formulaic cannot parse it: {exc}") from None
    _check_formulaic(formula, where, columns)
    try:
        mm = formulaic.model_matrix(formula, data, context=_CONTEXT, na_action="raise",
                                    materializer=_SandboxMaterializer)
    except FormulaError:
        raise
    except Exception as exc:  # formulaic raises several types; name the problem
        msg = str(exc)
        m = re.search(r"`([^`]+)` contains null values", msg)
        if m:
            col = m.group(1)
            if col in data.columns:
                bad = f"column '{col}' in the {what} has {int(data[col].isna().sum())} missing"
            else:  # a transform, log(x) of x <= 0
                bad = f"'{col}' in the {what} evaluates to missing (NaN)"
            raise _fail(
                f"{bad} value(s); remove or impute them before fitting (lmmops never drops "
                "rows silently)"
            ) from None
        raise _fail(f"cannot build the {what} '{_short(text)}': {msg}") from None
    X = np.asarray(mm, dtype=np.float64)
    names = lme4_names([str(c) for c in mm.columns])
    if X.shape[0] != len(data):
        raise _fail(f"the {what.replace(' ', '-')} matrix lost rows; check for missing "
                    "values")
    if not np.all(np.isfinite(X)):
        bad = [names[j] for j in range(X.shape[1]) if not np.all(np.isfinite(X[:, j]))]
        kind = what.replace("effects", "effect").replace(" ", "-")
        raise _fail(f"{kind} column(s) {bad} contain non-finite values (inf or NaN); "
                    "remove or impute them before fitting")
    _remember_plain(text, what, data, formula, mm, X, names)
    if return_spec:
        return X, names, mm.model_spec
    return X, names


#: :func:`fixed_effects_matrix`'s memory of the formulas whose matrix is plain columns:
#: ``(text, what) -> (sources, dtypes, names, spec)``, bounded by :data:`_PLAIN_MAX`
_PLAIN = {}
_PLAIN_MAX = 256


def _plain_dtype(col):
    """The dtype of a column if it is a plain numpy integer or float dtype, else None."""
    dt = getattr(col, "dtype", None)  # a DataFrame (duplicated column name) has none
    return dt if isinstance(dt, np.dtype) and dt.kind in "iuf" else None


def _remember_plain(text, what, data, formula, mm, X, names):
    """Remember a formula whose matrix formulaic built as plain columns.

    Plain: every factor formulaic evaluated is the intercept or a lookup of a numeric
    (numpy integer or float) column, every term has one factor at most, and each column
    of the matrix is the intercept (ones) or a data column cast to float64, exactly.
    Such a matrix, and its model spec (which holds no state learnt from the data),
    depend on the data only through those columns' values and dtypes, so
    :func:`_plain_matrix` rebuilds it for the next data set without formulaic.
    """
    if not len(data) or len(_PLAIN) >= _PLAIN_MAX or "Intercept" in data.columns:
        return  # (a data column named like formulaic's intercept column: not plain)
    sources = []
    for term in formula:
        factors = list(term.factors)
        if len(factors) > 1:
            return
        for factor in factors:
            method = factor.eval_method.value
            if method == "lookup":
                if factor.expr not in data.columns or _plain_dtype(data[factor.expr]) is None:
                    return
            elif not (method == "literal" and factor.expr == "1"):
                return
    for j, c in enumerate(mm.columns):
        c = str(c)
        if c == "Intercept":
            if not np.all(X[:, j] == 1.0):
                return
            sources.append(None)
        elif c in data.columns and _plain_dtype(data[c]) is not None:
            if not np.array_equal(X[:, j], data[c].to_numpy(dtype=np.float64)):
                return
            sources.append(c)
        else:
            return
    dtypes = tuple(None if c is None else data[c].dtype for c in sources)
    _PLAIN[(text, what)] = (tuple(sources), dtypes, list(names), mm.model_spec)


def _plain_matrix(text, what, data):
    """``(X, names, spec)`` for a formula :func:`_remember_plain` saw, if the data's
    columns have the same dtypes and no missing value; else None (formulaic builds it,
    and reports any problem)."""
    hit = _PLAIN.get((text, what))
    if hit is None or not len(data):
        return None
    sources, dtypes, names, spec = hit
    X = np.empty((len(data), len(sources)))
    for j, (c, dt) in enumerate(zip(sources, dtypes)):
        if c is None:
            X[:, j] = 1.0
            continue
        if c not in data.columns:
            return None
        col = data[c]
        if not isinstance(col, pd.Series) or col.dtype != dt:
            return None
        X[:, j] = col.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(X)):
        return None  # formulaic's path names the missing or non-finite values
    return X, list(names), spec


def check_full_rank(X, names, tol=1e-7):
    """Raise :class:`RankDeficientError` naming aliased columns if X is rank deficient.

    The strict counterpart of :func:`rank_columns` (which the model uses to drop aliased
    columns as lme4 does): the same rule decides which columns are aliased, the later of
    two collinear columns.

    Parameters
    ----------
    X, names, tol
        As in :func:`rank_columns`.

    Raises
    ------
    RankDeficientError

    Examples
    --------
    >>> X = np.column_stack([np.ones(4), [1., 2, 3, 4], [2., 4, 6, 8]])
    >>> check_full_rank(X, ["(Intercept)", "x", "x2"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.RankDeficientError: fixed-effect model matrix is rank deficient ...
    """
    _, aliased = rank_columns(X, names, tol=tol)
    if aliased:
        raise RankDeficientError(
            f"fixed-effect model matrix is rank deficient: {len(aliased)} column(s) are "
            f"linear combinations of the columns before them: {', '.join(aliased)}. Remove "
            "them, or fit through lmmops.fit / LMM, which drops them as lme4 does"
        )


def rank_columns(X, names, tol=1e-7):
    """Find a full-rank subset of the columns of X, as lme4 does (``chkRank.drop.cols``).

    The columns are taken in order, as R's ``qr`` (LINPACK ``dqrdc2``, limited pivoting)
    does: a column is aliased when what is left of it after projecting out the columns
    kept before it is at most ``tol`` times its own norm, so of two collinear columns the
    later is dropped. The norms are those of the conditioned columns
    (:func:`lmmops.data.conditioning.orthogonalise`): once the constant lies in the span of
    the kept columns a column is compared with its centred self, so the test does not
    depend on the units or the origin of a covariate (a covariate N(1e4, 1), a column
    times 3e7 or Unix times are kept); a column whose centred values are rounding noise
    is aliased with the intercept. In the notation of :ref:`theory-rank`, ``X T = [X_1 X_2]``
    with ``X_2`` (the kept columns) of full rank and ``X_1 = X_2 F``; the selected
    generalised inverse sets ``tau_1 = 0``.

    Parameters
    ----------
    X : ndarray, shape (n_obs, p)
    names : sequence of str
    tol : float
        Relative tolerance (R's default 1e-7).

    Returns
    -------
    keep : ndarray of int
        Indices of the kept columns, in their original order.
    dropped : list of str
        Names of the aliased (dropped) columns.

    Examples
    --------
    >>> X = np.column_stack([np.ones(4), [1., 2, 3, 4], [2., 4, 6, 8]])
    >>> keep, dropped = rank_columns(X, ["(Intercept)", "x", "x2"])
    >>> keep.tolist(), dropped
    ([0, 1], ['x2'])
    >>> t = 1.7e9 + np.array([0.0, 3600.0, 86400.0, 2e6])     # Unix times
    >>> rank_columns(np.column_stack([np.ones(4), t]), ["(Intercept)", "t"])[1]
    []
    """
    X = np.asarray(X, dtype=np.float64)
    keep = orthogonalise(X, tol=tol)[0]
    kept = set(keep.tolist())
    return keep, [names[j] for j in range(X.shape[1]) if j not in kept]


def rank_message(dropped):
    """lme4's message for dropped columns.

    Parameters
    ----------
    dropped : list of str

    Returns
    -------
    str

    Examples
    --------
    >>> rank_message(["x2"])
    'fixed-effect model matrix is rank deficient so dropping 1 column / coefficient (x2)'
    """
    k = len(dropped)
    plural = "s" if k > 1 else ""
    return (f"fixed-effect model matrix is rank deficient so dropping {k} column{plural} / "
            f"coefficient{plural} ({', '.join(dropped)})")


def response_vector(data, name):
    """Extract the response column as float64, with clear errors.

    Parameters
    ----------
    data : pandas.DataFrame
    name : str

    Returns
    -------
    ndarray of float64, shape (n_obs,)

    Raises
    ------
    FormulaError
        If the column is unknown, not numeric, complex, or has missing or infinite values.
    """
    if name not in data.columns:
        raise _fail(
            f"unknown response column '{name}'; available columns: "
            f"{', '.join(map(str, data.columns))}"
        )
    col = data[name]
    if isinstance(col.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
    ):
        raise _fail(
            f"response '{name}' is not numeric (dtype {col.dtype}); a linear mixed model needs "
            "a numeric response"
        )
    if pd.api.types.is_complex_dtype(col):
        raise FormulaError(
            f"response '{name}' is complex (dtype {col.dtype}); a linear mixed model needs a "
            "real response: fit its real part or modulus explicitly if that is what is meant"
        )
    y = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise _fail(
            f"response '{name}' has {rows.size} missing or non-finite value(s) (first at row "
            f"{rows[0]}); remove or impute them before fitting"
        )
    return y
