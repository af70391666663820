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
of later tensors and simplifying gives the closed form (``closed``). An output's adjoint is its
own upstream gradient plus the contributions of every statement that reads it: with outputs
``A = X²`` and ``B = 3·A``, ``g_A = G_A + 3·G_B`` and ``dX = 2·X·(G_A + 3·G_B)``.
"""

from __future__ import annotations

from collections.abc import Callable
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
from gradtool.symbolic.simplify import Simplifier, name_logistic

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
    read_outputs: set[str] = field(default_factory=set)  # outputs that later statements read
    upstream_names: dict[str, str] = field(default_factory=dict)  # output -> G, G_A, ...
    adjoint_names: dict[str, str] = field(default_factory=dict)   # tensor -> g_xhat, ...
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)
    steps: dict[str, sp.Expr] = field(default_factory=dict)
    closed: dict[str, sp.Expr] = field(default_factory=dict)
    # intermediates whose adjoint is shown under its own name (dS), and the gradients
    # written through them; ``closed`` stays fully inlined (the kernels use it)
    named: dict[str, sp.Expr] = field(default_factory=dict)
    via: dict[str, sp.Expr] = field(default_factory=dict)

    @property
    def spec(self) -> Spec:
        return self.program.spec

    def adjoint_base(self, name: str) -> sp.IndexedBase:
        return sp.IndexedBase(self.adjoint_names[name])

    def seed_access(self, name: str, idx=None) -> sp.Expr:
        """The upstream gradient of output ``name`` (``G[n, d]``, ``G_A[n]``, or 1 for a loss)."""
        seed = self.seeds[name]
        if isinstance(seed, sp.Indexed):
            return seed.base[tuple(idx if idx is not None else self.canon[name])]
        return seed

    def adjoint_access(self, name: str, idx=None) -> sp.Expr:
        """∂L/∂name at ``idx``: the upstream gradient itself for an output no statement reads,
        else the adjoint ``g_name`` that sums every contribution (and the seed, if any)."""
        if name in self.seeds and name not in self.read_outputs:
            return self.seed_access(name, idx)
        idx = self.canon[name] if idx is None else idx
        return self.adjoint_base(name)[tuple(idx)] if idx else \
            sp.Symbol(self.adjoint_names[name])

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
                # never a declared name either: an index `u` beside a let u would print
                # ambiguously and read the tensor in a kernel (docs/fuzzing.md, finding 25)
                spec = program.spec
                taken = {s.name for s in program.ranges} | {s.name for s in made} \
                    | set(spec.tensors) | set(spec.hypers) | set(spec.dim_symbols)
                letter = next((c for c in "hwuvpqrxyz" if c not in taken), None) or next(
                    f"h{k}" for k in range(1, 10 ** 6) if f"h{k}" not in taken)
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


def derive(spec: Spec, progress: Callable[[str], None] | None = None) -> Derivation:
    """Reverse mode for every differentiable input and parameter of ``spec``.

    ``progress``, if given, is called with the name of each step as it starts (``"adjoint of
    xhat (3/7)"``); ``gradtool derive`` shows it on a spinner. Every step is bounded in size
    (see ``simplify.EXPAND_BUDGET``), so a derivation always ends.

    A spec is derived once: ``gradtool check`` and the NumPy and torch code generators all
    ask for the same spec's derivation, and get the one made first (a spec changed since then
    is derived again). The result is shared, so callers must not change it."""
    state = _spec_state(spec)
    cached = spec.__dict__.get("_derivation")
    if cached is not None and cached[0] == state:
        return cached[1]
    d = _derive(spec, progress)
    # (normalising records the sums it lifts out on the spec: the state to compare is after)
    spec.__dict__["_derivation"] = (_spec_state(spec), d)
    return d


def _spec_state(spec: Spec) -> str:
    """Everything a derivation reads from ``spec``, as text: a spec changed after it was
    derived (a statement added, a domain or fact stated) compares unequal."""
    return repr((spec.statements, spec.facts, spec.tensors, spec.hypers, spec.derived,
                 spec.requires, spec.training_requires, spec.eval_statements, spec.lifted,
                 spec.index_dims))


def _derive(spec: Spec, progress: Callable[[str], None] | None) -> Derivation:
    say = progress or (lambda step: None)
    say("normalising to SSA form")
    program = normalize(spec)
    canon = _canonical_indices(program)
    active = _active(program)
    outputs = [a for a in program.assigns if a.kind == "output"]  # each has an upstream gradient
    taken = set(spec.tensors) | set(spec.hypers) | set(spec.dim_symbols) \
        | {str(i) for i in program.ranges}
    names = {}
    for a in outputs:
        names[a.target] = _unused("G" if len(outputs) == 1 else f"G_{a.target}",
                                  f"G_{a.target}", taken)
    seeds: dict[str, sp.Expr] = {}
    for a in outputs:
        if not a.lhs and len(outputs) == 1:
            seeds[a.target] = sp.Integer(1)  # a loss: the gradient of L is 1
        elif not a.lhs:
            seeds[a.target] = sp.Symbol(names[a.target], real=True)
        else:
            seeds[a.target] = sp.IndexedBase(names[a.target])[tuple(a.lhs)]
    read = {access_name(x) for a in program.assigns
            if a.kind != "update" and a.target in active for x in accesses(a.body, spec)}
    d = Derivation(program, Simplifier(program), seeds, canon, active, set(seeds) & read,
                   names, {t: _unused(f"g_{t}", f"g_{t}", taken) for t in active})
    d.contributions = {name: [] for name in active}
    todo = [a for a in reversed(program.assigns) if a.kind != "update" and a.target in active]
    for k, a in enumerate(todo, 1):
        say(f"adjoint of {a.target} ({k}/{len(todo)})")
        _close(d, a.target)
        for node in accesses(a.body, spec):
            if access_name(node) in active:
                say(f"local derivative ∂{a.target}/∂{access_name(node)}")
                c = _contribution(d, a, node)
                if c is not None:
                    d.contributions[c.tensor].append(c)
    for t in spec.grad_inputs:
        if t.name in active:
            say(f"closed form of d{t.name}")
            _close(d, t.name)
        else:  # the output does not depend on it
            d.steps[t.name] = d.closed[t.name] = sp.Integer(0)
    _name_shared_adjoints(d, say)
    return d


def _unused(first: str, second: str, taken: set) -> str:
    """``first``, else ``second``, else ``second`` with underscores appended: a name no tensor,
    size, index or hyper-parameter of the spec has (an input may be called G or g_t)."""
    name = first if first not in taken else second
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _name_shared_adjoints(d: Derivation, say: Callable[[str], None]) -> None:
    """Write gradients through a shared intermediate's adjoint, as a textbook does.

    An intermediate that reads two or more differentiable inputs, and whose adjoint is more
    than the upstream gradient times one factor, gets its adjoint printed once under its own
    name: attention's scores S (read by Q and K) as ``dS``, SwiGLU's a = X·W1 as ``da``. The
    gradients of those inputs are then written with it (``dQ = dS·K/√d``, ``dW1 = Xᵀ·da``)
    instead of repeating it inlined."""
    inputs = {t.name for t in d.spec.grad_inputs if t.name in d.active}
    readers: dict[str, set[str]] = {}
    for name in inputs:
        for c in d.contributions[name]:
            readers.setdefault(c.statement.target, set()).add(name)
    for target, read in sorted(readers.items(), key=lambda item: d.active.index(item[0])):
        if target in d.seeds or target in inputs or len(read) < 2 \
                or sp.count_ops(d.closed[target]) < 2:
            continue  # dh = G or G·W reads better inlined
        d.named[target] = d.closed[target]
    if not d.named:
        return
    for name in sorted(inputs, key=d.active.index):
        shared = [c for c in d.contributions[name] if c.statement.target in d.named]
        if not shared:
            continue
        say(f"d{name} through {', '.join(sorted(d.named))}")
        raw = sp.Add(*[c.expr for c in d.contributions[name]])
        # the adjoints by their names (g_t, or g_t_ beside a declared tensor g_t)
        shared_of = {d.adjoint_names[t]: t for t in d.named}
        renamed = {}
        for node in raw.atoms(sp.Indexed, sp.Symbol):
            label = node.base.label.name if isinstance(node, sp.Indexed) else node.name
            if label not in shared_of:
                continue
            renamed[node] = sp.IndexedBase(f"d{shared_of[label]}")[node.indices] \
                if isinstance(node, sp.Indexed) else \
                sp.Symbol(f"d{shared_of[label]}", real=True)
        d.via[name] = _closed_form(d, _inline_adjoints(d, raw.xreplace(renamed)), True)


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
    """``sympy.diff`` with gradtool's tie rule for element-wise Max and Min, and powers of
    one base merged (:func:`merge_powers`).

    ``body`` may hold ``_TieMax``/``_TieMin`` already (:func:`_with_ties`); a plain Max or
    Min is taken in SymPy's order of its arguments."""
    swap = _with_ties(body)
    out = sp.diff(swap, wrt).replace(_TieMax, sp.Max).replace(_TieMin, sp.Min)
    return merge_powers(out)


