"""Reverse mode over the SSA statements.

For a statement ``T[o] = R_r f(..., A[φ], ...)`` the local partial ∂f/∂A[φ] comes from
``sympy.diff`` with every access treated as a scalar; the index rule is the engine's:

* ``A`` lacks some of the statement's indices (broadcast, contraction, reduction of others):
  its adjoint sums the product over the indices it lacks;
* ``A`` has all of them (the adjoint of a reduction): the upstream gradient is broadcast;
* ``A`` is accessed at affine or repeated indices: the adjoint is a scatter-add, written as a
  sum with Kronecker deltas;
* a max reduction routes the gradient to its arg-max.

The adjoint of each tensor is the sum of its contributions (``steps``); substituting the adjoints
of later tensors and simplifying gives the closed form (``closed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from gradtool.spec.lang import Spec
from gradtool.symbolic.ir import (
    ArgMaxMask,
    Assign,
    Program,
    access_indices,
    access_name,
    accesses,
    normalize,
    rename,
)
from gradtool.symbolic.simplify import Simplifier

UNINVERTIBLE = (sp.Piecewise, sp.Max, sp.Min, sp.Heaviside, sp.Abs)


@dataclass
class Contribution:
    statement: Assign
    tensor: str
    local: sp.Expr        # ∂(statement body)/∂(this access)
    expr: sp.Expr         # the contribution, over canon[tensor], in terms of upstream adjoints
    rule: str


@dataclass
class Derivation:
    program: Program
    simplifier: Simplifier
    seeds: dict[str, sp.Expr]                     # output -> its upstream gradient access
    canon: dict[str, tuple]                       # tensor -> index symbols of its adjoint
    active: list[str]                             # tensors with an adjoint, forward order
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    steps: dict[str, sp.Expr] = field(default_factory=dict)
    closed: dict[str, sp.Expr] = field(default_factory=dict)

    @property
    def spec(self) -> Spec:
        return self.program.spec

    adjoint_labels: dict[str, str] = field(default_factory=dict)  # tensor -> g_<tensor>

    def adjoint_label(self, name: str) -> str:
        """``g_<name>``, the adjoint's name in the derivation steps; the spec language
        refuses a declared ``g_X`` beside X, and a lifted tensor's adjoint label steps
        around declared names."""
        if name not in self.adjoint_labels:
            label, taken = f"g_{name}", self.spec._names()
            while label in taken:
                label += "'"
            self.adjoint_labels[name] = label
        return self.adjoint_labels[name]

    def adjoint_of(self, label: str) -> str | None:
        """The tensor whose adjoint is called ``label``, if any."""
        return next((t for t, x in self.adjoint_labels.items() if x == label), None)

    def adjoint_base(self, name: str) -> sp.IndexedBase:
        return sp.IndexedBase(self.adjoint_label(name))

    def adjoint_access(self, name: str, idx=None) -> sp.Expr:
        if name in self.seeds:
            seed = self.seeds[name]
            if isinstance(seed, sp.Indexed):
                return seed.base[tuple(idx if idx is not None else self.canon[name])]
            return seed
        idx = self.canon[name] if idx is None else idx
        return self.adjoint_base(name)[tuple(idx)] if idx else \
            sp.Symbol(self.adjoint_label(name))

    def gradient(self, name: str) -> sp.Expr:
        """The closed-form gradient of a differentiable input or parameter."""
        return self.closed[name]


def _canonical_indices(program: Program) -> dict[str, tuple]:
    """Index names for each tensor's adjoint: a statement's own left-hand side, else for each
    axis the first declared index over its dimension not yet taken (X over N, C → X[n, c])."""
    canon: dict[str, tuple] = {}
    for a in program.assigns:
        if a.kind != "update":
            canon.setdefault(a.target, tuple(a.lhs))
    declared = list(program.spec.index_dims.items())
    for name, t in program.spec.tensors.items():
        if name in canon:
            continue
        made: list[sp.Symbol] = []
        for dim in t.dims:
            free = [i for i, d in declared if d == dim and i not in made]
            if free:
                made.append(free[0])
            else:  # e.g. the input axis (T - 1)*S + K of a strided convolution
                taken = {s.name for s in program.ranges} | {s.name for s in made}
                letter = next(c for c in "hwuvpqrxyz" if c not in taken)
                sym = sp.Symbol(letter, integer=True)
                program.ranges[sym] = dim
                made.append(sym)
        canon[name] = tuple(made)
    return canon


def _active(program: Program) -> list[str]:
    spec = program.spec
    forward = {t.name for t in spec.grad_inputs}
    for a in program.assigns:
        if a.kind != "update" and any(access_name(x) in forward
                                      for x in accesses(a.body, spec)):
            forward.add(a.target)
    needed = {a.target for a in program.assigns if a.kind == "output"} & forward
    for a in reversed(program.assigns):
        if a.target in needed and a.kind != "update":
            needed |= {access_name(x) for x in accesses(a.body, spec)} & forward
    order = [t.name for t in spec.grad_inputs] + [a.target for a in program.assigns]
    return [n for n in dict.fromkeys(order) if n in needed]


def seed_name(spec: Spec, output: str, outputs: int) -> str:
    """The upstream gradient's name: ``G`` (``G_Y`` beside other outputs), or, where the
    spec declares that name itself (a size G, a tensor G_Y), ``G_Y``, then ``G_Y_``, ...:
    the printed backward and the kernels never mix the two up."""
    taken = spec._names()
    name = "G" if outputs == 1 else f"G_{output}"
    if name in taken:
        name = f"G_{output}"
    while name in taken:
        name += "_"
    return name


def derive(spec: Spec) -> Derivation:
    """Reverse mode for every differentiable input and parameter of ``spec``."""
    program = normalize(spec)
    canon = _canonical_indices(program)
    active = _active(program)
    outputs = [a for a in program.assigns if a.kind == "output"]  # each has an upstream gradient
    seeds: dict[str, sp.Expr] = {}
    for a in outputs:
        if not a.lhs and len(outputs) == 1:
            seeds[a.target] = sp.Integer(1)  # a loss: the gradient of L is 1
        elif not a.lhs:
            seeds[a.target] = sp.Symbol(seed_name(spec, a.target, len(outputs)), real=True)
        else:
            name = seed_name(spec, a.target, len(outputs))
            seeds[a.target] = sp.IndexedBase(name)[tuple(a.lhs)]
    d = Derivation(program, Simplifier(program), seeds, canon, active)
    d.contributions = {name: [] for name in active}
    for a in reversed(program.assigns):
        if a.kind == "update" or a.target not in active:
            continue
        _close(d, a.target)
        for node in accesses(a.body, spec):
            if access_name(node) in active:
                c = _contribution(d, a, node)
                if c is not None:
                    d.contributions[c.tensor].append(c)
    for t in spec.grad_inputs:
        if t.name in active:
            _close(d, t.name)
        else:  # the output does not depend on it
            d.steps[t.name] = d.closed[t.name] = sp.Integer(0)
    return d


def _tie_slope(args, i: int, largest: bool) -> sp.Expr:
    """∂ Max(a_0, …)/∂a_i (``largest``) or ∂ Min/∂a_i with ties broken for the first
    argument: 1 where a_i is the first extremum in the argument order, else 0. Exactly one
    argument gets the gradient at every point, so the slopes always sum to one (a valid
    subgradient at a tie; SymPy's own derivative gives every tied argument 0)."""
    a = args[i]
    out = sp.Integer(1)
    for j, b in enumerate(args):
        if j == i:
            continue
        beats = (a - b) if largest else (b - a)
        # strictly better than the arguments before it, at least as good as those after
        out *= sp.Heaviside(beats) if j < i else 1 - sp.Heaviside(-beats)
    return out


class _TieMax(sp.Function):
    """Element-wise Max with the first-argument tie rule of :func:`_tie_slope`, used only
    while differentiating."""

    def fdiff(self, argindex=1):
        return _tie_slope(self.args, argindex - 1, largest=True)


class _TieMin(sp.Function):
    def fdiff(self, argindex=1):
        return _tie_slope(self.args, argindex - 1, largest=False)


def _diff(body, wrt) -> sp.Expr:
    """``sympy.diff`` with gradtool's tie rule for element-wise Max and Min."""
    swap = body.replace(lambda e: isinstance(e, (sp.Max, sp.Min)),
                        lambda e: (_TieMax if isinstance(e, sp.Max) else _TieMin)(*e.args))
    return sp.diff(swap, wrt).replace(_TieMax, sp.Max).replace(_TieMin, sp.Min)


def _contribution(d: Derivation, a: Assign, node) -> Contribution | None:
    program, spec = d.program, d.spec
    nodes = accesses(a.body, spec)
    dummies = {x: sp.Dummy(f"a{k}", real=True) for k, x in enumerate(nodes)}
    flat = a.body.xreplace(dummies)
    local = _diff(flat, dummies[node])
    local = local.xreplace({v: k for k, v in dummies.items()})
    # a step (Heaviside, sign) has derivative zero away from its jump; checks avoid the jump
    local = local.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    if local == 0:
        return None
    local = _local_form(d, a, node, local)
    upstream = d.adjoint_access(a.target, a.lhs)
    mask = ArgMaxMask(a.body, program.access(a.target, a.lhs), *a.over) \
        if a.reduce == "max" else 1
    expr = upstream * local * mask
    name, idx = access_name(node), access_indices(node)
    domain = list(a.lhs) + list(a.over)
    target = d.canon[name]
    plain = all(isinstance(i, sp.Symbol) for i in idx) and len(set(idx)) == len(idx)
    if plain:
        missing = [i for i in domain if i not in idx]
        expr = rename(program.make_sum(expr, missing), dict(zip(idx, target, strict=True)))
        rule = _rule(a, idx, missing)
    else:
        fresh = {i: program.fresh(i) for i in domain}
        deltas = sp.Mul(*[sp.KroneckerDelta(t, rename(i, fresh))
                          for t, i in zip(target, idx, strict=True)])
        expr = program.make_sum(rename(expr, fresh) * deltas, [fresh[i] for i in domain])
        rule = f"{name} is read at {tuple(idx)}: the adjoint scatter-adds (Kronecker deltas)"
    return Contribution(a, name, local, expr, rule)


def _rule(a: Assign, idx, missing) -> str:
    lacking = [i for i in missing if i in a.lhs]
    reduced = [i for i in missing if i in a.over]
    if a.reduce == "max":
        return "adjoint of a max: the gradient goes to the arg-max"
    parts = []
    if a.reduce == "sum" and not reduced:
        parts.append("adjoint of a reduction is a broadcast")
    if reduced:
        parts.append(f"contraction over {', '.join(map(str, reduced))}: the adjoint is a "
                     "contraction")
    if lacking:
        parts.append(f"broadcast over {', '.join(map(str, lacking))}: the adjoint sums over "
                     "them")
    if not parts:
        parts.append("element-wise: multiply by the local derivative")
    return "; ".join(parts)


def _local_form(d: Derivation, a: Assign, node, local):
    """Write a local derivative in forward names: d tanh = 1 − Y², d sigmoid = Y(1 − Y)."""
    local = d.simplifier.substitute_forward(local)
    if a.reduce is None and len(accesses(a.body, d.spec)) == 1 \
            and node in local.free_symbols | set(accesses(local, d.spec)) \
            and not a.body.has(*UNINVERTIBLE):
        x, y = sp.Dummy("x", real=True), sp.Dummy("y", real=True)
        try:
            solutions = sp.solve(sp.Eq(y, a.body.xreplace({node: x})), x)
        except (NotImplementedError, ValueError, TypeError):
            solutions = []
        if len(solutions) == 1:
            out = d.program.access(a.target, a.lhs)
            flat = local.xreplace({node: x, out: y})
            candidate = sp.simplify(flat.subs(x, solutions[0]))
            if x not in candidate.free_symbols and \
                    sp.count_ops(candidate) < sp.count_ops(flat):
                local = candidate.xreplace({y: out})
    return local


def _close(d: Derivation, name: str) -> None:
    """Sum the contributions to ``name`` and substitute the closed forms upstream."""
    simplify = d.simplifier
    raw = sp.Add(*[c.expr for c in d.contributions[name]])
    if name in d.seeds:
        raw += d.adjoint_access(name)
    d.steps[name] = simplify(raw)
    inlined = _inline_adjoints(d, raw)
    closed = simplify(inlined)
    rewritten = simplify(simplify.rewrite(closed))
    # the later names are meant to shorten the form (xc = xhat/rstd); substituting a chain of
    # quotients into powers can blow it up instead, and then the form stays as it was
    if sp.count_ops(rewritten) <= sp.count_ops(closed):
        closed = rewritten
    # sums over one range merged and small polynomials factored: 1 − tanh² stays one factor,
    # which keeps its precision where tanh saturates (docs/fuzzing.md, finding 11)
    # (only for what is reported: an intermediate's form is inlined and expanded again)
    if name in {t.name for t in d.spec.grad_inputs}:
        from gradtool.symbolic.printing import factored

        closed = factored(closed)
    d.closed[name] = closed


def _inline_adjoints(d: Derivation, expr):
    subs = {}
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Indexed) and d.adjoint_of(node.base.label.name):
            name = d.adjoint_of(node.base.label.name)
            subs[node] = rename(d.closed[name], dict(zip(d.canon[name], node.indices,
                                                         strict=True)))
        elif isinstance(node, sp.Symbol) and d.adjoint_of(node.name) in d.closed:
            subs[node] = d.closed[d.adjoint_of(node.name)]
    return expr.xreplace(subs)
