"""Load a spec file (built-in name or path), run it, and validate what it declared."""

from __future__ import annotations

import itertools
import linecache
import os
import sys
import traceback
from pathlib import Path

import sympy as sp
from sympy.tensor.indexed import IndexException

from gradtool.errors import SpecError
from gradtool.spec.lang import MaxOver, Padded, Spec, SumOver
from gradtool.usercode import UserCodeError, running

# Functions the engine can differentiate; anything else in a spec is reported.
DIFFERENTIABLE = (
    sp.exp, sp.log, sp.tanh, sp.sinh, sp.cosh, sp.sin, sp.cos, sp.atan, sp.erf, sp.Abs,
    sp.Max, sp.Min, sp.Piecewise, sp.Heaviside, SumOver, MaxOver, Padded,
)
NOT_DIFFERENTIABLE = (sp.floor, sp.ceiling, sp.sign, sp.frac)
LANG_FUNCTIONS = "exp, log, sqrt, tanh, sigmoid, erf, sin, cos, Abs, Max, Min, Piecewise, Sum"


def builtin_dir() -> Path:
    """The folder of built-in specs: ``specs/`` beside the package, or its installed copy."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "specs", here / "builtin_specs"):
        if candidate.is_dir():
            return candidate
    raise SpecError("cannot find the built-in specs folder", hint="reinstall gradtool")


def builtin_specs() -> dict[str, Path]:
    """Built-in spec names mapped to their files, sorted by name."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.py")) if not p.stem.startswith("_")}


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".py" or os.sep in name_or_path or path.exists():
        if not path.exists():
            raise SpecError(f"spec file {name_or_path} does not exist",
                            hint="check the path, or run `gradtool specs` for built-in names")
        if path.is_dir():
            raise SpecError(f"{name_or_path} is a folder, not a spec file",
                            hint="name one .py file that builds a Spec")
        return path
    specs = builtin_specs()
    if name_or_path in specs:
        return specs[name_or_path]
    raise SpecError(f"no built-in spec named `{name_or_path}` and no such file",
                    hint="run `gradtool specs` to list them, or give a path to a .py spec file")


def _line_in(exc: BaseException, filename: str) -> int | None:
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def _source(filename: str, line: int | None) -> str:
    return linecache.getline(filename, line).strip() if line else ""


def load_spec(name_or_path: str | os.PathLike) -> Spec:
    """Run a spec file and return its validated :class:`Spec`.

    >>> load_spec("relu").name
    'relu'
    """
    path = resolve(str(name_or_path))
    filename = str(path)
    try:
        # bytes: compile() honours a PEP 263 coding line (a latin-1 spec file is valid Python)
        source = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec file: {exc}", file=filename) from None
    if not source.strip():
        raise SpecError("the spec file is empty", file=filename,
                        hint="a spec file builds one Spec; see docs/spec-language.md")
    try:
        code = compile(source, filename, "exec")
    except (SyntaxError, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise SpecError(f"the file is not UTF-8 ({exc.reason} at byte {exc.start})",
                            file=filename, hint="save it as UTF-8, or declare its encoding "
                            "on the first line: # -*- coding: latin-1 -*-") from None
        raise SpecError(f"syntax error: {exc.msg}", file=filename, line=exc.lineno,
                        hint="fix the Python syntax on that line") from None
    namespace = {"__name__": f"gradtool_spec_{path.stem}", "__file__": filename}
    try:
        # stdout to stderr, sys.exit and the time limit become errors; exceptions pass on
        with running("running the spec", filename, passthrough=(Exception,)):
            exec(code, namespace)
    except SpecError as exc:
        exc.file = exc.file or filename
        raise
    except NameError as exc:
        name = getattr(exc, "name", None) or str(exc)
        raise SpecError(f"`{name}` is not defined", file=filename, line=_line_in(exc, filename),
                        hint=f"declare it on the spec, import it from gradtool.lang "
                             f"({LANG_FUNCTIONS}), or define it from those") from None
    except UserCodeError:  # the guard's own error (time limit, sys.exit): already one line
        raise
    except IndexException:
        line = _line_in(sys.exc_info()[1], filename)
        raise SpecError(f"wrong number of indices in `{_source(filename, line)}`",
                        file=filename, line=line,
                        hint="index each tensor with one index per declared dimension"
                        ) from None
    except Exception as exc:  # anything else the spec's own code raised
        line = _line_in(exc, filename)
        hint = "the spec's Python raised this; fix that line"
        if "convert expression to float" in str(exc):
            hint = ("math/numpy functions cannot take symbols: use exp, log, sqrt, ... from "
                    "gradtool.lang")
        raise SpecError(f"{type(exc).__name__}: {exc} in `{_source(filename, line)}`",
                        file=filename, line=line, hint=hint) from None
    specs = [v for v in namespace.values() if isinstance(v, Spec)]
    if len(specs) != 1:
        what = "no Spec" if not specs else f"{len(specs)} Specs"
        raise SpecError(f"the file builds {what}", file=filename,
                        hint='a spec file builds exactly one: spec = Spec("name", "what it is")')
    spec = specs[0]
    spec.file = filename
    validate(spec)
    if spec.eval_statements:
        validate(spec.eval_form())
    return spec


# -- validation ------------------------------------------------------------------------------

def accesses(expr: sp.Expr, spec: Spec):
    """Every tensor access in ``expr`` as (name, index expressions); scalars have ()."""
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Indexed):
            yield node.base.label.name, tuple(node.indices)
        elif isinstance(node, sp.Symbol) and node.name in spec.tensors \
                and not spec.tensors[node.name].dims:
            yield node.name, ()