def _with_ties(body) -> sp.Expr:
    """``body`` with each element-wise Max and Min as a function that keeps its arguments in
    the printed order (SymPy's ``.args``, sorted by ``default_sort_key``), so that the tie
    rule of :func:`_tie_slope` follows what ``derive`` prints. Replacing the tensor reads by
    symbols first would re-sort them by the symbols' order instead, which follows the order
    in which the reads are met: a hash-dependent walk of the Max's argument set."""
    return body.replace(lambda e: isinstance(e, (sp.Max, sp.Min)),
                        lambda e: (_TieMax if isinstance(e, sp.Max) else _TieMin)(*e.args))


def merge_powers(expr) -> sp.Expr:
    """Products that divide by a base they also raise to a power, written as one power:
    SymPy's derivative of b^p is p·b^p/b, which is 0/0 at b = 0 where p·b^(p−1) is 0
    (p > 1). Only bases that are not numbers (e^a·e^b stays as it is)."""
    def merge(m):
        groups: dict = {}
        for f in m.args:
            base, exp = f.as_base_exp()
            groups.setdefault(base, []).append((f, exp))
        if not any(len(fs) > 1 and not base.is_number and any(e.is_negative for _, e in fs)
                   for base, fs in groups.items()):
            return m
        out = []
        for base, fs in groups.items():
            if len(fs) > 1 and not base.is_number and any(e.is_negative for _, e in fs):
                out.append(sp.Pow(base, sp.Add(*[e for _, e in fs])))
            else:
                out.extend(f for f, _ in fs)
        return sp.Mul(*out)

    return expr.replace(lambda e: isinstance(e, sp.Mul), merge)


