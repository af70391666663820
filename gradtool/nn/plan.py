"""What a layer needs to know about its spec, for either backend.

A layer is a spec plus the sizes that define its parameters and the hyper-parameters. Every other
size (the batch, an image's height) is bound from the shapes of the arrays it is called with, at
every call, and checked against the sizes the parameters fix (once per distinct shape: a
successful binding is kept).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field

import sympy as sp

from gradtool.codegen.base import py_name
from gradtool.errors import GradtoolError, SpecError
from gradtool.spec.lang import MaxOver, Spec, SumOver, Tensor

_MAX_BINDINGS = 64  # kept bindings per layer (distinct input shapes and modes)


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
    (``eps=1e-6``), and may hold ``init``, a dict that replaces the spec's initialisation of
    some parameters (``init={"weight": "uniform"}``; the kinds are ``spec.param``'s).
    Constructor sizes are those of the parameters and state, and any size no data input
    carries; sizes that the input determines are refused, since they are read from
    it. A constructor size must be an integer ≥ 1 (≥ 0 where the spec's ``min_size`` allows 0,
    a padding) and a hyper-parameter a number in its declared domain (``Spec.check_hypers``:
    eps > 0 where the spec says so), or :class:`LayerError` names it (with the file and line
    of a hyper-parameter's declaration).
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
        self.elementwise = is_elementwise(spec)
        self.any_shape = self.elementwise and not uses_sizes(spec)
        self.sizes: dict[str, int] = {}
        self.hypers = {name: h.default for name, h in spec.hypers.items()}
        options = dict(self.options)
        self.inits = _inits(spec, self.owned, options.pop("init", None) or {})
        for key, value in options.items():
            if key in spec.hypers:
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise LayerError(f"{spec.name}: hyper-parameter {key} must be a number, "
                                     f"got {value!r}",
                                     hint=f"e.g. {key}={spec.hypers[key].default}")
                self.hypers[key] = float(value)
            elif key in owned_dims:
                # an integer, positive as spec.dims declares it unless the spec's min_size
                # allows less (a padding P of 0)
                least = min(spec.min_sizes.get(key, 1), 1)
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
                        value < least:
                    kind = "a positive integer" if least == 1 else f"an integer ≥ {least}"
                    raise LayerError(f"{spec.name}: size {key} must be {kind}, got {value!r}")
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
                             f"{', '.join(missing)} when it is built: the sizes of its "
                             "parameters, and those no input carries (a kernel, stride or "
                             "padding), are given then; the rest are read from the input",
                             hint=f"give {', '.join(f'{d}=<integer>' for d in missing)} "
                                  f"(SpecModule({spec.name!r}, ...), or keys of the layer's "
                                  "[[layers]] table in a model file)")
        given = {k: v for k, v in options.items() if k in spec.hypers}
        try:  # a value outside the declared domain: the kernels compute another function
            self.hypers.update(spec.check_hypers(given, f"{spec.name} layer"))
        except SpecError as exc:
            raise LayerError(exc.message, file=exc.file, line=exc.line, hint=exc.hint) from None
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
        # a mask's keep probability as a function of the hyper-parameters it reads, evaluated
        # at each draw: a hyper-parameter changed in ``hypers`` (dropout's p) changes it, as it
        # changes the kernel's 1/(1 - p)
        self._keep = {}
        for t in self.masks:
            names = sorted(n for n, h in self.spec.hypers.items()
                           if h.symbol in t.keep.free_symbols)
            fn = sp.lambdify([self.spec.hypers[n].symbol for n in names], t.keep)
            self._keep[t.name] = (tuple(names), fn)
        self._calls = {}
        self._bindings: dict[tuple, dict[str, int]] = {}
        # derived sizes (OH = (H + 2P − K)//S + 1) and required relations, in size order
        syms = list(self.spec.dim_symbols.values())
        self._derived = [(name, [s.name for s in syms if s in f.free_symbols],
                          sp.lambdify([s for s in syms if s in f.free_symbols], f, "math"))
                         for name, f in self.spec.derived.items()]
        self._requires, self._training_requires = (
            [(rel, [s.name for s in syms if s in rel.free_symbols],
              sp.lambdify([s for s in syms if s in rel.free_symbols], rel, "math"))
             for rel, _ in relations]
            for relations in (self.spec.requires, self.spec.training_requires))

    def shape(self, t: Tensor, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[a] if isinstance(a, str) else int(a[1](*(dims[n] for n in a[0])))
                     for a in self._axes[t.name])

    def owned_shape(self, t: Tensor) -> tuple[int, ...]:
        return self.shape(t, self.sizes)

    def bind(self, shapes: dict[str, tuple[int, ...]], training: bool) -> dict[str, int]:
        """Every size the given data shapes and the constructor sizes fix, checked for
        agreement; in training also against the spec's ``min_size``.

        The result depends only on the data shapes and ``training`` (the constructor sizes
        are fixed), so a successful binding is kept under that key and returned again, shared:
        callers must not modify it. A failed one is not kept, so the same shapes raise the same
        :class:`LayerError` at every call."""
        key = (training, *(tuple(shapes[t.name]) for t in self.data))
        dims = self._bindings.get(key)
        if dims is None:
            dims = self._bind(shapes, training)
            if len(self._bindings) >= _MAX_BINDINGS:  # e.g. a varying sequence length
                self._bindings.clear()
            self._bindings[key] = dims
        return dims

    def _bind(self, shapes: dict[str, tuple[int, ...]], training: bool) -> dict[str, int]:
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
            for rel, args, fn in self._training_requires:
                if all(a in dims for a in args) and not fn(*(dims[a] for a in args)):
                    raise LayerError(
                        f"{spec.name} in training mode needs {rel}, got "
                        + ", ".join(f"{a} = {dims[a]}" for a in args),
                        hint="call model.eval() to use it on a batch this small, or train "
                             "with a larger batch")
        return dims

    def training_refusal(self, shapes: list[tuple[int, ...]]) -> str | None:
        """Why this layer in training mode refuses data inputs of ``shapes`` (its
        ``min_size`` or a training-only ``spec.require``; element-wise specs on the view
        of higher-rank inputs, as the layers run them), or None when it takes them."""
        if self.elementwise and all(s == shapes[0] for s in shapes):
            view = elementwise_view(shapes[0], len(self.data[0].dims))
            shapes = [view] * len(shapes) if view is not None else shapes
        try:
            self.bind({t.name: s for t, s in zip(self.data, shapes, strict=True)}, True)
        except LayerError as exc:
            return exc.message
        return None

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
        """P(mask element = 1) at this layer's hyper-parameters as they are now."""
        names, fn = self._keep[t.name]
        return float(fn(*[self.hypers[n] for n in names]))

    def call(self, fn, spec: Spec, tensors: dict, dims: dict,
             keywords_only: bool = False) -> tuple[list, dict]:
        """Positional and keyword arguments for a generated ``forward`` (or a Function's, or a
        ``backward``'s keywords with ``keywords_only``), by the names in its signature:
        tensors, hyper-parameters and sizes. The signature is read once per kernel."""
        args, kwargs = [], {}
        for pname, keyword, source, ref in self.arg_sources(fn, spec, tensors, dims,
                                                             keywords_only):
            value = tensors[ref] if source == "tensor" else \
                self.hypers[ref] if source == "hyper" else ref
            if keyword:
                kwargs[pname] = value
            else:
                args.append(value)
        return args, kwargs

    def arg_sources(self, fn, spec: Spec, tensors, dims: dict,
                    keywords_only: bool = False) -> list[tuple[str, bool, str, object]]:
        """Where each argument of ``fn`` comes from, as ``call`` gives it: (parameter name,
        keyword or not, source, key), the source ``"tensor"`` (key: the tensor's name, one of
        ``tensors``), ``"hyper"`` (key: the hyper-parameter's name, read from ``self.hypers``)
        or ``"size"`` (key: its value in ``dims``); an argument with a default that none of
        them gives is left out. Raises :class:`LayerError` for one without a default that none
        gives."""
        key = (id(fn), keywords_only)
        if key not in self._calls:
            self._calls[key] = _arg_plan(fn, spec, keywords_only)
        out = []
        for pname, name, keyword, has_default in self._calls[key]:
            if name in tensors:
                out.append((pname, keyword, "tensor", name))
            elif name in self.hypers:
                out.append((pname, keyword, "hyper", name))
            elif name in dims:
                out.append((pname, keyword, "size", dims[name]))
            elif not has_default:
                raise LayerError(f"{spec.name}: the generated kernel needs `{pname}`, which "
                                 "neither the inputs nor the constructor give",
                                 hint=f"build the layer with {pname}=...")
        return out


