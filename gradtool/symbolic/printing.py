"""How derived expressions read: index notation, LaTeX and, where one exists, matrix notation."""

from __future__ import annotations

import functools

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from gradtool.symbolic.ir import ArgMaxMask, Sigmoid, access_indices, access_name

# a name that is a Greek letter's prints as the letter (a hyper-parameter ``delta``, Huber's δ,
# is δ, never the word "delta" beside a Kronecker δ(c,j)); ``lambda_`` because ``lambda`` is
# a Python keyword
GREEK_LETTERS = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda_": "λ", "lam": "λ", "mu": "μ",
    "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ",
    "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω"}
GREEK = {**GREEK_LETTERS, "eps": "ε", "xhat": "x̂", "yhat": "ŷ", "var": "σ²", "std": "σ"}


def display_name(name: str) -> str:
    return GREEK.get(name, name)


# -- bound-index names ---------------------------------------------------------------------

def prettify(expr: sp.Expr) -> sp.Expr:
    """Rename engine-made bound indices (``d_8``) to what a person writes (``d'``)."""
    return _pretty(expr, {s.name for s in expr.free_symbols})


def _pretty(e, taken):
    if isinstance(e, sp.Sum):
        body, limits = e.function, []
        for var, lo, hi in e.limits:
            base = var.name.rstrip("'0123456789_") or "i"
            inner = {s.name for s in body.free_symbols} - {var.name}
            name = base
            while name in taken or name in inner:
                name += "'"
            new = sp.Symbol(name, integer=True)
            body = body.xreplace({var: new})
            limits.append((new, lo, hi))
            taken = taken | {name}
        return sp.Sum(_pretty(body, taken), *limits)
    if not e.args or isinstance(e, (sp.Indexed, sp.IndexedBase)):
        return e
    return e.func(*[_pretty(a, taken) for a in e.args])


def factored(expr: sp.Expr) -> sp.Expr:
    """Sums over one range merged, small polynomials factored (see :func:`present`)."""
    return _factor_polynomials(_merge_sums(expr))


def present(expr: sp.Expr) -> sp.Expr:
    """The form shown to people: common factors pulled out, small polynomials factored
    (``(1 − Y²)·(1 − t0²)``, not ``Y²t0² − Y² − t0² + 1``), readable bound indices."""
    return prettify(_factor_polynomials(_merge_sums(sp.factor_terms(expr))))


def _merge_sums(e):
    """``8·Σ_e'(a) − 8·Σ_e'(b)`` → ``8·Σ_e'(a − b)``: sums over the same range whose
    coefficients are numbers or sizes become one sum (whose body may then factor). A
    coefficient that reads a tensor stays outside: x̂[n,d]·Σ_d'(…) is not Σ_d'(x̂[n,d]·…)."""
    if not e.args or isinstance(e, (sp.Indexed, sp.IndexedBase)):
        return e
    args = [_merge_sums(a) for a in e.args]
    e = e.func(*args) if args != list(e.args) else e
    if not isinstance(e, sp.Add):
        return e
    groups, others = {}, []
    for term in e.args:
        factors = sp.Mul.make_args(term)
        sums = [f for f in factors if isinstance(f, sp.Sum)]
        coeff = sp.Mul(*[f for f in factors if not isinstance(f, sp.Sum)])
        if len(sums) != 1 or coeff.has(sp.Indexed) or len(sums[0].limits) != 1:
            others.append(term)
            continue
        (var, lo, hi), = sums[0].limits
        # a sum is merged only with sums of the same shape: G·Vᵀ (over t, s) and the row sum
        # of G ⊙ O (over t, broadcast along s) stay two terms
        shape = frozenset(s_ for s_ in sums[0].free_symbols if s_.is_integer)
        groups.setdefault((lo, hi, shape), []).append((coeff, var, sums[0].function))
    if not any(len(g) > 1 for g in groups.values()):
        return e
    out = list(others)
    for (lo, hi, _), members in groups.items():
        if len(members) == 1:
            coeff, var, body = members[0]
            out.append(coeff * sp.Sum(body, (var, lo, hi)))
            continue
        var = members[0][1]
        scale = abs(functools.reduce(sp.gcd, [c.as_coeff_Mul()[0] for c, _, _ in members]))
        body = sp.Add(*[(c / scale) * b.xreplace({v: var}) for c, v, b in members])
        body = _factor_polynomials(sp.factor_terms(body))
        if isinstance(body, sp.Add):  # nothing in common: the sums stay split
            out += [c * sp.Sum(b, (v, lo, hi)) for c, v, b in members]
            continue
        outside = sp.Mul(*[f for f in sp.Mul.make_args(body) if var not in f.free_symbols])
        body = sp.Mul(*[f for f in sp.Mul.make_args(body) if var in f.free_symbols])
        out.append(scale * outside * sp.Sum(body, (var, lo, hi)))  # constants stay outside
    return sp.Add(*out)


