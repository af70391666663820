"""Index-aware simplification of derived expressions.

SymPy does the scalar algebra (expand, cancel, powers); this module does what SymPy's ``Sum``
cannot: linearity of Σ, pulling out factors free of the summed index, Σ of a constant,
Kronecker-delta elimination, folding a sum back into a forward tensor it defines (Σ_d X = D·mu),
using stated facts (Σ_c T = 1), and re-expressing forward intermediates in the names a textbook
uses (xc = xhat/rstd, e = S·Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from gradtool.symbolic.ir import Program, access_indices, access_name, accesses, rename


@dataclass
class Definition:
    """``value = Σ_over body`` with ``free`` indices: a forward reduction or a stated fact."""

    value: sp.Expr
    over: sp.Symbol
    body: sp.Expr
    free: tuple


def expand(expr) -> sp.Expr:
    """``sp.expand`` that leaves arg-max masks and denominators as they are.

    A mask ``[body = max body]`` compares the body with the value the forward computed; an
    expanded body is algebraically equal but does not compare equal in floating point."""
    from gradtool.symbolic.ir import ArgMaxMask

    keep = {m: sp.Dummy("mask") for m in expr.atoms(ArgMaxMask)} if expr.has(ArgMaxMask) \
        else {}
    # a denominator stays a product of its factors: x/((1 + a²)(1 + b²)), not x/(a²b² + …)
    for p in expr.atoms(sp.Pow):
        if p.exp.is_negative and isinstance(p.base, sp.Add) and p.base not in keep:
            keep[p.base] = sp.Dummy("den")
    if not keep:
        return sp.expand(expr, power_base=False, power_exp=False, log=False)
    out = sp.expand(expr.xreplace(keep), power_base=False, power_exp=False, log=False)
    return out.xreplace({v: k for k, v in keep.items()})


# Folding inlines element-wise intermediates to find sums that vanish (Σ_d (X − μ) = 0), and
# expands what it inlined. The vanishing sums of normalisation layers are small (layer norm's
# largest is about 20 operations); past this size the expansion costs minutes and is skipped.
INLINE_BUDGET = 60
# Matching a term against a definition whose body is a sum needs polynomial cancellation, which
# grows fast with the term; a product body matches by cancelling equal factors alone.
CANCEL_BUDGET = 40


def count_sums(expr) -> int:
    return sum(1 for n in sp.preorder_traversal(expr) if isinstance(n, sp.Sum))


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
        self.elementwise = {a.target: a for a in program.assigns
                            if a.reduce is None and a.kind in ("let", "lifted", "output")}

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
        expr = expand(expr)
        expr = self._sums(expr, depth)
        return expand(expr)

    def _sums(self, expr, depth):
        if isinstance(expr, sp.Sum):
            body = self(expr.function, depth)
            for var, lo, hi in expr.limits:
                body = self.sum_over(body, var, hi - lo + 1, depth)
            return body
        if not expr.args or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
            return expr
        if not expr.has(sp.Sum):
            return expr
        return expr.func(*[self._sums(a, depth) for a in expr.args])

    def sum_over(self, body, var, count, depth) -> sp.Expr:
        """Σ_var body, with body already simplified."""
        out = []
        for term in sp.Add.make_args(expand(body)):
            out.append(self._sum_term(term, var, count, depth))
        return sp.Add(*out)

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
        return rest * self.fold(body, var, count, depth)

    # -- folding a sum into what it already names ---------------------------------------------
    def fold(self, body, var, count, depth) -> sp.Expr:
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
            if not self._could_fold(raw) or sp.count_ops(raw) > INLINE_BUDGET:
                return summed  # inlining is only worth its (exponential) cost if a sum folds
            inlined = self(raw, depth + 1)
            candidate = self.sum_over(inlined, var, count, depth + 1)
            if candidate == 0 or count_sums(candidate) < count_sums(summed):
                return candidate
        return summed

    def _could_fold(self, expr) -> bool:
        """Does ``expr`` read a tensor some definition sums (X in mu = Σ X / D), directly or
        through element-wise intermediates?"""
        names = {access_name(a) for a in accesses(expr, self.spec)}
        todo = list(names)
        while todo:  # what inlining element-wise definitions can bring in
            a = self.elementwise.get(todo.pop())
            for node in accesses(a.body, self.spec) if a is not None else ():
                if access_name(node) not in names:
                    names.add(access_name(node))
                    todo.append(access_name(node))
        for d in self.defs:
            mine = accesses(d.body, self.spec)
            if mine and access_name(mine[0]) in names:
                return True
        return False

    def _match(self, d: Definition, body, var):
        mine = accesses(d.body, self.spec)
        theirs = accesses(body, self.spec)
        if not mine:
            return None
        first = mine[0]
        for cand in theirs:
            if access_name(cand) != access_name(first):
                continue
            mapping = {d.over: var}
            ok = True
            for a, b in zip(access_indices(first), access_indices(cand)):
                if not isinstance(a, sp.Symbol):
                    ok = ok and a == b
                    continue
                if mapping.setdefault(a, b) != b:
                    ok = False
            if not ok or any(i not in mapping for i in d.free):
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
        if sp.count_ops(raw) > INLINE_BUDGET or not self._could_fold_many(raw):
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
        """Replace sub-expressions that equal a forward element-wise body by its name."""
        for a in self.program.assigns:
            if a.reduce is not None or a.kind == "update" or a.body.is_Atom \
                    or isinstance(a.body, sp.Indexed):
                continue
            if a.lhs and set(a.lhs) != a.body.free_symbols & set(self.program.ranges):
                continue
            if len(accesses(a.body, self.spec)) != 1:
                continue  # only functions of one tensor: tanh → 1 − Y², not X/Y → Z
            target = self.program.access(a.target, a.lhs)
            expr = expr.subs(a.body, target)
        return expr