def is_elementwise(spec: Spec) -> bool:
    """True when the spec acts on each element alone (relu, tanh, dropout): no parameters or
    state, every data input, mask and output over the same dimensions, every statement (eval
    form included) reading each tensor at exactly the indices it writes, and no reduction.
    Such a layer may be applied to an input of higher rank by merging its trailing axes into
    the spec's last one (``elementwise_view``): the result is the same element by element."""
    tensors = list(spec.tensors.values())
    if any(t.kind in ("param", "state") for t in tensors):
        return False
    ends = [t for t in tensors if t.kind in ("input", "output")]
    if not ends or len({t.dims for t in ends}) != 1 or not ends[0].dims:
        return False
    for s in (*spec.statements, *spec.eval_statements):
        if s.kind == "update" or s.rhs.atoms(SumOver, MaxOver):
            return False
        if any(tuple(a.indices) != tuple(s.lhs) for a in s.rhs.atoms(sp.Indexed)):
            return False
    return True


def uses_sizes(spec: Spec) -> bool:
    """Does any statement (eval form included) or mask probability read a size (``D`` in
    ``Y[n, d] = X[n, d] / D``) as a value? An element-wise spec that reads none computes
    the same arithmetic on each element whatever the array's shape, so its kernels run on
    an input of any rank as it is (``LayerPlan.any_shape``)."""
    sizes = set(spec.dim_symbols.values())
    exprs = [s.rhs for s in (*spec.statements, *spec.eval_statements)]
    exprs += [t.keep for t in spec.tensors.values() if t.keep is not None]
    for e in map(sp.sympify, exprs):
        # an access X[n, d] carries its indices' ranges (0 … N − 1): not a size read as a value
        e = e.xreplace({a: sp.Dummy() for a in e.atoms(sp.Indexed, sp.Idx)})
        if e.free_symbols & sizes:
            return True
    return False


