"""What a layer needs to know about its spec, for either backend.

A layer is a spec plus the sizes that define its parameters and the hyper-parameters. Every other
size (the batch, an image's height) is bound from the shapes of the arrays it is called with, at
every call, and checked against the sizes the parameters fix.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import sympy as sp

from gradtool.codegen.base import py_name
from gradtool.errors import GradtoolError
from gradtool.spec.lang import Spec, Tensor


class LayerError(GradtoolError):
    """A layer built or called with sizes its spec does not allow."""


def as_spec(spec: Spec | str) -> Spec:
    if isinstance(spec, Spec):
        return spec
    from gradtool.spec.loader import load_spec

    return load_spec(str(spec))


@dataclass
class LayerPlan:
    """The spec's forms, its constructor sizes and hyper-parameters, and how to bind the rest.

    ``options`` holds sizes by dimension name (``I=64, O=10``) and hyper-parameters by name
    (``eps=1e-6``). Constructor sizes are those of the parameters and state, and any size no
    data input carries; sizes that the input determines are refused, since they are read from
    it.
    """

    spec: Spec
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        spec = self.spec
        self.eval_spec = spec.eval_form()
        self.owned = [t for t in spec.tensors.values() if t.kind in ("param", "state")]
        self.data = [t for t in spec.tensors.values() if t.kind == "input" and t.keep is None]
        self.masks = [t for t in spec.tensors.values() if t.kind == "input"
                      and t.keep is not None]
        owned_dims = []
        for t in self.owned:
            for dim in t.dims:
                for sym in sorted(sp.sympify(dim).free_symbols, key=str):
                    if sym.name not in owned_dims:
                        owned_dims.append(sym.name)
        # a size no data input carries (expand's D in Y[n, d] = x[n]) is given at construction
        seen = {s.name for t in self.data for dim in t.dims for s in dim.free_symbols}
        for name in spec.base_dims:  # derived sizes (spec.size) are computed at each call
            if name not in seen and name not in owned_dims:
                owned_dims.append(name)
        self.owned_dims = owned_dims
        self.sizes: dict[str, int] = {}
        self.hypers = {name: h.default for name, h in spec.hypers.items()}
        for key, value in self.options.items():
            if key in spec.hypers:
                self.hypers[key] = float(value)
            elif key in owned_dims:
                self.sizes[key] = int(value)
            elif key in spec.dim_symbols:
                raise LayerError(f"{spec.name}: size {key} is read from the input at each call",
                                 hint=f"give only the sizes of its parameters "
                                      f"({', '.join(owned_dims) or 'none'}) and "
                                      f"hyper-parameters ({', '.join(spec.hypers) or 'none'})")
            else:
                raise LayerError(f"{spec.name} has no size or hyper-parameter `{key}`",
                                 hint=f"sizes: {', '.join(owned_dims) or 'none'}; "
                                      f"hyper-parameters: {', '.join(spec.hypers) or 'none'}")
        missing = [d for d in owned_dims if d not in self.sizes]
        if missing:
            raise LayerError(f"{spec.name} needs the size{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)} of its parameters",
                             hint=f"e.g. {', '.join(f'{d}=64' for d in missing)}")
        for name in self.hypers:
            self.hypers[name] = float(self.hypers[name])
        self._compile_shapes()

    # -- shapes ---------------------------------------------------------------------------
    def _compile_shapes(self) -> None:
        """Per tensor, each axis as a dimension name or a function of the sizes (sympy is too
        slow to consult at every call)."""
        self._axes = {}
        for t in self.spec.tensors.values():
            axes = []
            for dim in t.dims:
                if isinstance(dim, sp.Symbol):
                    axes.append(dim.name)
                else:
                    names = sorted(s.name for s in dim.free_symbols)
                    fn = sp.lambdify([sp.Symbol(n) for n in names],
                                     dim.subs({self.spec.dim_symbols[n]: sp.Symbol(n)
                                               for n in names}))
                    axes.append((names, fn))
            self._axes[t.name] = axes
        self._keep = {t.name: float(t.keep.subs({h.symbol: self.hypers[n] for n, h in
                                                 self.spec.hypers.items()}))
                      for t in self.masks}
        self._calls = {}
        # derived sizes (OH = (H + 2P − K)//S + 1) and required relations, in size order
        syms = list(self.spec.dim_symbols.values())
        self._derived = [(name, [s.name for s in syms if s in f.free_symbols],
                          sp.lambdify([s for s in syms if s in f.free_symbols], f, "math"))
                         for name, f in self.spec.derived.items()]
        self._requires = [(rel, [s.name for s in syms if s in rel.free_symbols],
                           sp.lambdify([s for s in syms if s in rel.free_symbols], rel, "math"))
                          for rel, _ in self.spec.requires]

    def shape(self, t: Tensor, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[a] if isinstance(a, str) else int(a[1](*(dims[n] for n in a[0])))
                     for a in self._axes[t.name])

    def owned_shape(self, t: Tensor) -> tuple[int, ...]:
        return self.shape(t, self.sizes)

    def bind(self, shapes: dict[str, tuple[int, ...]], training: bool) -> dict[str, int]:
        """Every size the given data shapes and the constructor sizes fix, checked for
        agreement; in training also against the spec's ``min_size``."""
        spec = self.spec
        dims = dict(self.sizes)
        for t in self.data:
            shape = shapes[t.name]
            axes = self._axes[t.name]
            if len(shape) != len(axes):
                raise LayerError(f"{spec.name}: `{t.name}` has {len(shape)} axes {tuple(shape)}"
                                 f", but the spec declares {len(axes)} "
                                 f"({', '.join(str(d) for d in t.dims)})")
            for axis, size in zip(axes, shape, strict=True):
                if not isinstance(axis, str):
                    continue
                known = dims.get(axis)
                if known is not None and known != size:
                    where = "the layer was built with" if axis in self.sizes \
                        else "another input has"
                    raise LayerError(f"{spec.name}: `{t.name}` has {axis} = {size}, but {where} "
                                     f"{axis} = {known}")
                dims[axis] = int(size)
        self._bind_derived(dims)
        for t in self.data:  # sizes given by expressions (T = (H − K)/S + 1): check them
            axes = self._axes[t.name]
            if all(isinstance(a, str) for a in axes) or \
                    not all(n in dims for a in axes if not isinstance(a, str) for n in a[0]):
                continue
            expect = self.shape(t, dims)
            if expect != tuple(shapes[t.name]):
                raise LayerError(f"{spec.name}: `{t.name}` has shape {tuple(shapes[t.name])}, "
                                 f"expected {expect}")
        if training:
            for name, least in spec.min_sizes.items():
                if name in dims and dims[name] < least:
                    raise LayerError(
                        f"{spec.name} in training mode needs {name} ≥ {least}, got "
                        f"{name} = {dims[name]} (expected more than {least - 1} value"
                        f"{'s' if least > 2 else ''} per channel when training)",
                        hint="call model.eval() to use it on a batch this small")
        return dims

    def _bind_derived(self, dims: dict[str, int]) -> None:
        """Add each derived size (``spec.size``) computed from the bound ones; raise
        :class:`LayerError` when one is below 1 or a ``spec.require`` relation fails."""
        for name, args, fn in self._derived:
            if not all(a in dims for a in args):
                continue
            value = int(fn(*(dims[a] for a in args)))
            if value < 1:
                raise LayerError(f"{self.spec.name}: {name} = {self.spec.derived[name]} is "
                                 f"{value} at " + ", ".join(f"{a} = {dims[a]}" for a in args),
                                 hint="the input is smaller than the window: give a larger "
                                      "input, or build the layer with more padding")
            if dims.get(name, value) != value:
                raise LayerError(f"{self.spec.name}: an input has {name} = {dims[name]}, but "
                                 f"{name} = {self.spec.derived[name]} = {value}")
            dims[name] = value
        for rel, args, fn in self._requires:
            if all(a in dims for a in args) and not fn(*(dims[a] for a in args)):
                raise LayerError(f"{self.spec.name} needs {rel}, got "
                                 + ", ".join(f"{a} = {dims[a]}" for a in args))

    def keep(self, t: Tensor) -> float:
        """P(mask element = 1) at this layer's hyper-parameters."""
        return self._keep[t.name]

    def call(self, fn, spec: Spec, tensors: dict, dims: dict,
             keywords_only: bool = False) -> tuple[list, dict]:
        """Positional and keyword arguments for a generated ``forward`` (or a Function's, or a
        ``backward``'s keywords with ``keywords_only``), by the names in its signature:
        tensors, hyper-parameters and sizes. The signature is read once per kernel."""
        key = (id(fn), keywords_only)
        if key not in self._calls:
            self._calls[key] = _arg_plan(fn, spec, keywords_only)
        args, kwargs = [], {}
        for pname, name, keyword, has_default in self._calls[key]:
            if name in tensors:
                value = tensors[name]
            elif name in self.hypers:
                value = self.hypers[name]
            elif name in dims:
                value = dims[name]
            elif has_default:
                continue
            else:
                raise LayerError(f"{spec.name}: the generated kernel needs `{pname}`, which "
                                 "neither the inputs nor the constructor give",
                                 hint=f"build the layer with {pname}=...")
            if keyword:
                kwargs[pname] = value
            else:
                args.append(value)
        return args, kwargs


def _arg_plan(fn, spec: Spec, keywords_only: bool) -> list[tuple[str, str, bool, bool]]:
    names = {py_name(n): n for n in (*spec.tensors, *spec.hypers, *spec.dim_symbols)}
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "ctx" or (keywords_only and p.kind != p.KEYWORD_ONLY):
            continue
        out.append((p.name, names.get(p.name, p.name), p.kind == p.KEYWORD_ONLY,
                    p.default is not inspect.Parameter.empty))
    return out


def init_bounds(t: Tensor, shape: tuple[int, ...]) -> float | None:
    """The half-width of a uniform init (as the generated classes use): uniform 1/√fan_in,
    kaiming_uniform √(6/fan_in) (He et al. 2015, ReLU gain), xavier_uniform
    √(6/(fan_in + fan_out)) (Glorot and Bengio 2010)."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else (shape[0] if shape else 1)
    fan_out = shape[0] if shape else 1
    return {"uniform": 1 / math.sqrt(fan_in), "kaiming_uniform": math.sqrt(6 / fan_in),
            "xavier_uniform": math.sqrt(6 / (fan_in + fan_out))}.get(t.init)
