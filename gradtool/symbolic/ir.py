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
    """Lift every inner reduction of the spec into its own statement."""
    program = Program(spec, [], dict(spec.index_dims))
    for st in spec.statements:
        if isinstance(st.rhs, Padded):  # spec.pad: a padded copy, no reduction to lift
            program.assigns.append(Assign(st.target, st.lhs, st.rhs, "pad", (), st.line,
                                          st.kind))
            continue
        counter = itertools.count(1)
        rhs = _lift(program, st, st.rhs, counter, top=True)
        if isinstance(rhs, Assign):
            rhs.target, rhs.lhs, rhs.kind, rhs.line = st.target, st.lhs, st.kind, st.line
            program.assigns.append(rhs)
        else:
            program.assigns.append(Assign(st.target, st.lhs, rhs, None, (), st.line, st.kind))
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