def _check_functions(spec: Spec, expr: sp.Expr, line: int | None) -> None:
    for node in sp.preorder_traversal(expr):
        if isinstance(node, NOT_DIFFERENTIABLE):
            raise spec.error(f"`{type(node).__name__}` is not differentiable", line,
                             "gradients through it are zero or undefined; use a smooth "
                             "function or make its input non-differentiable")
        if isinstance(node, sp.KroneckerDelta):
            if not any(isinstance(a, sp.Indexed) and a.base.label.name in spec.tensors
                       and spec.tensors[a.base.label.name].is_labels for a in node.args):
                raise spec.error(f"`{node}`: KroneckerDelta compares an index with integer "
                                 "labels only", line,
                                 'declare y = spec.labels("y", N, classes=C) and write '
                                 "KroneckerDelta(c, y[n]) or spec.onehot(y)[n, c]")
            continue
        if isinstance(node, sp.Piecewise) and node.args[-1].cond is not sp.true:
            # SymPy leaves the value undefined (nan) where no condition holds; the kernels
            # would compute the last branch there, or the first, and every check would agree
            first = node.args[0]
            raise spec.error(f"`Piecewise` has no (value, True) branch: where none of its "
                             f"conditions ({', '.join(str(a.cond) for a in node.args)}) holds "
                             "its value is undefined", line,
                             "add a (value, True) branch for the other cases, e.g. "
                             f"Piecewise(({first.expr}, {first.cond}), (0, True))")
        if isinstance(node, sp.core.function.AppliedUndef):
            raise spec.error(f"unknown function `{node.func}`", line,
                             f"gradtool differentiates {LANG_FUNCTIONS}; write it from those")
        if isinstance(node, sp.Function) and not isinstance(node, DIFFERENTIABLE):
            raise spec.error(f"function `{node.func}` is not supported", line,
                             f"use {LANG_FUNCTIONS}")
        if isinstance(node, (sp.Derivative, sp.Integral, sp.Sum, sp.Product)):
            raise spec.error(f"`{type(node).__name__}` is not part of the spec language", line,
                             "use gradtool.lang.Sum(body, i) for sums over indices")


def _bare_tensors(expr) -> list:
    """Tensors used without indices (``X * 2`` instead of ``X[n, d] * 2``)."""
    if isinstance(expr, sp.Indexed):
        return []
    if isinstance(expr, sp.IndexedBase):
        return [expr]
    return [b for arg in expr.args for b in _bare_tensors(arg)]


def free_indices(expr: sp.Expr, spec: Spec) -> set[sp.Symbol]:
    """Indices used in ``expr`` that no Sum/Max inside it binds."""
    if isinstance(expr, (SumOver, MaxOver)):
        return free_indices(expr.body, spec) - set(expr.over)
    if isinstance(expr, sp.Symbol):
        return {expr} if expr in spec.index_dims else set()
    out: set[sp.Symbol] = set()
    for arg in expr.args:
        out |= free_indices(arg, spec)
    return out


def _check_reductions(spec: Spec, expr: sp.Expr, bound: set, line) -> None:
    if isinstance(expr, (SumOver, MaxOver)):
        for i in expr.over:
            if i not in spec.index_dims:
                raise spec.error(f"index `{i}` is summed but not declared", line,
                                 f"declare it with spec.indices({i}=D), D being the "
                                 "dimension it runs over")
            if i in bound:
                raise spec.error(f"index `{i}` is reduced here but is already in use outside "
                                 "this reduction", line,
                                 "declare another index over the same dimension and use it")
        bound = bound | set(expr.over)
    for arg in expr.args:
        _check_reductions(spec, arg, bound, line)