_FACTOR_TERMS = 24  # larger sums are left as they are: factoring them costs more than it shows
# and so are sums of more operations than this: multivariate factoring grows fast with the
# number of distinct factors (the built-in specs factor sums of at most ~50 operations)
_FACTOR_OPS = 120


def _conjugate(f, g) -> bool:
    """(x − c)·(x + c): two binomials whose product has two terms."""
    if not (isinstance(f, sp.Add) and isinstance(g, sp.Add) and len(f.args) == len(g.args) == 2):
        return False
    product = sp.expand(f * g)
    return isinstance(product, sp.Add) and len(product.args) == 2


def _factor_polynomials(e):
    """Factor each sum of products of tensor entries that factors. Besides being what a
    textbook prints, a factored 1 − tanh² keeps its precision where tanh saturates (an
    expanded X − tanh²·X is the difference of two nearly equal terms)."""
    if isinstance(e, sp.Sum):
        return sp.Sum(_factor_polynomials(e.function), *e.limits)
    if not e.args or isinstance(e, (sp.Indexed, sp.IndexedBase, ArgMaxMask,
                                    sp.KroneckerDelta, sp.Piecewise)) or \
            isinstance(e, sp.Function):
        return e
    args = [_factor_polynomials(a) for a in e.args]
    e = e.func(*args) if args != list(e.args) else e
    if not isinstance(e, sp.Add):
        return e
    special = (sp.Sum, ArgMaxMask, sp.KroneckerDelta, sp.Piecewise)
    plain = [t for t in e.args if not t.has(*special)]
    if len(plain) < 2 or len(plain) > _FACTOR_TERMS:
        return e
    rest = [t for t in e.args if t.has(*special)]
    part = sp.Add(*plain)
    if sp.count_ops(part) > _FACTOR_OPS:
        return e
    factored = _factor_one(part)
    return e if factored is part else sp.Add(factored, *rest)


def _factor_one(e):
    """``e`` factored, with conjugate pairs joined and what is left grouped by common
    factors, or ``e`` itself if that is not shorter."""
    factored = sp.factor(e)
    if not isinstance(factored, sp.Mul):
        return _group(e)
    factors, sign = [], 1
    rest = list(sp.Mul.make_args(factored))
    while rest:  # (x − c)(x + c) → x² − c², then 1 − x² rather than x² − 1
        f = rest.pop(0)
        mate = next((g for g in rest if _conjugate(f, g)), None)
        if mate is not None:
            rest.remove(mate)
            f = sp.expand(f * mate)
        if isinstance(f, sp.Add) and f.as_coeff_Add()[0] < 0:  # x² − 1 → −(1 − x²)
            sign, f = -sign, -f
        if f.is_Number and f < 0:
            sign, f = -sign, -f
        factors.append(f)
    if sign < 0:  # −2·(T − X) → 2·(X − T): a sum without a constant term takes the sign
        k = next((k for k, f in enumerate(factors)
                  if isinstance(f, sp.Add) and f.as_coeff_Add()[0] == 0), None)
        if k is not None:
            sign, factors[k] = 1, -factors[k]
    factors = [_group(f) if isinstance(f, sp.Add) else f for f in factors]
    out = sign * sp.Mul(*factors)
    return out if sp.count_ops(out) <= sp.count_ops(e) else e


def _monomial(term) -> dict:
    """A product as {base: positive integer exponent}, numbers left out."""
    out = {}
    for f in sp.Mul.make_args(term):
        base, exp = f.as_base_exp()
        if f.is_Number or not (exp.is_Integer and exp > 0):
            continue
        out[base] = out.get(base, 0) + int(exp)
    return out


