"""Random shapes and inputs for checks: each input's declared domain and the spec's facts.

A stated fact is a promise about the inputs that the simplifier may use (softmax cross-entropy
reaches (P − T)/N only because Σ_k T[n, k] = 1), so the inputs a check samples must keep it.
A fact ``Σ_{k…} A[…] = r`` about an input ``A`` makes the slices of ``A`` over the summed axes
sum to ``r`` (sizes and hyper-parameters in ``r`` take their sampled values), drawn in ``A``'s
domain:

* real: normal draws shifted to the sum;
* positive: positive draws scaled to the sum (probability rows for r = 1);
* unit: draws in (0, 1) that sum to r, for 0 < r < the number of summed elements (all ones
  for r equal to it: probability rows over one class);
* nonzero: normal draws shifted to the sum, redrawn while an element is near zero;
* binary: exactly r ones in each slice (one-hot rows for r = 1).

A fact the sampler cannot honour (another form, a sum that the domain cannot reach, two facts on
one tensor) raises :class:`SpecError` at the fact's line instead of letting a check compare
gradients at inputs that break it; :func:`fact_violations` then verifies every fact, about
inputs or intermediates, on the sampled values.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from gradtool.errors import SpecError
from gradtool.spec.lang import Fact, Spec, SumOver

# how far a nonzero input stays from 0 (its free draws are at least 0.5 away)
NONZERO_MARGIN = 0.1
# relative error allowed when a stated fact is verified on sampled values
FACT_RTOL = 1e-9


def sample_dims(spec: Spec, rng: np.random.Generator, low: int = 1, high: int = 5,
                fixed: dict[str, int] | None = None) -> dict[sp.Symbol, int]:
    """A random size for every dimension; ``fixed`` pins some by name (``{"N": 1}``).

    A size whose ``min_size`` is 0 (a padding) is drawn from 0. Derived sizes
    (``spec.size``) are computed from the others, which are drawn again until every derived
    size is at least 1 and every ``spec.require`` relation holds (a window no larger than
    the padded input); where no draw up to ``high`` does, the range widens (to 8 × ``high``).
    Raises :class:`SpecError` when no draw does."""
    fixed = fixed or {}
    # sizes up to ``high`` first; a requirement only larger sizes meet (N > D + 5) widens the
    # range, doubling it up to 8 × ``high``
    for top in (high, 2 * high, 4 * high, 8 * high):
        for _ in range(SIZE_TRIES):
            out = {}
            for name, sym in spec.base_dims.items():
                least = spec.min_sizes.get(name, 1)
                start = 0 if least == 0 else max(low, least)
                value = fixed.get(name, rng.integers(start, max(top, least) + 1))
                out[sym] = max(int(value), least)
            if not spec.derived and not spec.requires and not spec.training_requires:
                return out
            try:
                return spec.sizes_from(out)
            except SpecError:
                continue
    raise SpecError(f"no sizes from {low} to {8 * high} satisfy the derived sizes and "
                    f"requirements of {spec.name}" + (f" with {fixed}" if fixed else ""),
                    file=spec.file, hint="check spec.size(...) and spec.require(...), or "
                    "the sizes fixed with --set")


SIZE_TRIES = 200  # draws of the sizes before giving up on derived sizes and requirements


def _draw(domain: str, shape, rng: np.random.Generator) -> np.ndarray:
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    if domain == "unit":
        return rng.uniform(0.05, 0.95, shape)
    if domain == "binary":
        return rng.integers(0, 2, shape).astype(np.float64)
    return rng.standard_normal(shape)


def sample_inputs(spec: Spec, dims: dict[sp.Symbol, int],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values for every input, parameter and state tensor of ``spec``: float64 arrays in each
    one's domain, int64 arrays in [0, classes) for integer labels, and every stated fact about
    an input kept (see the module docstring). Raises :class:`SpecError` for a fact that
    cannot be kept."""
    values = {}
    for t in spec.of_kind("input", "param", "state"):
        shape = tuple(int(sp.sympify(d).subs(dims)) for d in t.dims)
        if t.is_labels:
            values[t.name] = rng.integers(0, int(sp.sympify(t.classes).subs(dims)), shape)
            continue
        domain = "positive" if t.kind == "state" else t.domain
        values[t.name] = _draw(domain, shape, rng)
    _apply_facts(spec, values, dims, rng)
    return values