def _is_affine(ix: sp.Expr, index_syms: set) -> bool:
    if not index_syms:
        return True
    try:
        return sp.Poly(ix, *index_syms).total_degree() <= 1
    except sp.PolynomialError:
        return False


def _check_access(spec: Spec, name: str, idx: tuple, line, guarded: bool = False) -> None:
    tensor = spec.tensors[name]
    if len(idx) != len(tensor.dims):
        raise spec.error(f"`{name}` has {len(tensor.dims)} axes but is indexed with "
                         f"{len(idx)}", line, "use one index per declared dimension")
    allowed = set(spec.index_dims) | set(spec.dim_symbols.values()) \
        | {h.symbol for h in spec.hypers.values()}
    for axis, (ix, dim) in enumerate(zip(idx, tensor.dims, strict=True)):
        ix = sp.sympify(ix)
        unknown = ix.free_symbols - allowed
        if unknown:
            sym = sorted(unknown, key=str)[0]
            raise spec.error(f"`{sym}` in `{name}[...]` is not a declared index", line,
                             f"declare it with spec.indices({sym}={dim})")
        if not _is_affine(ix, ix.free_symbols & set(spec.index_dims)):
            raise spec.error(f"index `{ix}` of `{name}` is not affine", line,
                             "index expressions are sums of index × constant, like i*S + p")
        if ix in spec.index_dims and spec.index_dims[ix] != dim:
            raise spec.error(f"index `{ix}` runs over {spec.index_dims[ix]} but axis {axis} of "
                             f"`{name}` has size {dim}", line,
                             f"use an index declared over {dim}; a plain index reads a whole "
                             f"axis, so the first part of a fused axis (SymPy writes "
                             f"b[0*H + h] as b[h]) cannot be read this way yet: give that part "
                             f"a parameter of its own, or read every part at an offset ≥ 1 "
                             f"block (docs/spec-language.md, Known rough edges)")
        if ix not in spec.index_dims and not guarded:
            _check_range(spec, name, idx, axis, line)


# -- index ranges ----------------------------------------------------------------------------
#
# An affine index c0 + Σ c_i·i with i in [0, R_i) takes its least value where every index with
# a negative coefficient is at its last value and the others at 0, and its greatest value the
# other way round. An access stays inside its axis of size A when least ≥ 0 and A − 1 − greatest
# ≥ 0. Both are polynomials in the sizes (and stride-like hyper-parameters); with every size
# D = m + D' for its minimum m (1 unless spec.min_size says more) and D' ≥ 0, a polynomial
# whose coefficients are all ≥ 0 is ≥ 0 for every size. Otherwise small sizes are tried for a
# counterexample; failing both, the access is refused as undecided rather than accepted.

OUTSIDE_HINT = ("shift the index, or read a padded copy: Xp = spec.pad(\"Xp\", X, (0, 0, P, P)) "
                "reads 0 outside X")
SEARCH_VALUES = (0, 1, 2, 3)  # offsets D' above each size's minimum tried for a counterexample
SEARCH_POINTS = 256


def _least(spec: Spec, sym) -> int:
    return max(0, spec.min_sizes.get(sym.name, 1))


def _eliminate_derived(spec: Spec, expr: sp.Expr):
    """``expr`` free of derived sizes (``spec.size``), for the sign test below.

    A derived size D = ⌊A/B⌋ + c (A, B polynomials in sizes) becomes q + c with A = q·B + r,
    q ≥ 0 (A ≥ 0 wherever D ≥ 1, which checks and layers require) and 0 ≤ r < B; one size x
    that A holds with a unit coefficient is solved for (x = (q·B + r − rest)/±1). With
    OH = ⌊(H + 2P − K)/S⌋ + 1, the room left after the last window, H + 2P − 1 −
    ((OH − 1)·S + K − 1), becomes r. Returns (expression, {q, r: None}, {x: its formula,
    r: B}) for turning a counterexample back into sizes, or None when a derived size has
    another form."""
    extra, back = {}, {}
    derived = {spec.dim_symbols[n]: f for n, f in spec.derived.items()}
    for _ in range(len(derived) + 1):
        found = sorted(expr.free_symbols & derived.keys(), key=str)
        if not found:
            return expr, extra, back
        sym = found[0]
        formula = derived[sym]
        floors = list(formula.atoms(sp.floor))
        if len(floors) > 1:
            return None
        num, den = (floors[0].args[0].as_numer_denom() if floors
                    else (formula - 1, sp.Integer(1)))
        q = sp.Symbol(f"{sym.name}_q", integer=True, nonnegative=True)
        r = sp.Symbol(f"{sym.name}_r", integer=True, nonnegative=True)
        rest = formula.xreplace({floors[0]: q}) if floors else 1 + q
        num = sp.expand(num)
        solved = None
        for x in sorted(num.free_symbols - derived.keys(), key=str):
            coeff = num.coeff(x)
            if coeff in (1, -1) and x not in sp.expand(num - coeff * x).free_symbols:
                solved = x, sp.expand((q * den + (r if den != 1 else 0) - (num - coeff * x))
                                      / coeff)
                break
        if solved is None:
            return None
        x, value = solved
        expr = sp.expand(expr.xreplace({sym: rest}).xreplace({x: value}))
        back = {k: sp.expand(v.xreplace({x: value})) for k, v in back.items()}
        back[x] = value
        extra[q] = None
        if den != 1:
            extra[r] = None
            back[r] = den
    return None


