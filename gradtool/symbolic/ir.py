"""SSA form: one statement per tensor, each element-wise or a single reduction.

Every statement reads ``T[lhs] = R_over body`` where ``R`` is nothing (element-wise with
broadcasting), a sum (reductions and contractions alike: a contraction is a sum of products), or
a max (pooling). ``body`` holds no reduction: inner ``Sum``/``Max`` are lifted into statements of
their own. Sums in derived expressions are SymPy ``Sum`` nodes used only as containers; the index
algebra on them is gradtool's (see DESIGN.md for why ``Sum.doit()`` is not used).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import sympy as sp

from gradtool.spec.lang import MaxOver, Padded, Spec, SumOver

_counter = itertools.count(1)


class ArgMaxMask(sp.Function):
    """``ArgMaxMask(value, best, *over)``: 1 at the first position, in row-major order over
    the reduced indices ``over``, where ``value`` equals the reduced maximum ``best``; else 0.
    The adjoint of a Max reduction: each maximum's gradient goes to exactly one element (the
    one ``torch.nn.functional.max_pool2d`` and ``torch.max(dim)`` pick), so the gradients of
    a window always sum to the upstream gradient, ties or not. Without ``over`` it is the
    plain indicator ``[value = best]``."""

    nargs = None

    @property
    def over(self) -> tuple:
        return tuple(self.args[2:])

    def _sympystr(self, printer):
        value, best = (printer.doprint(a) for a in self.args[:2])
        return f"[{value} = {best}]"

    def _latex(self, printer):
        value, best = (printer._print(a) for a in self.args[:2])
        return rf"\left[{value} = {best}\right]"


class Unpad(sp.Function):
    """``Unpad(body, (hp, h, P), ...)``: ``body``, an array over the padded indices hp, read at
    hp = h + P for h over the source's axis: the slice of a padded tensor's adjoint at the
    positions of its source (``spec.pad``). Only the kernels use it: the derivation's closed
    form substitutes hp = h + P instead, which means the same."""

    nargs = None

    @property
    def body(self) -> sp.Expr:
        return self.args[0]

    @property
    def shifts(self) -> tuple:
        return tuple(tuple(t) for t in self.args[1:])

    def _sympystr(self, printer):
        at = ", ".join(f"{printer.doprint(hp)} = {printer.doprint(h + c)}"
                       for hp, h, c in self.shifts)
        return f"({printer.doprint(self.body)})[{at}]"


class Sigmoid(sp.Function):
    """The logistic function σ(u) = 1 / (1 + e^(−u)) as one named node, so that a derived form
    reads σ(X) and σ(X)·(1 − σ(X)) where a textbook does, not e^X/(1 + e^X).

    Its derivative is σ·(1 − σ); the engine names it (``simplify.name_logistic``), the
    spec language's ``sigmoid`` still writes the quotient. Evaluates with torch.sigmoid and
    scipy.special.expit, which do not overflow where e^(−u) does."""

    nargs = 1

    @classmethod
    def eval(cls, u):
        if u.is_Number:
            return 1 / (1 + sp.exp(-u))
        return None

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, u, **kwargs):
        return 1 / (1 + sp.exp(-u))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_evalf(self, prec):
        return (1 / (1 + sp.exp(-self.args[0])))._eval_evalf(prec)

    def _sympystr(self, printer):
        return f"σ({printer.doprint(self.args[0])})"

    def _latex(self, printer, exp=None):
        out = rf"\sigma\left({printer._print(self.args[0])}\right)"
        return out if exp is None else f"{out}^{{{exp}}}"


@dataclass
class Assign:
    target: str
    lhs: tuple[sp.Symbol, ...]
    body: sp.Expr
    reduce: str | None = None  # None | "sum" | "max" | "pad" (body: a Padded read)
    over: tuple[sp.Symbol, ...] = ()
    line: int | None = None
    kind: str = "let"  # let | output | update | lifted

    def rhs(self, program: Program) -> sp.Expr:
        """The right-hand side as one expression (a SymPy Sum for a sum reduction)."""
        if self.reduce == "sum":
            return program.make_sum(self.body, self.over)
        if self.reduce == "max":
            return MaxOver(self.body, *self.over)
        return self.body


@dataclass
class Program:
    spec: Spec
    assigns: list[Assign]
    ranges: dict[sp.Symbol, sp.Expr] = field(default_factory=dict)  # index -> dimension

    def pad_widths(self, a: Assign) -> tuple[tuple[sp.Expr, sp.Expr], ...]:
        """(before, after) per axis of a ``pad`` statement: Xp[h] = X[h − before], and Xp's
        axis is X's plus both."""
        read = a.body.access
        source = self.spec.tensors[read.base.label.name].dims
        padded = self.spec.tensors[a.target].dims
        out = []
        for i, ix, small, big in zip(a.lhs, read.indices, source, padded, strict=True):
            before = sp.expand(i - ix)
            out.append((before, sp.expand(big - small - before)))
        return tuple(out)

    def by_target(self) -> dict[str, Assign]:
        return {a.target: a for a in self.assigns if a.kind != "update"}

    def access(self, name: str, idx) -> sp.Expr:
        tensor = self.spec.tensors[name]
        return tensor.base[tuple(idx)] if tensor.dims else sp.Symbol(name, real=True)

    # -- indices ----------------------------------------------------------------------------
    def fresh(self, like: sp.Symbol) -> sp.Symbol:
        """A new bound index over the same range as ``like`` (no declared name)."""
        base = like.name.rstrip("'0123456789_") or "i"
        declared = self.spec._names()
        name = f"{base}_{next(_counter)}"
        while name in declared:
            name = f"{base}_{next(_counter)}"
        sym = sp.Symbol(name, integer=True)
        self.ranges[sym] = self.ranges[like]
        return sym

    def make_sum(self, body: sp.Expr, over) -> sp.Expr:
        """Σ over ``over`` of ``body``, binding fresh indices so that nothing is captured."""
        expr = body
        for i in over:
            j = self.fresh(i)
            expr = sp.Sum(rename(expr, {i: j}), (j, 0, self.ranges[i] - 1))
        return expr