def _group(e):
    """An irreducible sum with its terms grouped by their largest shared factor:
    tanh + X·σ − X·σ·tanh² → tanh + X·σ·(1 − tanh²), 1 + a − a·σ → 1 + a·(1 − σ).
    Returns ``e`` where grouping does not shorten it."""
    if not isinstance(e, sp.Add) or len(e.args) < 3:
        return e
    terms = list(e.args)
    monos = [_monomial(t) for t in terms]
    best = None
    for base in sorted(set().union(*monos), key=sp.default_sort_key):
        members = [k for k, m in enumerate(monos) if base in m]
        if len(members) < 2 or len(members) == len(terms):
            continue
        common = sp.Mul(*[b ** min(monos[k].get(b, 0) for k in members)
                          for b in sorted(monos[members[0]], key=sp.default_sort_key)])
        score = (len(members), sp.count_ops(common) + len(sp.Mul.make_args(common)))
        if best is None or score > best[0]:
            best = (score, common, members)
    if best is None:
        return e
    _, common, members = best
    inner = _factor_polynomials(sp.Add(*[sp.cancel(terms[k] / common) for k in members]))
    others = _group(sp.Add(*[t for k, t in enumerate(terms) if k not in members]))
    out = common * inner + others
    return out if _weight(out) < _weight(e) else e


def _weight(e) -> tuple[int, int]:
    """(reads of tensors and scalars, operations): what grouping a sum should lessen."""
    reads = sum(1 for n in sp.preorder_traversal(e)
                if isinstance(n, sp.Indexed) or (isinstance(n, sp.Symbol) and not n.is_integer))
    return reads, sp.count_ops(e)


# -- plain text (index notation) ---------------------------------------------------------------

class _PositiveFirst:
    """A sum prints a positive term first, as a textbook writes it: ``X − T``, not
    ``−T + X``; ``A·(G·V − Σ_j G·O)``. The other terms keep SymPy's order."""

    def _as_ordered_terms(self, expr, order=None):
        terms = list(super()._as_ordered_terms(expr, order=order))
        first = next((k for k, t in enumerate(terms) if not t.could_extract_minus_sign()), 0)
        return [terms[first]] + terms[:first] + terms[first + 1:]


class IndexPrinter(_PositiveFirst, StrPrinter):
    """``Σ_d'(G[n,d']·γ[d'])``, ``δ(c,j)``, ``[X[n,d] > 0]``; names like gamma print as γ."""

    printmethod = "_gradtool_str"  # SymPy's own Indexed._sympystr would win otherwise

    def _print_Symbol(self, expr):
        return display_name(expr.name)

    def _print_Indexed(self, expr):
        idx = ",".join(self._print(i) for i in expr.indices)
        return f"{display_name(expr.base.label.name)}[{idx}]"

    def _print_Sum(self, expr):
        over = ",".join(self._print(lim[0]) for lim in expr.limits)
        return f"Σ_{over}({self._print(expr.function)})"

    def _print_KroneckerDelta(self, expr):
        return f"δ({self._print(expr.args[0])},{self._print(expr.args[1])})"

    def _print_MaxOver(self, expr):
        over = ",".join(self._print(i) for i in expr.over)
        return f"max_{over}({self._print(expr.body)})"

    def _print_Heaviside(self, expr):
        return f"[{self._print(expr.args[0])} > 0]"

    def _print_floor(self, expr):
        return f"⌊{self._print(expr.args[0])}⌋"

    def _print_Padded(self, expr):
        fill = "-∞" if expr.fill == -sp.oo else self._print(expr.fill)
        return f"{self._print(expr.access)} (inside {expr.access.base.label.name}, else {fill})"

    def _print_Sigmoid(self, expr):
        return f"σ({self._print(expr.args[0])})"

    def _print_ArgMaxMask(self, expr):
        return f"[{self._print(expr.args[0])} = {self._print(expr.args[1])}]"

    def _print_Piecewise(self, expr):
        parts = []
        for value, cond in expr.args:
            v = self._print(value)
            parts.append(v if cond == sp.true else f"{v} if {self._print(cond)}")
        return "{" + "; else ".join(parts) + "}"

    def _print_Mul(self, expr):
        return super()._print_Mul(expr).replace("**", "^").replace("*", "·")

    def _print_Float(self, expr):
        """A float as Python writes it (0.5, 1.0), not SymPy's 15 digits (0.500000000000000);
        one that Python's shortest form cannot hold keeps SymPy's digits."""
        value = float(expr)
        return repr(value) if sp.Float(repr(value), precision=expr._prec) == expr else \
            super()._print_Float(expr)

    def _print_Pow(self, expr, rational=False):
        return super()._print_Pow(expr, rational).replace("**", "^")


