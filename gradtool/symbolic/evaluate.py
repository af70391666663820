"""Numeric evaluation of index-notation expressions, on NumPy or PyTorch arrays.

Every index gets one axis of a shared layout; an access ``A[i, j*S + p]`` becomes advanced
indexing with broadcast ``arange`` arrays, so affine indices need no special case; a ``Sum``
sums its axis away. This evaluates both forward statements and derived closed forms, which is
what lets the tests compare a derived formula with torch.autograd before code generation.
"""

from __future__ import annotations

import math

import numpy as np
import sympy as sp

from gradtool.spec.lang import MaxOver, Padded, SumOver
from gradtool.symbolic.ir import ArgMaxMask, Program


class NumpyOps:
    name = "numpy"

    def __init__(self):
        self.np = np

    def asarray(self, x):
        return np.asarray(x, dtype=np.float64)

    def arange(self, n):
        return np.arange(n)

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def sum(self, x, axis):
        return np.sum(x, axis=axis, keepdims=True)

    def amax(self, x, axis):
        return np.max(x, axis=axis, keepdims=True)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def func(self, name):
        if name == "erf":
            try:
                from scipy.special import erf
            except ImportError:  # pragma: no cover - scipy comes with scikit-learn
                erf = np.vectorize(math.erf)
            return erf
        if name == "Sigmoid":  # σ(u) = e^(−log(1 + e^(−u))): no overflow at large |u|
            return lambda u: np.exp(-np.logaddexp(0.0, -u))
        return {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sinh": np.sinh,
                "cosh": np.cosh, "sin": np.sin, "cos": np.cos, "atan": np.arctan,
                "Abs": np.abs, "sign": np.sign}[name]

    def broadcast(self, x, shape):
        return np.broadcast_to(x, shape).copy()

    def transpose(self, x, perm):
        return np.transpose(x, perm)

    def float(self, c):
        return c.astype(np.float64)

    def first_hit(self, hit, axes):
        """``hit`` (booleans) kept only at its first True over ``axes``, row-major."""
        k = len(axes)
        moved = np.moveaxis(hit, axes, range(-k, 0))
        flat = moved.reshape(moved.shape[:moved.ndim - k] + (-1,))
        first = flat & (np.cumsum(flat, axis=-1) == 1)
        return np.moveaxis(first.reshape(moved.shape), range(-k, 0), axes)


class TorchOps(NumpyOps):
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def asarray(self, x):
        return self.torch.as_tensor(x, dtype=self.torch.float64)

    def arange(self, n):
        return self.torch.arange(n)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def sum(self, x, axis):
        return x.sum(dim=axis, keepdim=True)

    def amax(self, x, axis):
        return x.amax(dim=axis, keepdim=True)

    def where(self, c, a, b):
        return self.torch.where(c, self.asarray(a), self.asarray(b))

    def maximum(self, a, b):
        return self.torch.maximum(self.asarray(a), self.asarray(b))

    def minimum(self, a, b):
        return self.torch.minimum(self.asarray(a), self.asarray(b))

    def func(self, name):
        t = self.torch
        return {"exp": t.exp, "log": t.log, "tanh": t.tanh, "sinh": t.sinh, "cosh": t.cosh,
                "sin": t.sin, "cos": t.cos, "atan": t.atan, "Abs": t.abs, "erf": t.erf,
                "sign": t.sign, "Sigmoid": t.sigmoid}[name]

    def broadcast(self, x, shape):
        return self.asarray(x).expand(shape).clone()

    def transpose(self, x, perm):
        return x.permute(perm)

    def float(self, c):
        return c.to(self.torch.float64)

    def first_hit(self, hit, axes):
        k = len(axes)
        last = tuple(range(-k, 0))
        moved = self.torch.movedim(hit, tuple(axes), last)
        flat = moved.reshape(tuple(moved.shape[:moved.dim() - k]) + (-1,))
        first = flat & (flat.cumsum(-1) == 1)
        return self.torch.movedim(first.reshape(moved.shape), last, tuple(axes))


def ops_for(backend: str):
    return TorchOps() if backend == "torch" else NumpyOps()


_SWITCHES = (ArgMaxMask, sp.Heaviside)


def _guarded(e: sp.Mul) -> bool:
    """A product of a 0/1 switch and a factor that may be inf or NaN (a division, a root, a
    log): where the switch is off, the product is 0 whatever that factor is."""
    return any(isinstance(a, _SWITCHES) for a in e.args) and any(
        isinstance(n, sp.log) or (isinstance(n, sp.Pow) and not (
            n.exp.is_integer and n.exp.is_nonnegative))
        for a in e.args if not isinstance(a, _SWITCHES) for n in sp.preorder_traversal(a))