def _shifted(spec: Spec, expr: sp.Expr, extra=()):
    """``expr`` over non-negative offsets D' = D − min(D); None if a symbol has no known sign.

    Returns (the shifted expression, offsets, {offset: (symbol, its minimum)})."""
    offsets, subs = {}, {}
    hypers = {h.symbol for h in spec.hypers.values()}
    for sym in sorted(expr.free_symbols, key=str):
        if sym in extra:
            low = 0  # a quotient or remainder of a derived size
        elif sym in spec.dim_symbols.values():
            low = _least(spec, sym)
        elif sym in hypers and sym.is_nonnegative:
            low = 0  # a hyper-parameter declared positive (or ≥ 0): only its sign is known
        else:
            return None
        prime = sp.Symbol(f"{sym.name}_off", integer=True, nonnegative=True)
        subs[sym] = low + prime
        offsets[prime] = (sym, low)
    return sp.expand(expr.xreplace(subs)), list(offsets), offsets


def _nonnegative(spec: Spec, expr: sp.Expr):
    """(True, None) if ``expr`` ≥ 0 for all sizes; (False, sizes) with sizes where it is
    negative; (None, None) when neither could be shown."""
    eliminated = _eliminate_derived(spec, sp.sympify(expr))
    if eliminated is None:
        return None, None
    expr, extra, back = eliminated
    shifted = _shifted(spec, expr, extra)
    if shifted is None:
        return None, None
    value, primes, offsets = shifted
    if value.is_number:
        return (True, None) if value >= 0 else (False, {})
    coeffs = sp.Poly(value, *primes).coeffs()
    if all(c.is_number and c >= 0 for c in coeffs):
        return True, None
    # fewer values per size when there are many sizes: at most about SEARCH_POINTS tries
    count = max(2, min(len(SEARCH_VALUES), int(SEARCH_POINTS ** (1 / len(primes)))))
    for point in itertools.product(SEARCH_VALUES[:count], repeat=len(primes)):
        at = dict(zip(primes, point, strict=True))
        if value.xreplace(at) < 0:
            sizes = {offsets[p][0]: offsets[p][1] + v for p, v in at.items()}
            if _sizes_back(spec, sizes, back, extra):
                return False, {k: v for k, v in sizes.items() if k not in extra}
    return None, None


def _sizes_back(spec: Spec, sizes: dict, back: dict, extra) -> bool:
    """Fill in the sizes solved for by :func:`_eliminate_derived` (other sizes at their
    least); False when they are not sizes (below their minimum, or a remainder not below
    its divisor)."""
    for value in back.values():
        for sym in value.free_symbols - sizes.keys() - back.keys():
            sizes[sym] = 0 if sym in extra else _least(spec, sym)
    for x, value in back.items():
        value = sp.sympify(value.xreplace(sizes))
        if not value.is_number:
            return False
        if x in spec.dim_symbols.values():
            if value < _least(spec, x):
                return False
            sizes[x] = int(value)
        elif sizes.get(x, 0) >= value:  # a remainder: r < B
            return False
    return all(int(sp.sympify(f.xreplace(sizes))) >= 1 for f in
               (spec.derived[n] for n in spec.derived)
               if f.free_symbols <= sizes.keys())


def _sign(spec: Spec, coeff: sp.Expr) -> int | None:
    if _nonnegative(spec, coeff)[0]:
        return 1
    if _nonnegative(spec, -coeff)[0]:
        return -1
    return None