def _pad_contribution(d: Derivation, a: Assign, node) -> Contribution:
    """``Xp[h] = X[h − P]`` inside X, the fill outside (``spec.pad``): X's entry at h is read
    once, at Xp's position h + P, so the adjoint of X is the slice of Xp's adjoint at X's
    positions; the padding's entries have no source and their adjoint flows nowhere."""
    name = access_name(node)
    target = d.canon[name]
    widths = d.program.pad_widths(a)
    at = tuple(t + before for t, (before, _) in zip(target, widths, strict=True))
    return Contribution(a, name, sp.Integer(1), d.adjoint_access(a.target, at),
                        f"{a.target} pads {name}: the adjoint of {name} is the slice of "
                        f"{a.target}'s adjoint at {name}'s positions (the padding has no "
                        "source)")


def _contribution(d: Derivation, a: Assign, node) -> Contribution | None:
    program, spec = d.program, d.spec
    if a.reduce == "pad":
        return _pad_contribution(d, a, node)
    nodes = accesses(a.body, spec)
    dummies = {x: sp.Dummy(f"a{k}", real=True) for k, x in enumerate(nodes)}
    flat = _with_ties(a.body).xreplace(dummies)
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
    """Write a local derivative in forward names: d tanh = 1 − Y², d sigmoid = Y(1 − Y).

    The input is written in terms of the output by peeling the body's layers (``inverse``),
    never by ``sympy.solve``: solving ``Y = tanh(X + X³)`` for X runs for minutes (Cardano's
    formula under an atanh), and nested tanh for seconds each. The substituted form is kept
    only where it is shorter, and is simplified only while it stays small (``LOCAL_BUDGET``)."""
    local = name_logistic(d.simplifier.substitute_forward(local))
    if a.reduce is not None or len(accesses(a.body, d.spec)) != 1 \
            or node not in local.free_symbols | set(accesses(local, d.spec)) \
            or a.body.has(*UNINVERTIBLE):
        return local
    x, y = sp.Dummy("x", real=True), sp.Dummy("y", real=True)
    solution = inverse(a.body.xreplace({node: x}), x, y)
    if solution is None:
        return local
    out = d.program.access(a.target, a.lhs)
    flat = local.xreplace({node: x, out: y})
    candidate = flat.xreplace({x: solution})
    if sp.count_ops(candidate) <= LOCAL_BUDGET:
        cancelled = sp.cancel(candidate)
        factored = sp.factor(cancelled)
        candidate = min((cancelled, factored), key=sp.count_ops)
    # an inverse left in the form (σ(softplus(X)) = atanh(Y)) is no simplification: it loses
    # the precision tanh saturates away, and neither the evaluator nor the kernels compute it
    # (docs/fuzzing.md, finding 22)
    left = [f for f in _INTRODUCED if candidate.has(f) and not flat.has(f)]
    if x not in candidate.free_symbols and not left \
            and sp.count_ops(candidate) < sp.count_ops(flat):
        local = candidate.xreplace({y: out})
    return local