SIZES = ("if the fact needs larger sizes than checks sample (from 1), declare them with "
         "spec.min_size(C=2)")


def fact_text(fact: Fact) -> str:
    """``Σ_k(T[n,k]) = 1``: a fact as the derivation prints it."""
    from gradtool.symbolic.printing import text

    def as_sum(e):
        return sp.Sum(e.body, *[(i, 0, 1) for i in e.over])
    return f"{text(fact.lhs.replace(lambda e: isinstance(e, SumOver), as_sum))} = " \
        f"{text(fact.rhs)}"


def _cannot(spec: Spec, fact: Fact, why: str, hint: str | None = None) -> SpecError:
    return spec.error(f"checks cannot sample inputs that keep the fact "
                      f"{fact_text(fact)}: {why}", fact.line,
                      hint or "state facts as Sum(A[n, k], k) = r about an input A; see "
                           "docs/spec-language.md, 'Facts'")


def _input_fact(spec: Spec, fact: Fact):
    """(input name, summed axes) for ``Σ_{k…} A[…] = r`` about an input, or None for a fact
    about intermediates (which the forward computes, and :func:`fact_violations` verifies).
    Raises :class:`SpecError` for a fact about an input in any other form."""
    names = {a.base.label.name for a in fact.lhs.atoms(sp.Indexed)} | {
        s.name for s in fact.lhs.free_symbols if s.name in spec.tensors}
    inputs = sorted(n for n in names if spec.tensors[n].kind in ("input", "param", "state"))
    if not inputs:
        return None
    lhs = fact.lhs
    if not (isinstance(lhs, SumOver) and isinstance(lhs.body, sp.Indexed)):
        raise _cannot(spec, fact, "the left side is not a sum of one input")
    name, idx = lhs.body.base.label.name, tuple(lhs.body.indices)
    t = spec.tensors[name]
    if t.is_labels:
        raise _cannot(spec, fact, f"`{name}` holds integer labels, which need no fact",
                      f"state facts about spec.onehot({name}) instead (its rows sum to one "
                      "already)")
    if t.grad:
        raise _cannot(spec, fact, f"`{name}` is differentiable: finite differences and "
                                  "autograd move it off the fact, where a gradient simplified "
                                  "with the fact need not agree",
                      "state facts about inputs declared with grad=False (targets, masks)")
    if not all(i in spec.index_dims for i in idx) or len(set(idx)) != len(idx) \
            or not set(lhs.over) <= set(idx):
        raise _cannot(spec, fact, f"`{lhs.body}` must read `{name}` at distinct plain "
                                  "indices, the summed ones among them")
    if fact.rhs.free_symbols - set(spec.dim_symbols.values()) \
            - {h.symbol for h in spec.hypers.values()}:
        raise _cannot(spec, fact, "the right side must be a number (sizes and "
                                  "hyper-parameters allowed)")
    return name, tuple(idx.index(i) for i in lhs.over)


def _apply_facts(spec: Spec, values: dict[str, np.ndarray], dims: dict,
                 rng: np.random.Generator) -> None:
    """Redraw inputs so that every stated sum holds in their domain."""
    constrained: dict[str, Fact] = {}
    for fact in spec.facts:
        found = _input_fact(spec, fact)
        if found is None:
            continue
        name, axes = found
        if name in constrained:
            raise _cannot(spec, fact, f"`{name}` already has the fact on line "
                                      f"{constrained[name].line}; checks sample one sum "
                                      "constraint per tensor")
        constrained[name] = fact
        total = float(sp.sympify(fact.rhs).subs(dims).subs(spec.hyper_defaults()))
        t = spec.tensors[name]
        domain = "positive" if t.kind == "state" else t.domain  # as sample_inputs draws it
        values[name] = _with_sums(spec, fact, domain, values[name], axes, total, rng)