def _check_range(spec: Spec, name: str, idx: tuple, axis: int, line) -> None:
    """Refuse an access whose affine index can leave [0, size) of its axis."""
    ix = sp.expand(sp.sympify(idx[axis]))
    size = spec.tensors[name].dims[axis]
    access = f"{name}[{', '.join(str(i) for i in idx)}]"
    indices = sorted(ix.free_symbols & set(spec.index_dims), key=str)
    least = greatest = ix.xreplace({i: 0 for i in indices})
    at_least, at_greatest = {}, {}
    for i in indices:
        coeff = ix.coeff(i)
        last = spec.index_dims[i] - 1
        sign = _sign(spec, coeff)
        if sign is None:
            raise spec.error(f"cannot tell whether `{access}` stays inside `{name}`: the sign "
                             f"of `{coeff}`, the step of index `{i}`, is unknown", line,
                             "write the index with steps that are sizes, numbers or positive "
                             "hyper-parameters")
        if sign > 0:
            greatest += coeff * last
            at_least[i], at_greatest[i] = 0, last
        else:
            least += coeff * last
            at_least[i], at_greatest[i] = last, 0
    checks = ((least, at_least, "below 0"), (size - 1 - greatest, at_greatest,
                                             f"past the last entry {size - 1}"))
    for gap, where, side in checks:
        ok, sizes = _nonnegative(spec, gap)
        if ok:
            continue
        bound = least if gap is least else greatest
        place = ", ".join(f"{i} = {v}" for i, v in where.items())
        if ok is None:
            at = f" ({place})" if place else ""
            raise spec.error(f"cannot tell whether `{access}` stays inside `{name}`: index "
                             f"`{idx[axis]}` of axis {axis} reaches {sp.factor(bound)}{at}, "
                             f"the axis has size {size}", line,
                             "declare the axis with a size that covers the index, like "
                             "(T - 1)*S + K for t*S + k, or state a minimum with "
                             "spec.min_size(...); " + OUTSIDE_HINT)
        example = ", ".join(f"{k} = {v}" for k, v in sorted(sizes.items(), key=str))
        when = "; ".join(x for x in (place, example) if x)
        when = f" ({when})" if when else ""
        hint = OUTSIDE_HINT if gap is least else (
            "give the axis a size that covers the index, like (T - 1)*S + K for t*S + k "
            "(strides are sizes), or derive the output size from the input's: "
            "OH = spec.size(\"OH\", (H + 2*P - K) // S + 1); " + OUTSIDE_HINT)
        raise spec.error(f"`{access}` can read outside `{name}`: index `{idx[axis]}` of axis "
                         f"{axis} goes {side} (it reaches {sp.factor(bound)}{when}; the axis "
                         f"has size {size})", line, hint)


def validate(spec: Spec) -> None:
    """Check what the spec declares; raise :class:`SpecError` at the first problem."""
    if not any(s.kind == "output" for s in spec.statements):
        raise spec.error("the spec declares no output", None,
                         'add one: spec.output("Y", [n, d], ...)')
    known = {t.symbol for t in spec.hypers.values()} | set(spec.index_dims) \
        | set(spec.dim_symbols.values())
    for st in spec.statements:
        for base in _bare_tensors(st.rhs):
            name = base.label.name
            idx = ", ".join(str(i) for i in st.lhs) or "..."
            raise spec.error(f"`{name}` is used without indices in `{st.target}`", st.line,
                             f"index it, e.g. {name}[{idx}]")
        _check_functions(spec, st.rhs, st.line)
        _check_reductions(spec, st.rhs, set(st.lhs), st.line)
        guarded = isinstance(st.rhs, Padded)  # spec.pad: reads outside X read the fill
        for name, idx in accesses(st.rhs, spec):
            _check_access(spec, name, idx, st.line, guarded)
        free = free_indices(st.rhs, spec)
        extra = free - set(st.lhs)
        if extra:
            i = sorted(extra, key=str)[0]
            lhs = ", ".join(str(x) for x in (*st.lhs, i))
            raise spec.error(f"free index `{i}` on the right of `{st.target}` is not bound on "
                             "the left", st.line,
                             f"sum over it with Sum(..., {i}) or add it to the left: "
                             f"[{lhs}]")
        for sym in st.rhs.free_symbols:
            if isinstance(sym, sp.Symbol) and sym not in known and sym.name not in spec.tensors:
                raise spec.error(f"unknown symbol `{sym}` in `{st.target}`", st.line,
                                 "declare it with spec.hyper, spec.dims or spec.indices")
    for fact in spec.facts:
        for name, idx in accesses(fact.lhs, spec):
            _check_access(spec, name, idx, fact.line)