# A substituted local derivative larger than this is not simplified (cancel and factor of a
# rational function grow with its size; the local derivatives of activations are < 20).
LOCAL_BUDGET = 40

# y = f(x) ⇒ x = f⁻¹(y) for one-to-one functions on the reals
_INVERSES = {sp.exp: sp.log, sp.log: sp.exp, sp.tanh: sp.atanh, sp.sinh: sp.asinh,
             sp.atan: sp.tan}
# the inverses that may not stay in a local form: only exp and log are functions of the spec
# language whose inverse is one too
_INTRODUCED = (sp.atanh, sp.asinh, sp.tan)


def inverse(body: sp.Expr, x: sp.Symbol, y: sp.Symbol) -> sp.Expr | None:
    """``x`` as a function of ``y = body(x)``, or None where ``body`` is not invertible layer
    by layer.

    Each layer on the path from the root to the one occurrence of ``x`` is undone in turn:
    adding or multiplying by something free of x, a reciprocal, a constant base raised to x,
    and the one-to-one functions of ``_INVERSES``. The cost is linear in the depth of the
    body; a body reading x twice (x + x³), or through a map that is not one-to-one (x²,
    cosh), gives None."""
    target = y
    while body != x:
        if body.count(x) != 1:
            return None
        if isinstance(body, (sp.Add, sp.Mul)):
            inner = next(arg for arg in body.args if arg.has(x))
            rest = body.func(*[arg for arg in body.args if arg is not inner])
            if isinstance(body, sp.Add):
                target = target - rest
            elif rest == 0:
                return None
            else:
                target = target / rest
            body = inner
        elif isinstance(body, sp.Pow) and not body.exp.has(x) and body.exp in (1, -1):
            target, body = target ** body.exp, body.base
        elif isinstance(body, sp.Pow) and not body.base.has(x) and body.base.is_positive \
                and body.base != 1:
            target, body = sp.log(target) / sp.log(body.base), body.exp
        elif type(body) in _INVERSES and len(body.args) == 1:
            target, body = _INVERSES[type(body)](target), body.args[0]
        else:
            return None
    return target


def _close(d: Derivation, name: str) -> None:
    """Sum the contributions to ``name`` and substitute the closed forms upstream."""
    raw = sp.Add(*[c.expr for c in d.contributions[name]])
    if name in d.seeds:
        raw += d.seed_access(name)
    d.steps[name] = d.simplifier(raw)
    d.closed[name] = _closed_form(d, _inline_adjoints(d, raw),
                                  name in {t.name for t in d.spec.grad_inputs})


def _closed_form(d: Derivation, inlined: sp.Expr, reported: bool) -> sp.Expr:
    """Simplify an adjoint whose upstream adjoints are inlined, σ named, in the later forward
    names where that is shorter; factored if ``reported``."""
    simplify = d.simplifier
    closed = name_logistic(simplify(inlined))
    rewritten = simplify(simplify.rewrite(closed))
    # the later names are meant to shorten the form (xc = xhat/rstd); substituting a chain of
    # quotients into powers can blow it up instead, and then the form stays as it was
    if sp.count_ops(rewritten) <= sp.count_ops(closed):
        closed = rewritten
    # sums over one range merged and small polynomials factored: 1 − tanh² stays one factor,
    # which keeps its precision where tanh saturates (docs/fuzzing.md, finding 11)
    # (only for what is reported: an intermediate's form is inlined and expanded again)
    if reported:
        from gradtool.symbolic.printing import factored

        closed = factored(closed)
    return closed


def _inline_adjoints(d: Derivation, expr):
    tensor_of = {g: t for t, g in d.adjoint_names.items() if t in d.closed}
    subs = {}
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Indexed) and node.base.label.name in tensor_of:
            name = tensor_of[node.base.label.name]
            subs[node] = rename(d.closed[name], dict(zip(d.canon[name], node.indices,
                                                         strict=True)))
        elif isinstance(node, sp.Symbol) and node.name in tensor_of:
            subs[node] = d.closed[tensor_of[node.name]]
    return expr.xreplace(subs)