class Evaluator:
    """Evaluates expressions given tensor values ``env`` and integer sizes of indices."""

    def __init__(self, env: dict, values: dict, sizes: dict, ops):
        self.env = env            # tensor name -> array
        self.values = values      # dimension / hyper-parameter symbol -> number
        self.sizes = sizes        # index symbol -> int
        self.ops = ops
        self.axes: dict[sp.Symbol, int] = {}

    def _axis(self, sym):
        if sym not in self.axes:
            self.axes[sym] = len(self.axes)
        return self.axes[sym]

    def _ndim(self, x):
        return len(x.shape) if hasattr(x, "shape") else 0

    def _lift(self, x):
        """Pad ``x`` with trailing unit axes to the current layout."""
        x = self.ops.asarray(x) if not hasattr(x, "shape") else x
        n = len(self.axes) - len(x.shape)
        return self.ops.reshape(x, tuple(x.shape) + (1,) * n) if n > 0 else x

    def index_array(self, sym):
        size = self.sizes.get(sym)
        if size is None:
            raise KeyError(f"no size for index {sym}")
        ax = self._axis(sym)
        shape = [1] * len(self.axes)
        shape[ax] = size
        return self.ops.reshape(self.ops.arange(size), tuple(shape))

    def run(self, expr: sp.Expr, free: tuple) -> object:
        """Evaluate ``expr`` and return an array whose axes follow ``free``."""
        for sym in free:
            self._axis(sym)
        out = self._lift(self.ev(expr))
        out = self._lift(out)
        shape = [1] * len(self.axes)
        for sym in free:
            shape[self.axes[sym]] = self.sizes[sym]
        out = self.ops.broadcast(out, tuple(max(a, b) for a, b in zip(out.shape, shape)))
        # keep only the free axes (others have size 1 after every sum)
        perm = [self.axes[s] for s in free] + [a for a in range(len(self.axes))
                                               if a not in {self.axes[s] for s in free}]
        out = self.ops.transpose(out, perm)
        return self.ops.reshape(out, tuple(self.sizes[s] for s in free))

    # -- the recursion ----------------------------------------------------------------------
    def ev(self, e):
        ops = self.ops
        if isinstance(e, Padded):
            return self._padded(e)
        if isinstance(e, sp.Indexed):
            arr = self.env[e.base.label.name]
            idx = [self.ev(i) for i in e.indices]
            idx = [self._lift(self.ops.asarray(i) if isinstance(i, float) else i) for i in idx]
            idx = [i.long() if ops.name == "torch" else i.astype(np.int64) for i in idx]
            return arr[tuple(idx)]
        if isinstance(e, sp.Symbol):
            if e in self.sizes:
                return self.index_array(e)
            if e in self.values:
                return self.values[e]
            if e.name in self.env:
                return self.env[e.name]
            raise KeyError(f"no value for {e}")
        if e.is_number and e not in (sp.true, sp.false):  # 2, 1/2, pi, sqrt(2)
            return float(e)
        if e in (sp.true, sp.false):
            return bool(e)
        if isinstance(e, sp.Add):
            out = self.ev(e.args[0])
            for a in e.args[1:]:
                value = self.ev(a)  # may add axes: lift both afterwards
                out = self._lift(out) + self._lift(value)
            return out
        if isinstance(e, sp.Mul) and _guarded(e):
            # [c]·t is absent where c is off, even where t is 0/0 there (L2 normalisation
            # at a zero row): where(c, t, 0), not 0·NaN
            switches = [a for a in e.args if isinstance(a, _SWITCHES)]
            on = self._lift(self.ev(sp.Mul(*switches))) != 0
            value = self._lift(self.ev(sp.Mul(*[a for a in e.args if a not in switches])))
            on, value = self._lift(on), self._lift(value)
            return ops.where(on, value, 0.0)
        if isinstance(e, sp.Mul):
            out = self.ev(e.args[0])
            for a in e.args[1:]:
                value = self.ev(a)
                out = self._lift(out) * self._lift(value)
            return out
        if isinstance(e, sp.Pow):
            base, exp = self.ev(e.base), self.ev(e.exp)
            if isinstance(base, float) and isinstance(exp, float):
                return base ** exp
            if isinstance(exp, float):
                return self._lift(base) ** exp
            return self._lift(self.ops.asarray(base) if isinstance(base, float) else base) \
                ** self._lift(exp)
        if isinstance(e, (sp.Sum, SumOver, MaxOver)):
            return self._reduce(e)
        if isinstance(e, sp.KroneckerDelta):
            a, b = [self._ev_int(x) for x in e.args]
            return ops.float(self._lift(a) == self._lift(b))
        if isinstance(e, ArgMaxMask):
            return ops.float(self._first_max(e))
        if isinstance(e, sp.Heaviside):
            x = self._lift(self.ev(e.args[0]))
            return ops.float(x > 0)
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e.args)
        if isinstance(e, (sp.Max, sp.Min)):
            combine = ops.maximum if isinstance(e, sp.Max) else ops.minimum
            out = self.ev(e.args[0])
            for a in e.args[1:]:
                value = self.ev(a)
                out = combine(self._lift(out), self._lift(value))
            return out
        if isinstance(e, sp.Function) and len(e.args) == 1:
            x = self.ev(e.args[0])
            if isinstance(x, float):
                return float(sp.sympify(e.func(x)).evalf())
            return ops.func(type(e).__name__)(self._lift(x))
        if isinstance(e, sp.core.relational.Relational):
            a, b = self.ev(e.lhs), self.ev(e.rhs)
            a, b = self._lift(a), self._lift(b)
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b,
                    "==": a == b, "!=": a != b}[e.rel_op]
        if isinstance(e, (sp.And, sp.Or)):
            parts = [self.ev(a) for a in e.args]
            parts = [self._lift(p) for p in parts]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(e, sp.And) else (out | p)
            return out
        if isinstance(e, sp.Not):
            return ~self._lift(self.ev(e.args[0]))
        raise TypeError(f"cannot evaluate {type(e).__name__}: {e}")

    def _padded(self, e: Padded):
        """X at the read's positions where all lie inside X, else the fill."""
        read, ops = e.access, self.ops
        arr = self.env[read.base.label.name]
        idx = [self._lift(self._ev_int(i)) for i in read.indices]
        idx = [i.long() if ops.name == "torch" else i.astype(np.int64) for i in idx]
        idx = [self._lift(i) for i in idx]
        inside = None
        clipped = []
        for i, size in zip(idx, arr.shape, strict=True):
            ok = (i >= 0) & (i < size)
            inside = ok if inside is None else self._lift(inside) & ok
            clipped.append(i.clamp(0, size - 1) if ops.name == "torch" else
                           np.clip(i, 0, size - 1))
        value = self._lift(arr[tuple(self._lift(c) for c in clipped)])
        return ops.where(self._lift(inside), value, float(e.fill))

    def _first_max(self, e: ArgMaxMask):
        """``value == best`` kept only at its first hit over ``e.over`` (row-major)."""
        a, b = [self.ev(x) for x in e.args[:2]]
        for sym in e.over:
            self._axis(sym)
        hit = self._lift(self._lift(a) == self._lift(b))
        if not e.over:
            return hit
        axes = [self.axes[s] for s in e.over]
        shape = list(hit.shape)
        for sym, ax in zip(e.over, axes, strict=True):
            shape[ax] = self.sizes[sym]
        return self.ops.first_hit(self.ops.broadcast(hit, tuple(shape)), axes)

    def _ev_int(self, e):
        v = self.ev(e)
        return v if hasattr(v, "shape") else self.ops.asarray(v)

    def _piecewise(self, pieces):
        (expr, cond), rest = pieces[0], pieces[1:]
        if cond == sp.true or not rest:
            return self.ev(expr)
        c = self.ev(cond)
        other = self._piecewise(rest)
        value = self.ev(expr)
        if isinstance(c, bool):
            return value if c else other
        return self.ops.where(self._lift(c), self._lift(value), self._lift(other))

    def _reduce(self, e):
        if isinstance(e, sp.Sum):
            over = [lim[0] for lim in e.limits]
            for var, lo, hi in e.limits:
                self.sizes[var] = int(sp.sympify(hi - lo + 1).subs(self.values))
            body = e.function
        else:
            over, body = list(e.over), e.body
        for var in over:
            self._axis(var)
        out = self._lift(self.ev(body))
        for var in over:
            ax = self.axes[var]
            if out.shape[ax] == 1 and self.sizes[var] != 1:  # body free of var
                out = out * self.sizes[var] if not isinstance(e, MaxOver) else out
                continue
            out = self.ops.amax(out, ax) if isinstance(e, MaxOver) else self.ops.sum(out, ax)
        return out