def text(expr: sp.Expr) -> str:
    out = IndexPrinter().doprint(expr)
    return out.replace("**", "^").replace("*", "·")


# -- LaTeX ----------------------------------------------------------------------------------

LATEX_NAMES = {**{k: "\\" + k.rstrip("_") for k in GREEK_LETTERS},
               "lam": r"\lambda", "eps": r"\epsilon", "xhat": r"\hat{x}", "yhat": r"\hat{y}",
               "var": r"\sigma^2", "std": r"\sigma", "rstd": r"\mathrm{rstd}"}


def latex_name(name: str) -> str:
    if name.startswith("g_") and len(name) > 2:  # an adjoint: g_{\hat{x}}
        return "g_{" + latex_name(name[2:]) + "}"
    if name in LATEX_NAMES:
        return LATEX_NAMES[name]
    if len(name) > 1 and "'" not in name:
        return r"\mathrm{" + name.replace("_", r"\_") + "}"
    return name


def latex_access(name: str, indices) -> str:
    """A tensor entry with its subscript where people write it: ``X_{n,d}``,
    ``\\sigma^2_{n}`` (not ``{\\sigma^2}_{n}``), ``g_{\\mathrm{rstd},n}`` for the adjoint
    of rstd at n; a scalar (no indices) is its name alone."""
    base = latex_name(name)
    idx = ",".join(str(i) for i in indices)
    if not idx:
        return base
    if base.startswith("g_{") and base.endswith("}"):  # the adjoint's name and the indices
        return f"{base[:-1]},{idx}}}"
    if base.endswith("}") and "_" in base and not base.startswith("\\"):
        return f"{{{base}}}_{{{idx}}}"  # a name that already has a subscript
    return f"{base}_{{{idx}}}"


class IndexLatexPrinter(_PositiveFirst, LatexPrinter):
    def _print_Symbol(self, expr, style="plain"):
        if expr.is_integer and not expr.is_positive:  # an index: d' stays d'
            return expr.name
        return latex_name(expr.name)

    def _print_Indexed(self, expr):
        return latex_access(expr.base.label.name, [self._print(i) for i in expr.indices])

    def _print_Pow(self, expr, exp=None):
        """``\\left(\\sigma^2_{n}\\right)^{2}``: a base that carries its own superscript is
        bracketed before it is raised (``\\sigma^2_{n}^{2}`` is a double superscript)."""
        out = super()._print_Pow(expr, exp) if exp is not None else super()._print_Pow(expr)
        if isinstance(expr.base, (sp.Indexed, sp.Symbol)):
            base = self._print(expr.base)
            if "^" in base and out.startswith(base + "^"):
                out = rf"\left({base}\right)" + out[len(base):]
        return out

    def _print_Sum(self, expr):
        over = ",".join(self._print(lim[0]) for lim in expr.limits)
        body = self._print(expr.function)
        if isinstance(expr.function, sp.Add):
            body = rf"\left({body}\right)"
        return rf"\sum_{{{over}}} {body}"

    def _print_MaxOver(self, expr):
        over = ",".join(self._print(i) for i in expr.over)
        return rf"\max_{{{over}}} {self._print(expr.body)}"

    def _print_Heaviside(self, expr, pow=None):
        return rf"\left[{self._print(expr.args[0])} > 0\right]"

    def _print_Padded(self, expr):
        name = latex_name(expr.access.base.label.name)
        return (rf"{self._print(expr.access)}\ \text{{inside }} {name}"
                rf"\text{{, else }} {self._print(expr.fill)}")

    def _print_Sigmoid(self, expr, exp=None):
        out = rf"\sigma\left({self._print(expr.args[0])}\right)"
        return out if exp is None else f"{out}^{{{exp}}}"

    def _print_ArgMaxMask(self, expr):
        return rf"\left[{self._print(expr.args[0])} = {self._print(expr.args[1])}\right]"


