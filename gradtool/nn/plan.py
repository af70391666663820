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
    (``eps=1e-6``); sizes that the input determines are refused, since they are read from it.
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

    # -- shapes ---------------------------------------------------------------------------
    def shape(self, t: Tensor, dims: dict[str, int]) -> tuple[int, ...]:
        subs = {self.spec.dim_symbols[k]: v for k, v in dims.items()}
        return tuple(int(sp.sympify(d).subs(subs)) for d in t.dims)

    def owned_shape(self, t: Tensor) -> tuple[int, ...]:
        return self.shape(t, self.sizes)

    def bind(self, shapes: dict[str, tuple[int, ...]], training: bool) -> dict[str, int]:
        """Every size the given data shapes and the constructor sizes fix, checked for
        agreement; in training also against the spec's ``min_size``."""
        spec = self.spec
        dims = dict(self.sizes)
        for t in self.data:
            shape = shapes[t.name]
            if len(shape) != len(t.dims):
                raise LayerError(f"{spec.name}: `{t.name}` has {len(shape)} axes {tuple(shape)}"
                                 f", but the spec declares {len(t.dims)} "
                                 f"({', '.join(str(d) for d in t.dims)})")
            for dim, size in zip(t.dims, shape, strict=True):
                if not isinstance(dim, sp.Symbol):
                    continue
                known = dims.get(dim.name)
                if known is not None and known != size:
                    where = "the layer was built with" if dim.name in self.sizes \
                        else "another input has"
                    raise LayerError(f"{spec.name}: `{t.name}` has {dim} = {size}, but {where} "
                                     f"{dim} = {known}")
                dims[dim.name] = int(size)
        for t in self.data:  # sizes given by expressions (T = (H − K)/S + 1): check them
            expect = self.shape(t, dims) if all(
                s.name in dims for d in t.dims for s in sp.sympify(d).free_symbols) else None
            if expect is not None and tuple(expect) != tuple(shapes[t.name]):
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

    def keep(self, t: Tensor) -> float:
        return float(t.keep.subs({h.symbol: self.hypers[n]
                                  for n, h in self.spec.hypers.items()}))


def call_args(fn, spec: Spec, tensors: dict, hypers: dict, dims: dict,
              keywords_only: bool = False) -> tuple[list, dict]:
    """Positional and keyword arguments for a generated ``forward`` (or a Function's), by the
    names in its signature: tensors, hyper-parameters and sizes. ``keywords_only``: only the
    keyword arguments (a generated ``backward``'s sizes and hyper-parameters)."""
    names = {py_name(n): n for n in (*spec.tensors, *spec.hypers, *spec.dim_symbols)}
    args, kwargs = [], {}
    for p in list(inspect.signature(fn).parameters.values()):
        if p.name == "ctx" or (keywords_only and p.kind != p.KEYWORD_ONLY):
            continue
        name = names.get(p.name, p.name)
        if name in tensors:
            value = tensors[name]
        elif name in hypers:
            value = hypers[name]
        elif name in dims:
            value = dims[name]
        elif p.default is not inspect.Parameter.empty:
            continue
        else:
            raise LayerError(f"{spec.name}: the generated kernel needs `{p.name}`, which "
                             "neither the inputs nor the constructor give",
                             hint=f"build the layer with {p.name}=...")
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    return args, kwargs


def init_bounds(t: Tensor, shape: tuple[int, ...]) -> float | None:
    """The half-width of a uniform init (as the generated classes use): uniform 1/√fan_in,
    kaiming_uniform √(6/fan_in) (He et al. 2015, ReLU gain), xavier_uniform
    √(6/(fan_in + fan_out)) (Glorot and Bengio 2010)."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else (shape[0] if shape else 1)
    fan_out = shape[0] if shape else 1
    return {"uniform": 1 / math.sqrt(fan_in), "kaiming_uniform": math.sqrt(6 / fan_in),
            "xavier_uniform": math.sqrt(6 / (fan_in + fan_out))}.get(t.init)
