"""Index-aware simplification of derived expressions.

SymPy does the scalar algebra (expand, cancel, powers); this module does what SymPy's ``Sum``
cannot: linearity of Σ, pulling out factors free of the summed index, Σ of a constant,
Kronecker-delta elimination, folding a sum back into a forward tensor it defines (Σ_d X = D·mu),
using stated facts (Σ_c T = 1), and re-expressing forward intermediates in the names a textbook
uses (xc = xhat/rstd, e = S·Z).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import sympy as sp

from gradtool.symbolic.ir import (
    Program,
    Sigmoid,
    access_indices,
    access_name,
    accesses,
    rename,
)


@dataclass
class Definition:
    """``value = Σ_over body`` with ``free`` indices: a forward reduction or a stated fact."""

    value: sp.Expr
    over: sp.Symbol
    body: sp.Expr
    free: tuple


def expand(expr, inert=None) -> sp.Expr:
    """``sp.expand`` that leaves arg-max masks and denominators as they are.

    A mask ``[body = max body]`` compares the body with the value the forward computed; an
    expanded body is algebraically equal but does not compare equal in floating point.
    An expression whose expansion would have more than ``EXPAND_BUDGET`` terms stays as it is
    (still correct, only less simplified): multiplying out a product of sums grows as the
    product of their lengths.

    ``inert``, if given, says of a sum that multiplying it out can fold nothing (see
    :meth:`Simplifier.inert`). Where a product has two or more such factors they stay
    factors: the chain rule through k saturating activations is a product of k factors
    1 − tanh², 2^k terms once multiplied out (docs/fuzzing.md, finding 21). A product with
    one such factor is still multiplied out, so that G − G·(1 − t²) cancels to G·t².

    A sum whose body holds two or more terms with sums of their own (:func:`nested_terms`)
    stays one sum, where SymPy would split it into a sum per term, and a sum factor of a
    product with it is not multiplied in: (1 − h0²)·Σ_e'(W1·…) stays a product.
    :meth:`Simplifier.sum_over` splits such a sum where a term folds; on a chain of
    contractions (k tanh layers) each split or product multiplied out doubled the sums again,
    2^k of them."""
    from gradtool.symbolic.ir import ArgMaxMask

    keep = {m: sp.Dummy("mask") for m in expr.atoms(ArgMaxMask)} if expr.has(ArgMaxMask) \
        else {}
    # a denominator stays a product of its factors: x/((1 + a²)(1 + b²)), not x/(a²b² + …)
    for p in expr.atoms(sp.Pow):
        if p.exp.is_negative and isinstance(p.base, sp.Add) and p.base not in keep:
            keep[p.base] = sp.Dummy("den")
    if inert is not None:
        for node in sp.preorder_traversal(expr):
            if not isinstance(node, sp.Mul):
                continue
            sums = [f for f in node.args if isinstance(f, sp.Add) and f not in keep
                    and inert(f)]
            powers = [f.base for f in node.args if isinstance(f, sp.Pow)
                      and f.exp.is_Integer and f.exp > 1 and isinstance(f.base, sp.Add)
                      and f.base not in keep and inert(f.base)]
            if len(sums) + 2 * len(powers) >= 2:
                keep.update({f: sp.Dummy("factor") for f in sums + powers})
    # sums kept whole, and the sum factors beside them (multiplied in, each would write the
    # whole sum once per term)
    whole = {node for node in sp.preorder_traversal(expr)
             if isinstance(node, sp.Sum) and node not in keep and nested_terms(node.function) >= 2}
    for node in sp.preorder_traversal(expr) if whole else ():
        if isinstance(node, sp.Mul) and any(f in whole for f in node.args):
            keep.update({f: sp.Dummy("factor") for f in node.args
                         if isinstance(f, sp.Add) and f not in keep})
    keep.update({node: sp.Dummy("sum") for node in whole})
    masked = expr.xreplace(keep) if keep else expr
    if expansion_size(masked) > EXPAND_BUDGET:
        return expr
    out = sp.expand(masked, power_base=False, power_exp=False, log=False)
    return out.xreplace({v: k for k, v in keep.items()}) if keep else out


def nested_terms(body) -> int:
    """How many of the terms that multiplying out the top level of ``body`` makes hold a
    sum of their own (sums inside are not multiplied out)."""
    if not body.has(sp.Sum):
        return 0
    terms = sp.Add.make_args(sp.expand(body, deep=False, power_base=False, power_exp=False,
                                       log=False))
    return sum(1 for t in terms if t.has(sp.Sum))


# The largest expansion the built-in specs make has about 50 terms (conv2d; layer norm 15);
# SymPy multiplies out a few thousand terms in about a second.
EXPAND_BUDGET = 2000


def expansion_size(expr, limit: int = EXPAND_BUDGET) -> int:
    """An upper bound on the number of terms ``sp.expand`` makes of ``expr``, its top level
    and the arguments of its functions together; counting stops once it passes ``limit``.

    A sum has the terms of its parts, a product the product of its factors' counts, and
    (a₁ + … + a_k)^m the multinomial count C(m + k − 1, k − 1)."""
    cap = limit + 1

    def size(e) -> tuple[int, int]:  # (terms at this level, terms made inside functions)
        if e.is_Atom or isinstance(e, (sp.Indexed, sp.IndexedBase)):
            return 1, 0
        parts = [size(a) for a in e.args]
        inner = min(sum(w for _, w in parts), cap)
        if isinstance(e, sp.Add):
            return min(sum(t for t, _ in parts), cap), inner
        if isinstance(e, sp.Mul):
            out = 1
            for t, _ in parts:
                out = min(out * t, cap)
            return out, inner
        if isinstance(e, sp.Pow):
            (base, _), (exp, _) = parts
            if e.exp.is_Integer and e.exp > 1 and base > 1:
                m = int(e.exp)
                return (cap if m > limit else min(math.comb(m + base - 1, base - 1), cap)), inner
            return min(base * exp, cap), inner
        # a function (or a Sum) is one term outside; its arguments are expanded on their own
        return 1, min(inner + sum(t for t, _ in parts), cap)

    terms, work = size(expr)
    return min(terms + work, cap)


# input domains that exclude 0 (docs/spec-language.md, spec.input)
NONZERO_DOMAINS = ("positive", "nonzero", "unit")


def _divisor_bases(expr, surely: bool) -> list:
    """The bases of the powers in ``expr`` with a negative exponent: those surely negative
    (``surely``), or those that may be (X^(p−1) with p of unknown sign)."""
    out = []
    for p in sp.preorder_traversal(expr):
        if isinstance(p, sp.Pow) and (p.exp.is_negative if surely
                                      else not p.exp.is_nonnegative):
            out.append(p.base)
    return out


def zero_factors(value) -> set:
    """Values whose zero may make ``value`` zero: the factors of a product, the bases of
    powers with a positive (or unknown) exponent, and ``value`` itself otherwise. Numbers,
    reciprocals and exponentials contribute none."""
    if value.is_number:
        return set() if value.is_nonzero else {value}
    if isinstance(value, sp.Mul):
        return set().union(*(zero_factors(f) for f in value.args))
    if isinstance(value, sp.Pow):
        return set() if value.exp.is_negative else zero_factors(value.base)
    if isinstance(value, sp.exp):
        return set()
    return {value}


def name_logistic(expr) -> sp.Expr:
    """Name the logistic function where its quotient appears: with s = σ(u),
    e^u/(1 + e^u) → s, 1/(1 + e^(−u)) → s, e^(−u)/(1 + e^(−u))² → s·(1 − s).

    Every u with a denominator 1 + e^(±u) is substituted as e^u = s/(1 − s), e^(−u) =
    (1 − s)/s; a term keeps the result only where no denominator in s is left (e^u alone
    stays e^u). Linear in the size of ``expr``."""
    subs = {}
    for p in sorted(expr.atoms(sp.Pow), key=sp.default_sort_key):
        if not (p.exp.is_negative and isinstance(p.base, sp.Add) and len(p.base.args) == 2):
            continue
        one, e = p.base.as_coeff_Add()
        if one != 1 or not isinstance(e, sp.exp):
            continue
        u = -e.args[0] if e.args[0].could_extract_minus_sign() else e.args[0]
        if sp.exp(u) in subs:
            continue
        s = Sigmoid(u)
        subs.update({sp.exp(u): s / (1 - s), sp.exp(-u): (1 - s) / s,
                     1 + sp.exp(u): 1 / (1 - s), 1 + sp.exp(-u): 1 / s})
    if not subs:
        return expr

    def divides_by_sigma(term) -> bool:
        return any(isinstance(p, sp.Pow) and p.exp.is_negative and p.base.has(Sigmoid)
                   for p in sp.preorder_traversal(term))

    terms = []
    for term in sp.Add.make_args(expr):
        candidate = term.xreplace(subs)
        terms.append(term if divides_by_sigma(candidate) else candidate)
    return sp.Add(*terms)


# Folding inlines element-wise intermediates to find sums that vanish (Σ_d (X − μ) = 0), and
# expands what it inlined. The vanishing sums of normalisation layers are small (layer norm's
# largest is about 20 operations); past this size the expansion costs minutes and is skipped.
INLINE_BUDGET = 60
# Matching a term against a definition whose body is a sum needs polynomial cancellation, which
# grows fast with the term; a product body matches by cancelling equal factors alone.
CANCEL_BUDGET = 40


# A sum over more indices than this is taken in its written order only (k! orders).
ORDER_BUDGET = 3
# Inlining attempts (a fold that inlines element-wise intermediates and simplifies again, or
# a sum interchange) per top-level simplification. Each attempt may nest further attempts
# and try every order of a sum's limits, so their number, not only their size, must be
# bounded: one adjoint once made thousands of nested attempts and ran for minutes
# (docs/fuzzing.md, finding 18). The built-in specs make at most 18 (group norm), and an
# inlining attempt must first pass ``Simplifier._could_fold``.
FOLD_BUDGET = 60


def _orders(limits):
    """The orders in which to try a sum's limits: the written one first."""
    if len(limits) > ORDER_BUDGET:
        return [tuple(limits)]
    return list(itertools.permutations(limits))