def latex(expr: sp.Expr) -> str:
    return IndexLatexPrinter().doprint(expr)


ALIGN_WIDTH = 100  # a right-hand side longer than this is broken over lines


def latex_equation(lhs: str, rhs: str, width: int = ALIGN_WIDTH) -> str:
    """``lhs = rhs``; a long one as an ``aligned`` block broken before top-level ``+``/``-``
    (those inside one pair of ``\\left( … \\right)`` too, whose delimiters then become
    ``\\Bigl( … \\Bigr)``, as ``\\left``/``\\right`` cannot span lines)."""
    if len(rhs) <= width:
        return f"{lhs} = {rhs}"
    cuts, outer = _break_points(rhs)
    if not cuts:
        return f"{lhs} = {rhs}"
    lines, start, last = [], 0, 0
    for cut in cuts + [len(rhs)]:
        if cut - start > width and last > start:
            lines.append(rhs[start:last])
            start = last
        last = cut
    lines.append(rhs[start:])
    if len(lines) == 1:
        return f"{lhs} = {rhs}"
    if outer is not None:  # the broken \left( … \right) pair
        lines = [_big_delimiters(line, outer, start_at) for line, start_at in
                 zip(lines, _offsets(lines), strict=True)]
    body = " \\\\\n".join(f"{lhs} ={{}}& {line.strip()}" if not k else
                            rf"&\quad {line.strip()}" for k, line in enumerate(lines))
    return "\\begin{aligned}\n" + body + "\n\\end{aligned}"


def _offsets(lines: list[str]) -> list[int]:
    out, at = [], 0
    for line in lines:
        out.append(at)
        at += len(line)
    return out


def _big_delimiters(line: str, outer: tuple[int, int, str, str], at: int) -> str:
    """Replace the ``\\left(`` at ``outer[0]`` and the ``\\right)`` at ``outer[1]`` (positions
    in the whole right-hand side; ``at`` is where ``line`` starts) by ``\\Bigl(``,
    ``\\Bigr)``."""
    (lo, hi, open_, close) = outer
    end = at + len(line)
    if at <= hi < end:
        k = hi - at
        line = line[:k] + r"\Bigr" + close + line[k + len(r"\right") + len(close):]
    if at <= lo < end:
        k = lo - at
        line = line[:k] + r"\Bigl" + open_ + line[k + len(r"\left") + len(open_):]
    return line