def _with_sums(spec: Spec, fact: Fact, domain: str, x: np.ndarray, axes: tuple,
               total: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` redrawn in ``domain`` so that it sums to ``total`` over ``axes``."""
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, rest + list(axes))
    shape = moved.shape
    count = int(np.prod(shape[len(rest):]))   # elements in each summed slice
    if count == 0 or x.size == 0:
        return x
    rows = moved.reshape(-1, count)
    if domain == "binary":
        ones = int(round(total))
        if ones != total or not 0 <= ones <= count:
            raise _cannot(spec, fact, f"a 0/1 tensor sums to a whole number between 0 and "
                                      f"{count} over the summed axes, not {total:g}", SIZES)
        rows = np.zeros_like(rows)
        for r in range(rows.shape[0]):  # `ones` distinct positions per slice: one-hot for 1
            rows[r, rng.choice(count, size=ones, replace=False)] = 1.0
    elif domain == "positive":
        if total <= 0:
            raise _cannot(spec, fact, f"positive values cannot sum to {total:g}")
        rows = rows / rows.sum(axis=1, keepdims=True) * total
    elif domain == "unit":
        if not 0 < total <= count:  # total = count: every value is 1 (one class of one)
            raise _cannot(spec, fact, f"{count} values in (0, 1] cannot sum to {total:g}",
                          SIZES)
        rows = _unit_rows(rows, total)
    elif domain == "nonzero":
        rows = _nonzero_rows(spec, fact, rows, total, rng)
    else:
        rows = rows - rows.mean(axis=1, keepdims=True) + total / count
    back = np.argsort(rest + list(axes))
    return np.transpose(rows.reshape(shape), back)


def _unit_rows(rows: np.ndarray, total: float) -> np.ndarray:
    """Rows in (0, 1) summing to ``total``: a mix of the scaled draws p·total and the flat
    row total/K, with as much of the draws as keeps every element below one."""
    count = rows.shape[1]
    scaled = rows / rows.sum(axis=1, keepdims=True) * total
    flat = total / count
    peak = scaled.max(axis=1, keepdims=True)
    # flat + w·(peak − flat) < 1 for every row; w = 1 (the scaled draws) when they fit
    room = np.where(peak > flat, (1 - flat) / np.maximum(peak - flat, 1e-300), np.inf)
    w = np.minimum(1.0, 0.9 * room)
    return flat + w * (scaled - flat)


def _nonzero_rows(spec, fact, rows, total, rng, tries: int = 100) -> np.ndarray:
    count = rows.shape[1]
    out = rows - rows.mean(axis=1, keepdims=True) + total / count
    for _ in range(tries):
        bad = (np.abs(out) < NONZERO_MARGIN).any(axis=1)
        if not bad.any():
            return out
        fresh = rng.choice([-1.0, 1.0], (int(bad.sum()), count)) * \
            rng.uniform(0.5, 2.0, (int(bad.sum()), count))
        out[bad] = fresh - fresh.mean(axis=1, keepdims=True) + total / count
    raise _cannot(spec, fact, f"no draw of {count} values kept every one away from zero")


def fact_violations(program, env: dict, dims: dict) -> list[tuple[Fact, float]]:
    """Stated facts that the values in ``env`` (inputs and the forward's intermediates) break,
    with the largest relative error of each. A fact about intermediates that does not hold
    means the simplifier was told something false."""
    from gradtool.symbolic.evaluate import Evaluator, ops_for, sizes_for
    from gradtool.symbolic.ir import accesses

    spec = program.spec
    values = {**dims, **spec.hyper_defaults()}
    broken = []
    for fact in spec.facts:
        if any(n.base.label.name not in env for n in fact.lhs.atoms(sp.Indexed)):
            continue
        free = tuple(sorted({s for s in fact.lhs.free_symbols if s in program.ranges}
                            - set(getattr(fact.lhs, "over", ())), key=str))
        run = Evaluator(env, values, sizes_for(program, dims), ops_for("numpy"))
        lhs = np.asarray(run.run(fact.lhs, free), dtype=np.float64)
        rhs = float(sp.sympify(fact.rhs).subs(values))
        # the scale of the terms summed: Σ|body| (Σ_d xc = 0 holds to round-off of Σ|xc|)
        scale = abs(rhs) + 1.0
        if isinstance(fact.lhs, SumOver) and accesses(fact.lhs, spec):
            size = Evaluator(env, values, sizes_for(program, dims), ops_for("numpy"))
            terms = SumOver(sp.Abs(fact.lhs.body), *fact.lhs.over)
            scale = scale + np.asarray(size.run(terms, free), dtype=np.float64)
        with np.errstate(invalid="ignore"):
            err = np.abs(lhs - rhs) / scale
        if err.size and not np.all(err <= FACT_RTOL):
            broken.append((fact, float(np.nanmax(np.where(np.isfinite(err), err, np.inf)))))
    return broken