def count_sums(expr) -> int:
    return sum(1 for n in sp.preorder_traversal(expr) if isinstance(n, sp.Sum))


def _bind(mapping: dict, pattern, access) -> dict | None:
    """``mapping`` extended so that the read ``pattern`` becomes ``access``, or None."""
    out = dict(mapping)
    for a, b in zip(access_indices(pattern), access_indices(access)):
        if not isinstance(a, sp.Symbol):
            if a != b:
                return None
        elif out.setdefault(a, b) != b:
            return None
    return out


def _count_limits(expr) -> int:
    """Summed indices in ``expr``: Σ_{q,l} counts two."""
    return sum(len(n.limits) for n in sp.preorder_traversal(expr) if isinstance(n, sp.Sum))


class Simplifier:
    def __init__(self, program: Program):
        self.program = program
        self.spec = program.spec
        self.defs = self._definitions()
        # reductions over several indices (group norm's mean over channels of a group and
        # length), matched against nested sums: Σ_l Σ_q X[n, Cg·g + q, l] = Cg·L·mu[n, g]
        self.multi = [Definition(program.access(a.target, a.lhs), tuple(a.over), a.body, a.lhs)
                      for a in program.assigns
                      if a.reduce == "sum" and len(a.over) > 1 and a.kind != "update"]
        # a one-hot indicator of labels stays a named 0/1 tensor: its fact (rows sum to one)
        # applies to it, and inlining δ(c, y[n]) would turn sums over c into gathers
        self.elementwise = {a.target: a for a in program.assigns
                            if a.reduce is None and a.kind in ("let", "lifted", "output")
                            and not self.spec.tensors[a.target].onehot_of}
        # Σ_var body is folded the same way wherever it appears (each order of a sum's limits
        # and each nested attempt meets the same terms again): remember each result
        self._folded: dict[tuple, sp.Expr] = {}
        self._foldable = self._foldable_names()
        self._attempts = 0  # inlining attempts in the current top-level call
        self._top = False

    # -- what is known ------------------------------------------------------------------------
    def _definitions(self) -> list[Definition]:
        defs = []
        for a in self.program.assigns:
            if a.reduce == "sum" and len(a.over) == 1 and a.kind != "update":
                defs.append(Definition(self.program.access(a.target, a.lhs), a.over[0], a.body,
                                       a.lhs))
        for fact in self.spec.facts:
            from gradtool.spec.lang import SumOver

            if isinstance(fact.lhs, SumOver) and len(fact.over if hasattr(fact, "over")
                                                     else fact.lhs.over) == 1:
                body, (r,) = fact.lhs.body, fact.lhs.over
                free = tuple(sorted(body.free_symbols & set(self.program.ranges) - {r}, key=str))
                defs.append(Definition(sp.sympify(fact.rhs), r, body, free))
        return defs

    # -- the main pass ---------------------------------------------------------------------
    def __call__(self, expr: sp.Expr, depth: int = 0) -> sp.Expr:
        """``expr`` with its sums folded (see the module docstring); at most ``FOLD_BUDGET``
        inlining attempts per top-level call, past which a sum that would need one stays a
        sum (still right, only less simplified)."""
        if self._top:
            return self._simplify(expr, depth)
        self._top, self._attempts = True, 0
        try:
            return self._simplify(expr, depth)
        finally:
            self._top = False

    def _simplify(self, expr, depth):
        expr = expand(expr, self.inert)
        expr = self._sums(expr, depth)
        return expand(expr, self.inert)

    def inert(self, factor) -> bool:
        """Can multiplying out the sum ``factor`` fold nothing? True if it holds no Σ or
        Kronecker delta and reads no tensor that a sum's definition (or a stated fact) reads
        or names, directly or through element-wise intermediates: then each of its terms
        stays in the ratio of every fold (:meth:`_match`), and expanding it only multiplies
        terms."""
        if factor.has(sp.Sum, sp.KroneckerDelta):
            return False
        return not ({access_name(a) for a in accesses(factor, self.spec)} & self._foldable)

    def _foldable_names(self) -> set[str]:
        """The tensors a definition reads or names, and every element-wise intermediate that
        reads one of them, however indirectly (see :meth:`inert`)."""
        names = set()
        for d in self.defs + self.multi:
            names |= {access_name(a) for a in accesses(d.body, self.spec)}
            names |= {access_name(a) for a in accesses(d.value, self.spec)}
        grown = True
        while grown:
            grown = False
            for name, a in self.elementwise.items():
                if name not in names and \
                        {access_name(x) for x in accesses(a.body, self.spec)} & names:
                    names.add(name)
                    grown = True
        return names

    def _attempt(self) -> bool:
        """Count one inlining attempt; False once the budget of this call is spent."""
        if self._attempts >= FOLD_BUDGET:
            return False
        self._attempts += 1
        return True

    def _sums(self, expr, depth):
        if isinstance(expr, sp.Sum):
            body = self(expr.function, depth)
            # a finite sum over several indices may be taken in any order, and a definition
            # may only fold in one of them: Σ_c Σ_l x̂ vanishes through s_mu = Σ_l X and
            # mu = Σ_c s_mu / (C·L), but nothing folds Σ_c x̂ first
            best = None
            for order in _orders(expr.limits):
                out = body
                for var, lo, hi in order:
                    out = self.sum_over(out, var, hi - lo + 1, depth)
                if count_sums(out) <= count_sums(body):
                    return out  # every index of this sum folded away
                if best is None or count_sums(out) < count_sums(best):
                    best = out
            return best
        if not expr.args or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
            return expr
        if not expr.has(sp.Sum):
            return expr
        return expr.func(*[self._sums(a, depth) for a in expr.args])

    def sum_over(self, body, var, count, depth) -> sp.Expr:
        """Σ_var body, with body already simplified.

        Σ of a sum splits into a sum per term, so that each term may fold on its own. Where
        none folds and two or more of the terms hold a sum of their own, the split is undone:
        splitting Σ_e W[e,d]·(a·Σ(…) − Σ(…)) only doubles the sums, and on a chain of
        contractions (the adjoint of k tanh layers, Σ W_1·(1 − h_1²)·Σ W_2·(1 − h_2²)·…)
        each level doubles them again, 2^k sums multiplied out where k nested ones say the
        same."""
        out, kept, split = [], [], []
        for term in sp.Add.make_args(expand(body, self.inert)):
            summed = self._sum_term(term, var, count, depth)
            if var in term.free_symbols:
                kept.append(term)
                split.append(summed)
            else:
                out.append(summed)
        if nested_terms(sp.Add(*kept)) >= 2 and all(
                count_sums(s) > count_sums(t) for t, s in zip(kept, split, strict=True)):
            return sp.Add(*out, sp.Sum(sp.Add(*kept), (var, 0, count - 1)))
        return sp.Add(*out, *split)

    def _sum_term(self, term, var, count, depth):
        factors = sp.Mul.make_args(term)
        dep = [f for f in factors if var in f.free_symbols]
        rest = sp.Mul(*[f for f in factors if var not in f.free_symbols])
        if not dep:
            return count * rest
        for f in dep:  # Σ_j δ(j, k) g(j) = g(k)
            if isinstance(f, sp.KroneckerDelta):
                a, b = f.args
                other = b if a == var else a if b == var else None
                if other is not None and var not in other.free_symbols:
                    remaining = sp.Mul(*[g for g in dep if g is not f])
                    return rest * rename(remaining, {var: other})
        body = sp.Mul(*dep)
        folded = self.fold(body, var, count, depth)
        if count_sums(folded) > count_sums(body):
            swapped = self._interchange(dep, var, count, depth)
            if swapped is not None and count_sums(swapped) < count_sums(folded):
                return rest * swapped
        return rest * folded

    def _interchange(self, dep, var, count, depth):
        """Σ_s f(s)·Σ_j g(s, j) taken as Σ_j Σ_s f·g, where the inner sum over s folds into a
        definition: Σ_s A[t,s]·Σ_j G[t,j]·V[s,j] = Σ_j G[t,j]·O[t,j] with O = Σ_s A·V."""
        inner = [f for f in dep if isinstance(f, sp.Sum)]
        if len(inner) != 1 or depth >= 2:
            return None
        (inside,) = inner
        bound = {lim[0] for lim in inside.limits}
        others = [f for f in dep if f is not inside]
        if any(f.free_symbols & bound for f in others):
            return None
        # only where a term of the swapped inner sum could fold (:meth:`_could_fold`) or a
        # Kronecker delta could take a sum away (group norm's δ(c, Cg·g + q)): each try
        # simplifies the whole inner sum again, on a chain of layers the rest of the chain
        product = sp.Mul(*others)
        if not product.has(sp.KroneckerDelta) and not any(
                self._could_fold(product * t, var, 1 - depth)
                for t in sp.Add.make_args(inside.function)):
            return None
        if not self._attempt():
            return None
        out = self.sum_over(expand(sp.Mul(*others) * inside.function, self.inert), var, count,
                            depth + 1)
        for j, lo, hi in inside.limits:
            out = self.sum_over(out, j, hi - lo + 1, depth + 1)
        return out

    # -- folding a sum into what it already names ---------------------------------------------
    def fold(self, body, var, count, depth) -> sp.Expr:
        """Σ_var body (``count`` terms) as what a definition names, else as a form with
        fewer sums once element-wise intermediates are inlined, else the plain sum.

        Results are remembered by (body, var, count, depth), except those that the
        attempt budget cut short: with budget left later, the same sum may fold further."""
        key = (body, var, count, depth)
        if key in self._folded:
            return self._folded[key]
        spent = self._attempts >= FOLD_BUDGET
        out = self._fold(body, var, count, depth)
        if not spent and self._attempts < FOLD_BUDGET:
            self._folded[key] = out
        return out

    def _fold(self, body, var, count, depth) -> sp.Expr:
        hi = count - 1
        if isinstance(body, sp.Sum) and self.multi:
            found = self._fold_nested(body, var, count, depth)
            if found is not None:
                return found
        for d in self.defs:
            found = self._match(d, body, var)
            if found is not None:
                return found
        summed = sp.Sum(body, (var, 0, hi))
        if depth < 3 and any(access_name(a) in self.elementwise
                             for a in accesses(body, self.spec)):
            raw = self.inline_elementwise(body)
            if not self._could_fold(raw, var, 2 - depth) or sp.count_ops(raw) > INLINE_BUDGET \
                    or not self._attempt():
                return summed  # inlining is only worth its (exponential) cost if a sum folds
            inlined = self(raw, depth + 1)
            candidate = self.sum_over(inlined, var, count, depth + 1)
            if candidate == 0 or count_sums(candidate) < count_sums(summed):
                return candidate
        return summed

    def _could_fold(self, expr, var, stages: int) -> bool:
        """Could Σ_var of a term of ``expr`` fold into a definition once element-wise
        intermediates are inlined up to ``stages`` times (0: as it is)?

        :meth:`_match` folds a term only if it reads everything the definition's body reads,
        each read with ``var`` where the body has the summed index (mu = Σ_d X[n, d] / D:
        X[n, var]), and nothing else that depends on ``var``; otherwise the ratio keeps it.
        So Σ_d of X[d, n], of X[n] alone or of G[n, d]·X[n, d] never folds into mu, however
        far it is inlined, and trying costs a nested simplification for each order of each
        sum (docs/fuzzing.md, finding 18)."""
        stage = set(accesses(expr, self.spec))
        for k in range(stages + 1):
            # and a read of var that no such definition reads (the upstream gradient G[n, d])
            # stays in the ratio of every term that has it
            fits = [d for d in self.defs if self._reads_all(d, stage, var)]
            names = {access_name(r) for d in fits for r in accesses(d.body, self.spec)}
            if fits and all(access_name(a) in names for a in stage
                            if any(var in i.free_symbols for i in access_indices(a))):
                return True
            if k == stages:
                break
            inlined = set()
            for node in stage:
                a = self.elementwise.get(access_name(node))
                if a is None:
                    inlined.add(node)
                else:
                    inlined.update(accesses(rename(a.body, dict(zip(a.lhs, access_indices(node)))),
                                            self.spec))
            if inlined == stage:
                break
            stage = inlined
        return False

    def _reads_all(self, d: Definition, found: set, var) -> bool:
        """Does ``found`` (accesses) have each read of ``d``'s body, with ``var`` at the
        positions of the summed index?"""
        for read in accesses(d.body, self.spec):
            slots = [p for p, i in enumerate(access_indices(read)) if d.over in i.free_symbols]
            if not any(access_name(a) == access_name(read)
                       and all(var in access_indices(a)[p].free_symbols for p in slots)
                       for a in found):
                return False
        return True

    def _match(self, d: Definition, body, var):
        mine = accesses(d.body, self.spec)
        theirs = accesses(body, self.spec)
        if not mine:
            return None
        first = mine[0]
        for cand in theirs:
            if access_name(cand) != access_name(first):
                continue
            mapping = _bind({d.over: var}, first, cand)
            # free indices the first read leaves open come from the others (O = Σ_s A·V:
            # A[t,s] gives t, V[s,j] gives j)
            for other in mine[1:]:
                if mapping is None or all(i in mapping for i in d.free):
                    break
                mapping = next((m for m in (_bind(mapping, other, c) for c in theirs
                                            if access_name(c) == access_name(other))
                                if m is not None), mapping)
            if mapping is None or any(i not in mapping for i in d.free):
                continue
            if len(set(mapping.values())) != len(mapping):
                continue  # Σ_k A[k]/B[k] is not t[k] = Σ_k A[k]/B[d]: the sum index is its own
            pattern = rename(d.body, mapping)
            ratio = body / pattern  # equal factors cancel as SymPy builds the quotient
            if (var in ratio.free_symbols or ratio.has(sp.Indexed)) and \
                    isinstance(pattern, sp.Add) and sp.count_ops(body) <= CANCEL_BUDGET:
                ratio = sp.cancel(ratio)  # a sum in the definition: Σ (a + b)·c = c·t
            if var in ratio.free_symbols or ratio.has(sp.Indexed) or accesses(ratio, self.spec):
                continue
            if ratio.free_symbols - set(self.spec.dim_symbols.values()) \
                    - {h.symbol for h in self.spec.hypers.values()}:
                continue
            return ratio * rename(d.value, mapping)
        return None

    def _fold_nested(self, body, var, count, depth):
        """Σ_var Σ_q f as what a reduction over (q, var) names, or as a form with fewer sums
        once element-wise intermediates are inlined (Σ_l Σ_q x̂ = 0 in group norm); None if
        neither."""
        inner = body.function
        over = [lim[0] for lim in body.limits] + [var]
        for d in self.multi:
            found = self._match_many(d, inner, over)
            if found is not None:
                return found
        if depth >= 3 or not any(access_name(a) in self.elementwise
                                 for a in accesses(inner, self.spec)):
            return None
        raw = self.inline_elementwise(inner)
        if sp.count_ops(raw) > INLINE_BUDGET or not self._could_fold_many(raw) \
                or not self._attempt():
            return None
        candidate = self(raw, depth + 1)
        for v, lo, hi in body.limits:
            candidate = self.sum_over(candidate, v, hi - lo + 1, depth + 1)
        candidate = self.sum_over(candidate, var, count, depth + 1)
        if candidate == 0 or _count_limits(candidate) < _count_limits(body) + 1:
            return candidate
        return None

    def _could_fold_many(self, expr) -> bool:
        names = {access_name(a) for a in accesses(expr, self.spec)}
        return any(access_name(accesses(d.body, self.spec)[0]) in names for d in self.multi
                   if accesses(d.body, self.spec))

    def _match_many(self, d: Definition, body, over):
        """``value·ratio`` if Σ_over body is ``ratio`` times the reduction ``d``; else None."""
        from itertools import permutations

        mine = accesses(d.body, self.spec)
        if not mine or len(d.over) != len(over):
            return None
        ranges = self.program.ranges
        for cand in accesses(body, self.spec):
            if access_name(cand) != access_name(mine[0]):
                continue
            for order in permutations(over):
                if any(ranges.get(o) != ranges.get(v) for o, v in zip(d.over, order)):
                    continue
                mapping = self._map_indices(mine[0], cand, dict(zip(d.over, order)))
                if mapping is None or any(i not in mapping for i in d.free) or \
                        len(set(mapping.values())) != len(mapping):
                    continue
                ratio = body / rename(d.body, mapping)
                if set(over) & ratio.free_symbols and isinstance(d.body, sp.Add) and \
                        sp.count_ops(body) <= CANCEL_BUDGET:
                    ratio = sp.cancel(ratio)
                if set(over) & ratio.free_symbols or ratio.has(sp.Indexed) or \
                        accesses(ratio, self.spec) or ratio.free_symbols \
                        - set(self.spec.dim_symbols.values()) \
                        - {h.symbol for h in self.spec.hypers.values()}:
                    continue
                return ratio * rename(d.value, mapping)
        return None

    def _map_indices(self, pattern, access, mapping):
        """Extend ``mapping`` so that ``pattern``'s indices become ``access``'s: plain
        indices map to what stands in their place, and an affine position Cg·g + q with one
        index not yet mapped is solved for it; None if they cannot correspond."""
        mapping = dict(mapping)
        pairs = list(zip(access_indices(pattern), access_indices(access)))
        for a, b in pairs:
            if isinstance(a, sp.Symbol) and mapping.setdefault(a, b) != b:
                return None
        for a, b in pairs:
            if isinstance(a, sp.Symbol):
                continue
            unknown = [s for s in a.free_symbols if s in self.program.ranges
                       and s not in mapping]
            if len(unknown) > 1:
                return None
            if unknown:
                s = unknown[0]
                step = sp.expand(a).coeff(s)
                target = sp.expand((b - rename(a.xreplace({s: 0}), mapping)) / step)
                if not isinstance(target, sp.Symbol) or target not in self.program.ranges:
                    return None
                mapping[s] = target
            if sp.expand(rename(a, mapping) - b) != 0:
                return None
        return mapping

    def inline_elementwise(self, expr):
        """Replace each access of an element-wise intermediate by its definition."""
        def repl(node):
            name = access_name(node)
            a = self.elementwise.get(name)
            if a is None:
                return node
            return rename(a.body, dict(zip(a.lhs, access_indices(node))))
        subs = {node: repl(node) for node in accesses(expr, self.spec)}
        return expr.xreplace(subs)

    # -- presentation ------------------------------------------------------------------------
    def eliminations(self) -> list[tuple[str, tuple, sp.Expr]]:
        """Forward monomials solved for their earliest intermediate factor:
        xhat = xc·rstd gives xc = xhat/rstd, S = e/Z gives e = S·Z."""
        order = {a.target: k for k, a in enumerate(self.program.assigns)}
        out = []
        for a in self.program.assigns:
            if a.reduce is not None or a.kind == "update":
                continue
            coeff, factors = a.body.as_coeff_mul()
            cands = []
            for f in factors:
                base, exp = f.as_base_exp()
                if not (isinstance(base, (sp.Indexed, sp.Symbol)) and abs(exp) == 1):
                    continue
                if not accesses(base, self.spec) or base != accesses(base, self.spec)[0]:
                    continue
                name = access_name(base)
                if name not in self.elementwise and not self._is_reduction(name):
                    continue
                if set(access_indices(base)) != set(a.lhs) or \
                        len(access_indices(base)) != len(a.lhs):
                    continue
                cands.append((order.get(name, 1 << 30), base, exp))
            if not cands or len(factors) < 2:
                continue
            _, base, exp = min(cands, key=lambda c: c[0])
            target = self.program.access(a.target, a.lhs)
            others = a.body / base ** exp
            solution = (target / others) ** exp
            if not all(self._safe_divisor(f) for f in self._divisors(solution)):
                continue  # xhat = Y/g would divide by a parameter that may be zero
            out.append((access_name(base), access_indices(base), solution))
        return out

    @staticmethod
    def _divisors(expr):
        return [f.base for f in sp.Mul.make_args(expr)
                if isinstance(f, sp.Pow) and f.exp.is_negative]

    def _safe_divisor(self, factor) -> bool:
        """Nonzero wherever the forward is finite: the forward divides by it already, or it
        is itself a reciprocal (rstd = (var + eps)^(-1/2))."""
        if not accesses(factor, self.spec) or factor != accesses(factor, self.spec)[0]:
            return False
        name = access_name(factor)
        for a in self.program.assigns:
            if a.target == name and isinstance(a.body, sp.Pow) and a.body.exp.is_negative:
                return True
            for f in self._divisors(a.body):
                found = accesses(f, self.spec)
                if found and f == found[0] and access_name(f) == name:
                    return True
        return False

    def _is_reduction(self, name):
        return any(a.target == name and a.reduce for a in self.program.assigns)

    def rewrite(self, expr):
        """Express ``expr`` in the later forward names (see :meth:`eliminations`).

        An arg-max mask ``[B = max B]`` keeps its operands: it tests equality with the value
        the forward computed, and an algebraically equal rewrite would not compare equal in
        floating point."""
        from gradtool.symbolic.ir import ArgMaxMask

        masks = {m: sp.Dummy("mask") for m in expr.atoms(ArgMaxMask)}
        expr = expr.xreplace(masks)
        expr = self._rewrite(expr)
        return expr.xreplace({v: k for k, v in masks.items()})

    def _rewrite(self, expr):
        for name, idx, solution in self.eliminations():
            subs = {}
            for node in accesses(expr, self.spec):
                if access_name(node) == name:
                    subs[node] = rename(solution, dict(zip(idx, access_indices(node))))
            if subs:
                expr = expr.xreplace(subs)
        return expr

    def substitute_forward(self, expr, assign=None):
        """Replace sub-expressions that equal a forward element-wise body by its name.

        SymPy's ``subs`` also rewrites powers of the body's base: with Y = X^p it writes
        p·X^(p−1) as p·Y/X. Such a substitution is kept only where it divides by nothing
        that can be zero where the expression before it is finite (:meth:`_adds_poles`):
        at X = 0 the quotient is 0/0 (NaN in the kernels) where the derivative is 0."""
        for a in self.program.assigns:
            if a.reduce is not None or a.kind == "update" or a.body.is_Atom \
                    or isinstance(a.body, sp.Indexed):
                continue
            if a.lhs and set(a.lhs) != a.body.free_symbols & set(self.program.ranges):
                continue
            if len(accesses(a.body, self.spec)) != 1:
                continue  # only functions of one tensor: tanh → 1 − Y², not X/Y → Z
            target = self.program.access(a.target, a.lhs)
            found = expr.subs(a.body, target)
            if found != expr and not self._adds_poles(expr, found, {target: a.body}):
                expr = found
        return expr

    def _adds_poles(self, before, after, definitions: dict) -> bool:
        """Does ``after`` (``before`` with forward values named) divide by a value that can
        be zero where ``before`` divides by nothing that is zero there?

        A divisor of ``after`` is written back through ``definitions`` (name → body) and
        split into the values whose zero makes it zero (:func:`zero_factors`); each must be
        a zero of a divisor of ``before`` already (1/(2·√X) named 1/(2·Y) with Y = √X), or
        nonzero by its declaration (an input of domain positive, nonzero or unit, a size, a
        positive hyper-parameter). p·Y/X for p·X^(p−1) adds the pole X = 0."""
        old = set()
        for base in _divisor_bases(before, surely=True):
            old |= zero_factors(base)
        for base in _divisor_bases(after, surely=False):
            for factor in zero_factors(base.xreplace(definitions)):
                if factor not in old and not self._nonzero(factor):
                    return True
        return False

    def _nonzero(self, value) -> bool:
        """Nonzero by declaration: SymPy's assumptions (numbers, sizes, positive
        hyper-parameters) or a read of a tensor whose domain excludes 0."""
        if value.is_nonzero:
            return True
        found = accesses(value, self.spec)
        if found and value == found[0]:
            return self.spec.tensors[access_name(value)].domain in NONZERO_DOMAINS
        return False