def elementwise_view(shape: tuple[int, ...], rank: int) -> tuple[int, ...] | None:
    """The shape an element-wise layer of ``rank`` axes sees for an input of ``shape``:
    the trailing axes merged into the last one, e.g. (N, C, H, W) → (N, C·H·W) for rank 2;
    None when the input's rank is not higher than the spec's."""
    if len(shape) <= rank:
        return None
    return (*shape[:rank - 1], math.prod(shape[rank - 1:]))


def _arg_plan(fn, spec: Spec, keywords_only: bool) -> list[tuple[str, str, bool, bool]]:
    names = {py_name(n): n for n in (*spec.tensors, *spec.hypers, *spec.dim_symbols)}
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "ctx" or (keywords_only and p.kind != p.KEYWORD_ONLY):
            continue
        out.append((p.name, names.get(p.name, p.name), p.kind == p.KEYWORD_ONLY,
                    p.default is not inspect.Parameter.empty))
    return out


def _inits(spec: Spec, owned: list[Tensor], given: dict) -> dict[str, str]:
    """Each parameter's and state's initialisation: the spec's, or the one ``given`` by name."""
    from gradtool.spec.lang import INITS

    names = {t.name for t in owned}
    if not isinstance(given, dict):
        raise LayerError(f"{spec.name}: init must map parameter names to kinds, got {given!r}",
                         hint='e.g. init = { weight = "uniform" }')
    for name, kind in given.items():
        if name not in names:
            raise LayerError(f"{spec.name} has no parameter `{name}` to initialise",
                             hint=f"its parameters: {', '.join(sorted(names)) or 'none'}")
        if kind not in INITS:
            raise LayerError(f"{spec.name}: unknown init {kind!r} for `{name}`",
                             hint=f"use one of {', '.join(INITS)}")
    return {t.name: given.get(t.name, t.init) for t in owned}


def init_bounds(t: Tensor, shape: tuple[int, ...], kind: str | None = None) -> float | None:
    """The half-width of a uniform init of kind ``kind`` (default: the spec's, as the
    generated classes use): uniform 1/√fan_in (PyTorch's default for nn.Linear and nn.Conv2d
    weights), kaiming_uniform √(6/fan_in) (He et al. 2015, ReLU gain), xavier_uniform
    √(6/(fan_in + fan_out)) (Glorot and Bengio 2010)."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else (shape[0] if shape else 1)
    fan_out = shape[0] if shape else 1
    return {"uniform": 1 / math.sqrt(fan_in), "kaiming_uniform": math.sqrt(6 / fan_in),
            "xavier_uniform": math.sqrt(6 / (fan_in + fan_out))}.get(kind or t.init)