def accesses(expr: sp.Expr, spec: Spec) -> list[sp.Expr]:
    """Distinct tensor accesses in ``expr`` (Indexed, or a Symbol naming a scalar tensor)."""
    found = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Indexed) or (
                isinstance(node, sp.Symbol) and node.name in spec.tensors
                and not spec.tensors[node.name].dims):
            if node not in found:
                found.append(node)
    return found


def access_name(node: sp.Expr) -> str:
    return node.base.label.name if isinstance(node, sp.Indexed) else node.name


def access_indices(node: sp.Expr) -> tuple:
    return tuple(node.indices) if isinstance(node, sp.Indexed) else ()


def rename(expr: sp.Expr, mapping: dict) -> sp.Expr:
    """Substitute free index symbols, renaming bound ones that would be captured."""
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return expr
    return _rename(expr, mapping)


def _rename(expr, mapping):
    if isinstance(expr, sp.Symbol):
        return mapping.get(expr, expr)
    if isinstance(expr, sp.IndexedBase) or not expr.args:
        return expr
    if isinstance(expr, sp.Indexed):
        return expr.base[tuple(_rename(i, mapping) for i in expr.indices)]
    if isinstance(expr, sp.Sum):
        body = expr.function
        inner = dict(mapping)
        targets = set().union(*(sp.sympify(v).free_symbols for v in mapping.values()))
        limits = []
        for var, lo, hi in expr.limits:
            inner.pop(var, None)
            if var in targets:  # would capture: bind a new name instead
                new = sp.Symbol(f"{var.name.rstrip('0123456789_')}_{next(_counter)}",
                                integer=True)
                body = _rename(body, {var: new})
                var = new
            limits.append((var, _rename(lo, mapping), _rename(hi, mapping)))
        return sp.Sum(_rename(body, inner) if inner else body, *limits)
    return expr.func(*[_rename(a, mapping) for a in expr.args])


# -- normalisation ---------------------------------------------------------------------------