def sizes_for(program: Program, dim_values: dict[sp.Symbol, int]) -> dict:
    return {i: int(sp.sympify(d).subs(dim_values)) for i, d in program.ranges.items()}


def run_forward(program: Program, inputs: dict, dim_values: dict, hypers: dict | None = None,
                backend: str = "numpy") -> dict:
    """Run the spec's forward: returns every tensor (intermediates, outputs, updated state)."""
    ops = ops_for(backend)
    env = {k: ops.asarray(v) for k, v in inputs.items()}
    values = {**dim_values, **(hypers if hypers is not None else program.spec.hyper_defaults())}
    updates = {}
    for a in program.assigns:
        ev = Evaluator(env, values, sizes_for(program, dim_values), ops)
        result = ev.run(a.rhs(program), a.lhs)
        if a.kind == "update":
            updates[a.target] = result
        else:
            env[a.target] = result
    env.update({f"{k}:new": v for k, v in updates.items()})
    return env


def evaluate(program: Program, expr: sp.Expr, free: tuple, env: dict, dim_values: dict,
             hypers: dict | None = None, backend: str = "numpy"):
    """Evaluate a derived expression with free indices ``free`` given all tensor values."""
    ops = ops_for(backend)
    values = {**dim_values, **(hypers if hypers is not None else program.spec.hyper_defaults())}
    ev = Evaluator({k: ops.asarray(v) for k, v in env.items()}, values,
                   sizes_for(program, dim_values), ops)
    return ev.run(expr, tuple(free))