def _break_points(rhs: str):
    """Positions of `` + `` and `` - `` outside braces and ``\\left…\\right`` pairs or, if
    there are none, inside the single pair that holds the whole sum; and that pair as
    (position of ``\\left``, position of ``\\right``, opening, closing delimiter)."""
    depth, pairs, stack = 0, [], []
    found = {0: [], 1: []}
    k = 0
    while k < len(rhs):
        if rhs.startswith(r"\left", k) and not rhs[k + 5:k + 6].isalpha():
            stack.append((k, rhs[k + 5]))
            k += 6
            continue
        if rhs.startswith(r"\right", k) and not rhs[k + 6:k + 7].isalpha():
            lo, open_ = stack.pop()
            pairs.append((lo, k, open_, rhs[k + 6], len(stack)))
            k += 7
            continue
        ch = rhs[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0 and len(stack) <= 1 and rhs[k - 1:k + 2] in (" + ", " - ") and k > 1:
            found[len(stack)].append((k - 1, stack[-1][0] if stack else None))
        k += 1
    if found[0]:
        return [c for c, _ in found[0]], None
    owners = {owner for _, owner in found[1]}
    if len(owners) != 1:
        return [], None
    (owner,) = owners
    pair = next(p for p in pairs if p[0] == owner and p[4] == 0)
    return [c for c, _ in found[1]], pair[:4]


# -- matrix notation ----------------------------------------------------------------------

class _Notation:
    """How the matrix form is spelled: as text (``Gᵀ X``, ``S ⊙ (G − …)``) or LaTeX
    (``G^{\\top} X``, ``S \\odot \\left(G - …\\right)``)."""

    def __init__(self, latex_form: bool):
        self.tex = latex_form
        self.odot = r" \odot " if latex_form else " ⊙ "
        self.times = r" \cdot " if latex_form else "·"
        self.minus = " - " if latex_form else " − "

    def name(self, name: str) -> str:
        return latex_name(name) if self.tex else display_name(name)

    def transposed(self, shown: str) -> str:
        if not self.tex:
            return shown + "ᵀ"
        return (f"{{{shown}}}" if "^" in shown or "_" in shown else shown) + r"^{\top}"

    def scalar(self, e) -> str:
        return latex(e) if self.tex else text(e)

    def wrap(self, s: str) -> str:
        if self.tex:
            plain = s.startswith(r"\left(") and s.endswith(r"\right)") \
                and s.count(r"\left(") == 1
            ops = (" + ", " - ", r"\odot", r"\cdot", "/")
            return s if plain or not any(op in s for op in ops) else rf"\left({s}\right)"
        if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
            return s
        return f"({s})" if any(op in s for op in " +−-⊙/·") else s

    def reciprocal(self, s: str) -> str:
        return rf"\frac{{1}}{{{s}}}" if self.tex else f"1/{self.wrap(s)}"

    def sqrt(self, s: str) -> str:
        return rf"\sqrt{{{s}}}" if self.tex else f"√{self.wrap(s)}"

    def power(self, s: str, exp) -> str:
        if self.tex:
            return f"{self.wrap(s)}^{{{latex(exp)}}}"
        shown = text(exp)
        return f"{self.wrap(s)}^" + (f"({shown})" if isinstance(exp, sp.Add) else shown)

    def fraction(self, num: str, den: str) -> str:
        if not self.tex:
            return f"{num}/{self.wrap(den)}"
        if num.startswith(r"\left(") and num.endswith(r"\right)") \
                and num.count(r"\left(") == 1:  # a fraction bar needs no brackets
            num = num[len(r"\left("):-len(r"\right)")]
        return rf"\frac{{{num}}}{{{den}}}"

    def total(self, var, inner: str) -> str:
        if self.tex:
            return rf"\sum_{{{latex(var)}}} {inner}"
        return f"Σ_{text(var)}({inner})" if self.wrap(inner) != inner \
            else f"Σ_{text(var)} {inner}"

    def positive(self, s: str) -> str:
        return rf"\left[{s} > 0\right]" if self.tex else f"[{s} > 0]"

    def function(self, name: str, s: str) -> str:
        if not self.tex:
            return f"{name}({s})"
        head = {"σ": r"\sigma", "exp": r"\exp", "log": r"\log", "tanh": r"\tanh",
                "sin": r"\sin", "cos": r"\cos"}.get(name, rf"\operatorname{{{name}}}")
        return rf"{head}\left({s}\right)"


TEXT, LATEX = _Notation(False), _Notation(True)


def matrix(expr: sp.Expr, free: tuple, notation: _Notation = TEXT) -> str | None:
    """``G W``, ``Gᵀ X``, ``Σ_n G``, ``S ⊙ (G − …)`` for results of rank ≤ 2, else None.

    ``⊙`` is the element-wise product with NumPy broadcasting; ``Σ_k`` sums over axis k.
    """
    if len(free) > 2:
        return None
    try:
        return _mat(present(expr), tuple(free), notation)
    except _NoMatrixFormError:
        return None


def matrix_latex(expr: sp.Expr, free: tuple) -> str | None:
    """The matrix form in LaTeX: ``G W``, ``G^{\\top} X``, ``\\sum_{n} G``."""
    return matrix(expr, free, LATEX)


class _NoMatrixFormError(Exception):
    pass


def _label(node, free, nt: _Notation) -> str:
    """A tensor's name; ``ᵀ`` when a 2-d access runs against the result's axes."""
    idx = access_indices(node)
    name = nt.name(access_name(node))
    if any(not isinstance(i, sp.Symbol) for i in idx) or len(set(idx)) != len(idx):
        raise _NoMatrixFormError
    if free is not None and len(free) == 2 and tuple(idx) == tuple(reversed(free)):
        return nt.transposed(name)
    return name


def _mat(e, free, nt: _Notation) -> str:
    if isinstance(e, sp.Indexed):
        return _label(e, free, nt)
    if e.is_Number or isinstance(e, sp.Symbol):
        return nt.scalar(e)
    if isinstance(e, sp.Add):
        terms = sorted(e.args, key=lambda a: a.could_extract_minus_sign())
        out = _mat(terms[0], free, nt)
        for a in terms[1:]:
            s = _mat(a, free, nt)
            out += f"{nt.minus}{s[1:]}" if s.startswith("-") else f" + {s}"
        return out
    if isinstance(e, sp.Mul):
        return _mat_mul(e, free, nt)
    if isinstance(e, sp.Pow):
        base = _mat(e.base, free, nt)
        if e.exp == -1:
            return nt.reciprocal(base)
        if e.exp == sp.Rational(1, 2):
            return nt.sqrt(base)
        return nt.power(base, e.exp)
    if isinstance(e, sp.Sum):
        return _mat_sum(e, free, nt)
    if isinstance(e, sp.Heaviside):
        return nt.positive(_mat(e.args[0], free, nt))
    if isinstance(e, sp.Function) and not isinstance(e, ArgMaxMask) and len(e.args) == 1:
        name = "σ" if isinstance(e, Sigmoid) else type(e).__name__
        return nt.function(name, _mat(e.args[0], free, nt))
    raise _NoMatrixFormError


def _is_scalar(f) -> bool:
    return not f.has(sp.Indexed)


def _mat_mul(e, free, nt: _Notation) -> str:
    coeff, factors = e.as_coeff_mul()
    num = [f for f in factors if not (isinstance(f, sp.Pow) and f.exp.is_negative)]
    den = [1 / f for f in factors if isinstance(f, sp.Pow) and f.exp.is_negative]

    def join(fs):
        scalars = [nt.wrap(_mat(f, free, nt)) for f in fs if _is_scalar(f)]
        arrays = [nt.wrap(_mat(f, free, nt)) if isinstance(f, (sp.Add, sp.Sum))
                  else _mat(f, free, nt) for f in fs if not _is_scalar(f)]
        out = nt.odot.join(arrays)
        return nt.times.join(scalars + ([out] if out else [])) or "1"

    joined = join(num)
    if den:
        joined = nt.fraction(joined, join(den))
    if coeff == -1:
        return "-" + joined
    if coeff != 1:
        return f"{nt.scalar(coeff)}{nt.times}{joined}"
    return joined


def _mat_sum(e: sp.Sum, free, nt: _Notation) -> str:
    (var, _, _), *more = e.limits
    if more or free is None:
        raise _NoMatrixFormError
    body = e.function
    factors = sp.Mul.make_args(body)
    reads = [f for f in factors if isinstance(f, sp.Indexed)]
    if any(f.has(var) for f in factors if not isinstance(f, sp.Indexed)):
        raise _NoMatrixFormError
    if len(free) == 2:
        product = _mat_product(reads, var, free, nt)
        if product is not None:
            return product
    # Σ_k over one axis of an element-wise expression; if k pairs with two different free
    # indices in different tensors (A[i,k]·K[k,d]) it is a contraction, not element-wise
    with_var = [set(r.indices) - {var} for r in reads if var in r.indices]
    union = set().union(*with_var) if with_var else set()
    if with_var and not any(union <= s_ for s_ in with_var):
        raise _NoMatrixFormError
    return nt.total(var, _mat(body, None, nt))


def _mat_product(reads, var, free, nt: _Notation) -> str | None:
    """Σ_k A[i,k]·B[k,j] (each side possibly an element-wise product): ``A B``."""
    left = [r for r in reads if set(r.indices) == {free[0], var}]
    right = [r for r in reads if set(r.indices) == {var, free[1]}]
    if not left or not right or len(left) + len(right) != len(reads):
        return None

    def side(group, first):
        orders = {tuple(r.indices) for r in group}
        if len(orders) != 1:
            return None
        (order,) = orders
        names = nt.odot.join(nt.name(access_name(r)) for r in group)
        names = nt.wrap(names) if len(group) > 1 else names
        return names if order[0] == first else nt.transposed(names)

    a, b = side(left, free[0]), side(right, var)
    return None if a is None or b is None else f"{a} {b}"