def normalize(spec: Spec) -> Program:
    """Lift every inner reduction of the spec into its own statement, and name every centred
    difference (a tensor minus its own mean, :func:`_lift_centred`)."""
    program = Program(spec, [], dict(spec.index_dims))
    centred: dict[str, str] = {}  # a centred difference (canonical text) -> its tensor
    for st in spec.statements:
        if isinstance(st.rhs, Padded):  # spec.pad: a padded copy, no reduction to lift
            program.assigns.append(Assign(st.target, st.lhs, st.rhs, "pad", (), st.line,
                                          st.kind))
            continue
        counter = itertools.count(1)
        first = len(program.assigns)
        rhs = _lift(program, st, st.rhs, counter, top=True)
        if isinstance(rhs, Assign):
            rhs.target, rhs.lhs, rhs.kind, rhs.line = st.target, st.lhs, st.kind, st.line
            program.assigns.append(rhs)
        else:
            program.assigns.append(Assign(st.target, st.lhs, rhs, None, (), st.line, st.kind))
        if st.kind != "update":
            _lift_centred(program, first, centred)
    return program


def _split_scale(expr, over):
    """``c * Sum(...)`` with c free of the reduced indices → (c, the Sum); else None."""
    if isinstance(expr, sp.Mul):
        red = [a for a in expr.args if isinstance(a, (SumOver, MaxOver))]
        if len(red) == 1 and isinstance(red[0], SumOver):
            rest = expr / red[0]
            if not (rest.free_symbols & set(red[0].over)) and not rest.has(SumOver, MaxOver):
                return rest, red[0]
    return None


def _lift(program: Program, st, expr, counter, top=False):
    spec = program.spec
    if top:
        scaled = _split_scale(expr, ())
        if scaled or isinstance(expr, (SumOver, MaxOver)):
            scale, node = scaled if scaled else (sp.Integer(1), expr)
            body = _lift(program, st, node.body, counter)
            kind = "sum" if isinstance(node, SumOver) else "max"
            if kind == "sum":
                body = scale * body
            elif scale != 1:
                return _lift(program, st, expr, counter)  # scale of a max: lift the max
            return Assign(st.target, st.lhs, body, kind, tuple(node.over), st.line)
    if isinstance(expr, (SumOver, MaxOver)):
        body = _lift(program, st, expr.body, counter)
        free = _free(body, spec, program) - set(expr.over)
        order = [i for i in st.lhs if i in free] + sorted(free - set(st.lhs), key=str)
        name = _lifted_name(spec, "s" if isinstance(expr, SumOver) else "m", st, counter)
        dims = [program.ranges[i] for i in order]
        if name not in spec.tensors:  # normalising twice reuses the lifted tensor
            spec._tensor(name, "lifted", dims, st.line)
            spec.lifted[name] = (st.target, st.line)
        kind = "sum" if isinstance(expr, SumOver) else "max"
        program.assigns.append(Assign(name, tuple(order), body, kind, tuple(expr.over),
                                      st.line, "lifted"))
        return program.access(name, order)
    if not expr.args or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    return expr.func(*[_lift(program, st, a, counter) for a in expr.args])


def _lifted_name(spec: Spec, prefix: str, st, counter) -> str:
    """``s_Y``, ``s_Y2``, ... for the sums lifted out of Y's statement: the next name that
    no declared name and no other statement's lift uses (normalising twice gives the same
    names, so a lift of this statement is reused)."""
    taken = spec._names()
    while True:
        k = next(counter)
        name = f"{prefix}_{st.target}" + ("" if k == 1 else str(k))
        if name not in taken or spec.lifted.get(name) == (st.target, st.line):
            return name


def _free(expr, spec, program) -> set:
    return {s for s in expr.free_symbols if s in program.ranges}


# -- centred differences -----------------------------------------------------------------------
#
# A tensor minus its own mean, A[φ] − μ[ψ] with μ = Σ_R A / |R|, is computed and differentiated
# as one tensor (layer norm's xc). Written inline, the reverse pass multiplies it out and the
# closed form reads A·μ·ΣG − μ²·ΣG − A·Σ(G·A) + μ·Σ(G·A): four terms of size |A|² that cancel
# to one of size (A − μ)². In float32 with inputs near 1000 that cancellation left an error of
# 2.4e-2 on a gradient of 2.8 (instance norm; docs/spec-language.md); kept as one factor,
# A − μ is exact to its own rounding and the error is 6.5e-5.


def _lift_centred(program: Program, first: int, centred: dict) -> None:
    """Name each centred difference in the statements from ``program.assigns[first:]`` on
    (one spec statement and the sums lifted out of it), as if the spec had named it.

    A let whose whole body is a centred difference (layer norm's ``xc = X − mu``) names it
    already: later statements read that let (an output that is one is left as it is). Any
    other is lifted into a statement of its own just before the first statement that reads
    it (``xc``, ``xc2``, ... ; ``hc`` for a tensor ``h``); every statement that writes the
    same difference reads the same tensor."""
    k = first
    while k < len(program.assigns):
        a = program.assigns[k]
        if a.reduce is None and a.kind in ("let", "output") and a.lhs:
            found = _centred_pair(program, a.body)
            if found is not None and found[:2] == (1, a.body):
                # the statement is the difference: nothing to lift (an output that is one
                # stays an output, not a name other statements read)
                if a.kind == "let" and \
                        tuple(_centred_order(a.body, a.lhs, program)) == tuple(a.lhs):
                    centred.setdefault(_centred_key(a.body, a.lhs, program), a.target)
                k += 1
                continue
        if a.reduce != "pad":
            before = len(program.assigns)
            a.body = _replace_centred(program, a, a.body, k, centred)
            k += len(program.assigns) - before  # the lifts went in before this statement
        k += 1


def _replace_centred(program, a, expr, at, centred):
    if not expr.args or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    expr = expr.func(*[_replace_centred(program, a, x, at, centred) for x in expr.args])
    if not isinstance(expr, sp.Add):
        return expr
    found = _centred_pair(program, expr)
    if found is None:
        return expr
    coeff, diff, source = found
    lhs = _centred_order(diff, a.lhs, program)
    key = _centred_key(diff, lhs, program)
    name = centred.get(key)
    if name is None:
        name = _centred_name(program, source, key)
        centred[key] = name
        spec = program.spec
        if name not in spec.tensors:  # normalising twice reuses the lifted tensor
            spec._tensor(name, "lifted", [program.ranges[i] for i in lhs], a.line)
            spec.lifted[name] = ("centred", key)
        # written over the first declared indices of its axes, as an input's gradient is
        # (xc[n, c, l], not the summed m of the statement it was lifted from)
        own = _declared_indices(program, lhs)
        program.assigns.insert(at, Assign(name, own, rename(diff, dict(zip(lhs, own))),
                                          None, (), a.line, "lifted"))
    # the named tensor is read at its own indices here (a lift is written over this
    # statement's indices, a named let over its own)
    own = next(b for b in program.assigns if b.target == name and b.kind != "update")
    order = _centred_order(own.body, own.lhs, program)
    mapping = dict(zip(order, lhs, strict=True))
    return expr - coeff * diff + coeff * program.access(name, [mapping[i] for i in own.lhs])


def _centred_order(diff, lhs, program) -> list:
    """The free indices of ``diff``: the statement's own first, then in order of reading."""
    free = []
    for node in sp.preorder_traversal(diff):
        if isinstance(node, sp.Symbol) and node in program.ranges and node not in free:
            free.append(node)
    return [i for i in lhs if i in free] + [i for i in free if i not in lhs]


def _centred_key(diff, lhs, program) -> str:
    """``diff`` with its free indices renamed by position, and their ranges: the same text for
    the same difference read at other indices (X[n, c, m] − μ[n, c] and X[n, c, l] − μ[n, c])."""
    order = _centred_order(diff, lhs, program)
    slots = {i: sp.Symbol(f"_slot{k}", integer=True) for k, i in enumerate(order)}
    return sp.srepr((diff.xreplace(slots), tuple(program.ranges[i] for i in order)))


def _declared_indices(program, free) -> tuple:
    """For each index of ``free``, the first declared index over its range not taken yet."""
    out = []
    for i in free:
        same = [j for j, dim in program.spec.index_dims.items()
                if dim == program.ranges[i] and j not in out]
        out.append(same[0] if same else i)
    return tuple(out) if len(set(out)) == len(out) else tuple(free)


def _centred_name(program, source, key) -> str:
    """``xc`` for X − μ (``hc`` for h, ``attn_c`` for attn), the next free name after it."""
    stem = f"{source.lower()}c" if len(source) == 1 else f"{source}_c"
    taken = program.spec._names()
    for k in itertools.count(1):
        name = stem + ("" if k == 1 else str(k))
        if name not in taken or program.spec.lifted.get(name) == ("centred", key):
            return name


def _centred_pair(program: Program, expr: sp.Add):
    """(c, A[φ] − μ[ψ], A) for the first two terms of the sum ``expr`` that are c times a
    tensor minus c times its mean over some of its axes; else None.

    μ is a mean of A if μ[λ] = w·Σ_R A[π] with w = 1/|R| (the product of the ranges of R),
    directly or through element-wise lets that scale one tensor (s = Σ_R A, μ = s/|R|), and
    ψ, φ place μ over A: binding λ to ψ and solving π = φ for R gives distinct indices that
    ψ does not read (X[n, c, l] − μ[n, c]; group norm's X[n, Cg·g + q, l] − μ[n, g])."""
    spec = program.spec
    terms = sp.Add.make_args(expr)
    scaled = []
    for t in terms:
        found = accesses(t, spec)
        if len(found) != 1:
            scaled.append(None)
            continue
        coeff = t / found[0]
        if _free(coeff, spec, program) or accesses(coeff, spec):
            scaled.append(None)
            continue
        scaled.append((coeff, found[0]))
    by_target = program.by_target()
    for p, left in enumerate(scaled):
        if left is None or not isinstance(left[1], sp.Indexed):
            continue
        for q, right in enumerate(scaled):
            if q == p or right is None or not isinstance(right[1], sp.Indexed):
                continue
            mean = _mean_of(program, access_name(right[1]), by_target)
            if mean is None or mean[0] != access_name(left[1]):
                continue
            _, lam, over, pattern, weight = mean
            if not _places_mean(program, left[1], right[1], lam, over, pattern):
                continue
            count = sp.Mul(*[program.ranges[r] for r in over])
            if sp.simplify(right[0] * weight * count + left[0]) != 0:
                continue
            return left[0], left[1] + right[0] / left[0] * right[1], access_name(left[1])
    return None


def _mean_of(program: Program, name: str, by_target, depth: int = 0):
    """(A, λ, R, π, w) if ``name``[λ] = w·Σ_R A[π] (see :func:`_centred_pair`); else None."""
    a = by_target.get(name)
    if a is None or depth > 4:
        return None
    found = accesses(a.body, program.spec)
    if len(found) != 1 or not isinstance(found[0], sp.Indexed):
        return None
    weight = a.body / found[0]
    if _free(weight, program.spec, program) or accesses(weight, program.spec):
        return None
    if a.reduce == "sum":
        return access_name(found[0]), tuple(a.lhs), tuple(a.over), found[0], weight
    if a.reduce is not None:
        return None
    inner = _mean_of(program, access_name(found[0]), by_target, depth + 1)
    if inner is None:
        return None
    source, lam, over, pattern, w = inner
    at = access_indices(found[0])
    if set(over) & set().union(*(sp.sympify(i).free_symbols for i in at)) or \
            set(over) & set(a.lhs):
        return None  # the reduced indices would be captured
    pattern = rename(pattern, dict(zip(lam, at, strict=True)))
    return source, tuple(a.lhs), over, pattern, weight * w


def _places_mean(program, value, mean, lam, over, pattern) -> bool:
    """Is ``mean`` (μ[ψ]) the mean of ``value`` (A[φ])'s own slice: λ ↦ ψ and π = φ solved
    for the reduced indices R, each mapped to a distinct index over its range that ψ does
    not read?"""
    mapping = dict(zip(lam, access_indices(mean), strict=True))
    pairs = list(zip(access_indices(pattern), access_indices(value), strict=True))
    for pa, va in pairs:
        unknown = [s for s in sp.sympify(pa).free_symbols if s in over and s not in mapping]
        if len(unknown) > 1:
            return False
        if unknown:
            s = unknown[0]
            step = sp.expand(pa).coeff(s)
            if step == 0:
                return False
            solved = sp.expand((va - rename(pa.xreplace({s: sp.Integer(0)}), mapping)) / step)
            if not isinstance(solved, sp.Symbol) or solved not in program.ranges:
                return False
            mapping[s] = solved
        if sp.expand(rename(pa, mapping) - va) != 0:
            return False
    images = [mapping.get(r) for r in over]
    read = set().union(set(), *(sp.sympify(i).free_symbols for i in access_indices(mean)))
    return all(i is not None for i in images) and len(set(images)) == len(images) \
        and not (set(images) & read) \
        and all(program.ranges[i] == program.ranges[r] for i, r in zip(images, over))
