"""Checking a person's own layer against a spec: ``gradtool check SPEC --impl FILE.py:NAME``.

Two shapes of implementation are understood:

* **A NumPy layer class** in the style of course assignments: ``forward(*inputs)`` returns the
  output, ``backward(grad_out)`` returns the gradient of the input (a tuple for several) and
  stores parameter gradients. gradtool constructs it with the keyword arguments its
  ``__init__`` accepts among the spec's sizes and hyper-parameters (``D=5, eps=1e-5``), then
  sets the parameters it will compare: in ``layer.params[name]`` if the layer has a ``params``
  dict, else as attributes. Gradients are read from ``layer.grads[name]``, else from the first
  attribute among ``d<name>``, ``grad_<name>``, ``<name>_grad``. ``--map gamma=weight`` maps a
  spec name to the layer's name.
* **A ``torch.autograd.Function``**: called as ``Fn.apply(...)`` with arguments matched by the
  names of its ``forward(ctx, ...)`` parameters (tensors, hyper-parameters, sizes); its backward
  is exercised through torch.autograd.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np

from gradtool.check.kernels import shape_of, to_numpy
from gradtool.errors import GradtoolError
from gradtool.spec.lang import Spec
from gradtool.usercode import UserCodeError, import_file, line_in, running


def _as_array(spec, name: str, value) -> np.ndarray:
    """A fresh float64 copy of an input for a user's layer; integer labels as int64."""
    return np.array(value, dtype=np.int64 if spec.tensors[name].is_labels else np.float64)


class ImplError(GradtoolError):
    """A hand-written implementation that cannot be loaded or called."""


def load_impl(target: str):
    """``path/to/file.py:Name`` → the object named ``Name`` in that file."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not name or not path_text:
        raise ImplError(f"--impl expects FILE.py:NAME, got {target!r}",
                        hint="e.g. --impl my_layers.py:LayerNorm")
    path = Path(path_text)
    if not path.is_file():
        raise ImplError(f"implementation file {path_text} does not exist",
                        hint="check the path given to --impl")
    module_name = f"gradtool_impl_{abs(hash(str(path.resolve())))}"
    module = import_file(path, module_name)
    if not hasattr(module, name):
        found = [n for n, v in vars(module).items() if inspect.isclass(v)
                 and v.__module__ == module_name]
        raise ImplError(f"no `{name}` in this file", file=str(path),
                        hint="classes there: " + (", ".join(found) or "none"))
    return getattr(module, name)


def make_subject(spec: Spec, obj, mapping: dict[str, str] | None = None,
                 settings: dict[str, float] | None = None):
    """A checkable subject for a NumPy layer class or a torch.autograd.Function.

    ``mapping`` renames spec names to the layer's (``{"gamma": "weight"}``; a value ending in
    ``.T`` says the layer stores the tensor transposed; a key ``d<name>`` names only the
    gradient attribute of ``name``). ``settings`` fixes hyper-parameters (``{"eps": 1e-8}``)
    for the layer and for every oracle. Raises :class:`ImplError` for a name the spec lacks,
    :class:`SpecError` for a value outside the hyper-parameter's declared domain.
    """
    mapping, layouts, grad_names = _read_mapping(spec, mapping or {})
    settings = dict(settings or {})
    unknown = [k for k in settings if k not in spec.hypers]
    if unknown:
        raise ImplError(f"--set names {', '.join(f'`{k}`' for k in unknown)}, which "
                        f"{'is' if len(unknown) == 1 else 'are'} not a hyper-parameter of "
                        f"{spec.name}", hint="hyper-parameters of the spec: "
                        + (", ".join(spec.hypers) or "none"))
    settings = spec.check_hypers(settings, "--set")
    try:
        import torch

        if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
            return TorchFunctionSubject(spec, obj, mapping, settings)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if inspect.isclass(obj) and callable(getattr(obj, "forward", None)) \
            and callable(getattr(obj, "backward", None)):
        return NumpyLayerSubject(spec, obj, mapping, settings, layouts, grad_names)
    raise ImplError(f"`{getattr(obj, '__name__', obj)}` is neither a class with forward and "
                    "backward methods nor a torch.autograd.Function",
                    hint="see docs/checking-your-layer.md for the shapes gradtool understands")


def _read_mapping(spec: Spec, mapping: dict[str, str]):
    """Split ``--map`` pairs into names, stated layouts (``W=weight.T``) and gradient names
    (``dgamma=dLdBW``)."""
    known = [*spec.tensors, *spec.hypers, *spec.dim_symbols]
    names, layouts, grad_names, unknown = {}, {}, {}, []
    for key, value in mapping.items():
        if key in known:
            if value.endswith(".T") and key in spec.tensors:
                value, layouts[key] = value[:-2], "T"
            names[key] = value
        elif key.startswith("d") and key[1:] in spec.tensors:
            grad_names[key[1:]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ImplError(f"--map names {', '.join(f'`{k}`' for k in unknown)}, which "
                        f"{'is' if len(unknown) == 1 else 'are'} not in {spec.name}",
                        hint="the left side is the spec's name: " + ", ".join(known)
                        + " (or d<name> for a gradient's name alone, as in --map dW=dLdW)")
    return names, layouts, grad_names


def _number(value) -> float | None:
    """``value`` as a float when it is a plain real number (not a bool, not an array)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def hyper_note(spec: Spec, values: dict[str, float], sources: dict[str, str]) -> str:
    """"eps=1e-08 (your layer's `eps`)" for each hyper-parameter set with ``--set`` or read
    from the layer with a value other than the spec's default."""
    parts = [f"{k}={values[k]:.6g} ({sources[k]})" for k in spec.hypers
             if k in sources and (values[k] != spec.hypers[k].default or sources[k] == "--set")]
    return ", ".join(parts)


def _file_of(obj) -> str:
    """The file that defines ``obj`` (for error locations)."""
    try:
        return inspect.getsourcefile(obj) or "<unknown>"
    except TypeError:
        return "<unknown>"


def _check_output_sizes(spec, names, outs, dims, call: str) -> None:
    """Raise :class:`ImplError` when an output of the layer has another number of elements
    than the spec's output of that name at these sizes (a layer for another spec: its backward
    would be called with an upstream gradient it cannot take). A layout with the same number
    of elements is left to the comparison, which names a wrong shape."""
    for name, out in zip(names, outs, strict=False):
        expected = shape_of(spec, name, dims)
        if np.size(out) != int(np.prod(expected)):
            raise ImplError(f"{call} returned `{name}` of shape {tuple(np.shape(out))}, but "
                            f"{spec.name}'s `{name}` has shape {tuple(expected)}",
                            hint=f"check that the layer computes {spec.name} (gradtool specs "
                                 "lists what each spec is)")


def _numeric(value, call: str, what: str = "") -> np.ndarray:
    """A value a hand-written layer returned, as a float64 array; ``None``, text and other
    non-numbers are an :class:`ImplError` that says what came back."""
    subject = f"{call} returned {what + ' as ' if what else ''}"
    if value is None:
        raise ImplError(f"{subject}None", hint="return the array (a missing `return`?)")
    if isinstance(value, (str, bytes, dict, set)):
        raise ImplError(f"{subject}a {type(value).__name__}, not an array",
                        hint="return a NumPy array")
    try:
        return np.asarray(to_numpy(value) if hasattr(value, "detach") else value,
                          dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ImplError(f"{subject}{type(value).__name__}, which is not an array of numbers "
                        f"({exc})", hint="return a NumPy array") from None


def _several(value, names: list[str], call: str, what: str, spec_has: str) -> tuple:
    """The values a layer returned for ``names`` (its outputs, or the gradients of its
    differentiable inputs; ``what``: "outputs" or "gradients"), in that order; ``spec_has``
    ("layernorm has") starts the sentence that names them in errors.

    A tuple or a list of the right length gives one value each, as does a tuple or list whose
    items are arrays (``(Y,)`` for one output; a backward may add values for inputs without a
    gradient, ``(dX, None)``, which are dropped); a list of numbers (``[[1, 2], [3, 4]]``) for
    one name is one array. A dict gives them by the spec's names (``{"X": dX}``, or
    ``{"dX": dX}`` for a gradient; other keys are ignored). Raises :class:`ImplError` for a
    single array where several are named, a tuple or list of another length, and a dict
    without one of the names."""
    n = len(names)
    noun = ("output" if what == "outputs" else "differentiable input") + ("s" if n != 1 else "")
    there = f"{spec_has} {n} {noun}: " + ", ".join(f"`{x}`" for x in names)
    if isinstance(value, dict):  # {"X": dX} or {"dX": dX}, by the spec's names
        keys = {str(k): v for k, v in value.items()}
        found = [next((keys[k] for k in (x, f"d{x}") if k in keys), KeyError) for x in names]
        if not any(v is KeyError for v in found):
            return tuple(found)
        want = ", ".join(f"`{x}`" if what == "outputs" else f"`{x}` (or `d{x}`)"
                         for x, v in zip(names, found, strict=True) if v is KeyError)
        raise ImplError(f"{call} returned a dict with keys {', '.join(map(repr, keys))}, but "
                        f"{there}; no value for {want}",
                        hint="name the dict's keys after the spec's tensors, or return "
                             f"{_return_form(names, what)}")
    if isinstance(value, (tuple, list)):
        kind = type(value).__name__
        arrays = all(v is None or hasattr(v, "shape") for v in value) and len(value) > 0
        if len(value) == n and (n > 1 or isinstance(value, tuple) or arrays):
            return tuple(value)
        if arrays and len(value) > n and what == "gradients":
            return tuple(value[:n])
        if arrays or isinstance(value, tuple):
            raise ImplError(f"{call} returned a {kind} of {len(value)} value"
                            f"{'s' if len(value) != 1 else ''}, but {there}",
                            hint=f"return {_return_form(names, what)}")
        if n == 1:
            return (value,)
        raise ImplError(f"{call} returned a list of {len(value)} numbers, but {there}",
                        hint=f"return {_return_form(names, what)}")
    if n > 1 and value is not None and not isinstance(value, (str, bytes, dict, set)):
        shape = tuple(np.shape(to_numpy(value) if hasattr(value, "detach") else value))
        raise ImplError(f"{call} returned one array of shape {shape}, but {there}",
                        hint=f"return one array each, as a tuple or list: "
                             f"{_return_form(names, what)}")
    return (value,)


def _return_form(names: list[str], what: str) -> str:
    """``(Y, Z)`` or ``(dX, dY)``: how a layer returns ``names``."""
    items = [f"d{x}" if what == "gradients" else x for x in names]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def stray_row(rows: list, strays: list):
    """A failed contract row for what user code tried outside every call gradtool made
    (``strays``: :class:`gradtool.usercode.Refusal`), such as a finalizer (``__del__``)
    calling ``os._exit(0)``: the process would have ended, with that status and no report,
    had gradtool not refused it. ``rows``: the check's rows (for the spec and shape)."""
    from gradtool.check.runner import Row

    first = strays[0]
    where = f"{first.file}:{first.line}: " if first.file else ""
    more = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
    row = Row(rows[0].spec if rows else "impl", "backward", "contract: stays in its calls",
              rows[0].shape if rows else "", 0.0, 0.0, None, None, None, 0.0, False)
    row.diagnose("contract_stays_in_its_calls",
                 f"{where}{first.call} was called outside any call of the layer (from a "
                 f"finalizer `__del__`, a thread or an exit handler){more}; gradtool refused "
                 "it, but outside gradtool it would have ended the process or defeated its "
                 "time limit")
    return row


GRADIENT_NAMES = ("d{}", "dLd{}", "grad_{}", "{}_grad")  # dW, dLdW (CMU), grad_W, W_grad


def _positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _arrays(grads: dict) -> dict:
    return {k: np.array(to_numpy(v) if hasattr(v, "detach") else v, dtype=np.float64)
            for k, v in grads.items()}


class NumpyLayerSubject:
    """A course-style NumPy layer class: ``forward(*inputs)``, then ``backward(grad_out)``,
    ``backward()`` (a loss whose upstream gradient is 1) or ``backward(*inputs)`` (a loss that
    takes its inputs again, ``backward(x, y)``)."""

    name = "impl"

    def __init__(self, spec: Spec, cls, mapping, settings=None, layouts=None, grad_names=None):
        self.spec, self.cls, self.mapping = spec, cls, mapping
        self.settings = dict(settings or {})
        self.layouts = dict(layouts or {})  # spec name → "T" or the layer's axes (None: 1)
        self.grad_names = dict(grad_names or {})
        self.hyper_values = {name: h.default for name, h in spec.hypers.items()}
        self.hyper_values.update(self.settings)
        self.file = _file_of(cls)
        self.params = [t.name for t in spec.tensors.values() if t.kind in ("param", "state")]
        self.data = [t.name for t in spec.tensors.values() if t.kind == "input"]
        self.grads = [t.name for t in spec.grad_inputs]
        self.outputs = [s.target for s in spec.statements if s.kind == "output"]
        self.backward_style = self._backward_style()

    def _name(self, name: str) -> str:
        return self.mapping.get(name, name)

    def _backward_style(self) -> str:
        """"upstream" (backward(grad_out)), "none" (backward()) or "inputs" (backward(x, y),
        the data inputs again, as a loss written without an upstream gradient)."""
        back = _positional(self.cls.backward)[1:]
        if not back:
            # backward(self, *grads) takes upstream gradients, however many
            star = any(p.kind == p.VAR_POSITIONAL
                       for p in inspect.signature(self.cls.backward).parameters.values())
            return "upstream" if star else "none"
        front = _positional(self.cls.forward)[1:]
        scalar = all(not self.spec.tensors[o].dims for o in self.outputs)
        if scalar and len(self.data) >= 2 and (back == front or len(back) == len(self.data)):
            required = [p for p in inspect.signature(self.cls.backward).parameters.values()
                        if p.default is p.empty and p.name != "self"]
            if len(required) == len(self.data):
                return "inputs"
        return "upstream"

    def takes_upstream(self) -> bool:
        return self.backward_style == "upstream"

    # -- construction, hyper-parameters and layouts -------------------------------------------

    def _construct(self, dims: dict):
        values = {str(k): int(v) for k, v in dims.items()}
        try:
            sig = inspect.signature(self.cls)
        except (TypeError, ValueError):
            sig = None
        kwargs = {}
        for p in (sig.parameters.values() if sig is not None else ()):
            key = next((k for k, v in self.mapping.items() if v == p.name), p.name)
            if key in values:
                kwargs[p.name] = values[key]
            elif key in self.hyper_values and (key in self.settings or p.default is p.empty):
                # a hyper-parameter with a default keeps it (it is read back, see resolve)
                kwargs[p.name] = self.hyper_values[key]
            elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ImplError(f"cannot construct {self.cls.__name__}: no value for "
                                f"`{p.name}`", hint="name __init__ arguments after the "
                                "spec's sizes and hyper-parameters, give them defaults, or "
                                "map them with --map")
        with running(f"{self.cls.__name__}(**{kwargs})", self.file):
            return self.cls(**kwargs)

    def _stored(self, layer, name):
        store = getattr(layer, "params", None)
        own = self._name(name)
        if isinstance(store, dict) and own in store:
            return store[own]
        return getattr(layer, own, None)

    def resolve(self, dims: dict) -> list[str]:
        """Read the layer's own hyper-parameters and parameter layouts from one instance built
        at ``dims`` (distinct sizes, so that a transposed weight is told from a square one).
        Precedence: ``--set``, then an attribute named after the hyper-parameter (``self.eps``),
        then the ``__init__`` default, then the spec's default. Returns notes for the report."""
        try:
            layer = self._construct(dims)
        except GradtoolError:
            return []  # the first real call reports it, with its sizes
        try:
            init = inspect.signature(self.cls).parameters
        except (TypeError, ValueError):
            init = {}
        sources = {}
        for name in self.spec.hypers:
            own = self._name(name)
            if name in self.settings:
                sources[name] = "--set"
                continue
            for value, where in ((getattr(layer, own, None), f"your layer's `{own}`"),
                                 (getattr(init.get(own), "default", None),
                                  f"the default of `{own}` in __init__")):
                if _number(value) is not None:
                    self.hyper_values[name], sources[name] = _number(value), where
                    break
        self.hyper_sources = sources
        notes = []
        hypers = hyper_note(self.spec, self.hyper_values, sources)
        if hypers:
            notes.append("hyper-parameters " + hypers)
        for name in self.params:
            notes += self._layout(name, np.shape(self._stored(layer, name)),
                                  shape_of(self.spec, name, dims))
        return notes

    def _layout(self, name: str, have: tuple, want: tuple) -> list[str]:
        """Recognise a parameter stored transposed ((in, out) weights) or with singleton axes
        ((1, O) biases, (1, C) γ); the layer's own initial value tells."""
        if self.layouts.get(name) == "T":
            return [f"{name} stored transposed (--map)"]
        if not have or have == want or int(np.prod(have)) != int(np.prod(want)):
            return []
        if len(have) == 2 and have == want[::-1] and want[0] != want[1]:
            self.layouts[name] = "T"
            flipped = ", ".join(str(d) for d in self.spec.tensors[name].dims[::-1])
            return [f"{name} stored transposed, as ({flipped})"]
        axes, k = [], 0
        for size in have:
            if k < len(want) and size == want[k]:
                axes.append(k)
                k += 1
            elif size == 1:
                axes.append(None)
            else:
                return []
        if k != len(want):
            return []
        self.layouts[name] = tuple(axes)
        dims = self.spec.tensors[name].dims
        shown = ", ".join("1" if a is None else str(dims[a]) for a in axes)
        return [f"{name} stored as ({shown})"]

    def _to_layer(self, name: str, value: np.ndarray) -> np.ndarray:
        layout = self.layouts.get(name)
        if layout == "T":
            return np.ascontiguousarray(value.T)
        if layout:
            return value.reshape([1 if a is None else value.shape[a] for a in layout])
        return value

    def _from_layer(self, name: str, value, shape: tuple):
        layout = self.layouts.get(name)
        if layout is None:
            return value
        value = np.asarray(to_numpy(value) if hasattr(value, "detach") else value)
        if layout == "T" and value.ndim == 2:
            return value.T
        if layout != "T" and value.size == int(np.prod(shape)):
            return value.reshape(shape)
        return value

    def build(self, inputs: dict, dims: dict):
        layer = self._construct(dims)
        for name in self.params:
            value = self._to_layer(name, np.array(inputs[name], dtype=np.float64))
            store = getattr(layer, "params", None)
            if isinstance(store, dict) and (self._name(name) in store or not
                                            hasattr(layer, self._name(name))):
                store[self._name(name)] = value
            else:
                setattr(layer, self._name(name), value)
        return layer

    # -- gradients ----------------------------------------------------------------------------

    def _grad(self, layer, name, shape):
        if name in self.grad_names:
            candidates = [self.grad_names[name]]
        else:
            candidates = [self._name(name)] + [f.format(self._name(name))
                                                for f in GRADIENT_NAMES]
        store = getattr(layer, "grads", None)
        for attr in candidates:
            if isinstance(store, dict) and attr in store:
                return self._from_layer(name, store[attr], shape)
        for attr in candidates[1:] if name not in self.grad_names else candidates:
            if hasattr(layer, attr):
                return self._from_layer(name, getattr(layer, attr), shape)
        own = self._name(name)
        raise ImplError(f"after backward, {self.cls.__name__} holds no gradient for `{name}` "
                        f"(looked for {', '.join(f'`{c}`' for c in candidates[1:] or candidates)}"
                        f"{' and grads[...]' if isinstance(store, dict) else ''})",
                        hint=f"store it in self.grads[{own!r}] or self.d{own}, or name it with "
                             f"--map d{name}=YOUR_NAME")

    def _backward(self, layer, upstream, data, copy_inputs=True):
        fn = layer.backward
        if self.backward_style == "inputs":
            return fn(*[d.copy() for d in data])
        seeds = [upstream[o] for o in self.outputs]
        if self.backward_style == "none":
            if any(np.ndim(s) or s != 1.0 for s in seeds):
                raise ImplError("backward() takes no upstream gradient but the output is not "
                                "a scalar loss with gradient 1",
                                hint="give backward a grad_out argument")
            return fn()
        if copy_inputs:
            seeds = [np.array(s, dtype=np.float64) if np.ndim(s) else s for s in seeds]
        return fn(*seeds)

    def run(self, inputs, dims, upstream):
        layer = self.build(inputs, dims)
        data = [_as_array(self.spec, n, inputs[n]) for n in self.data]
        with running(f"{self.cls.__name__}.forward({', '.join(self.data)})", self.file):
            out = layer.forward(*data)
        outs = _several(out, self.outputs, f"{self.cls.__name__}.forward", "outputs",
                         f"{self.spec.name} has")
        outs = tuple(_numeric(o, f"{self.cls.__name__}.forward") for o in outs)
        _check_output_sizes(self.spec, self.outputs, outs, dims, f"{self.cls.__name__}.forward")
        with running(f"{self.cls.__name__}.backward", self.file):
            returned = self._backward(layer, upstream, data)
        grads = self._collect(layer, returned, inputs)
        grads = {name: _numeric(g, f"{self.cls.__name__}.backward", f"the gradient of `{name}`")
                 for name, g in grads.items()}
        state = {}
        for s in self.spec.statements:
            if s.kind == "update":
                state[s.target] = self._from_layer(s.target, self._stored(layer, s.target),
                                                   np.shape(inputs[s.target]))
        self.last = (layer, data)
        return dict(zip(self.outputs, outs, strict=False)), grads, state

    def contract(self, inputs, dims, upstream) -> list[tuple[str, bool, str]]:
        """backward is repeatable, linear in grad_out (when it takes one), and mutates nothing
        it is given. A backward without an upstream gradient gets the checks that fit it."""
        results = []
        layer = self.build(inputs, dims)
        data = [_as_array(self.spec, n, inputs[n]) for n in self.data]
        before = [d.copy() for d in data]
        with running(f"{self.cls.__name__}.forward({', '.join(self.data)})", self.file):
            layer.forward(*data)
        ups = {o: (np.array(v) if np.ndim(v) else v) for o, v in upstream.items()}
        kept = copy.deepcopy(ups)  # backward receives ``ups`` itself: did it change them?
        takes = self.takes_upstream()
        try:
            with running(f"{self.cls.__name__}.backward", self.file):
                first = _arrays(self._collect(
                    layer, self._backward(layer, ups, data, False), inputs))
            if not all(np.all(np.isfinite(g)) for g in first.values()):
                return [("finite gradients", False, "backward returned NaN or inf; the "
                         "contract checks need finite gradients")]
            with running(f"{self.cls.__name__}.backward, called again", self.file):
                again = _arrays(self._collect(layer, self._backward(layer, kept, data), inputs))
                if takes:
                    doubled = {o: v * 2.0 for o, v in kept.items()}
                    twice = _arrays(self._collect(
                        layer, self._backward(layer, doubled, data), inputs))
        except UserCodeError as exc:
            return [("repeatable", False, f"calling backward again failed: {exc.message}")]
        same = all(np.allclose(first[k], again[k], rtol=1e-12, atol=1e-14) for k in first)
        results.append(("repeatable", same, "" if same else
                        "a second backward with the same grad_out gave a different result "
                        "(does it accumulate into stored gradients?)"))
        if takes:
            linear = all(np.allclose(twice[k], 2 * first[k], rtol=1e-9, atol=1e-12)
                         for k in first)
            results.append(("linear in grad_out", linear, "" if linear else
                            "backward(2·G) ≠ 2·backward(G)"))
        untouched = all(np.array_equal(a, b) for a, b in zip(before, data, strict=True))
        results.append(("inputs not mutated", untouched, "" if untouched else
                         "forward or backward changed the input arrays in place"))
        if takes:
            g_same = all(np.array_equal(np.asarray(kept[o]), np.asarray(ups[o])) for o in ups)
            results.append(("grad_out not mutated", g_same, "" if g_same else
                            "backward changed grad_out in place"))
        return results

    def _collect(self, layer, returned, inputs):
        out = {}
        data_grads = [n for n in self.grads if n in self.data]
        if data_grads:
            got = _several(returned, data_grads, f"{self.cls.__name__}.backward", "gradients",
                           f"{self.spec.name} has")
            out.update(zip(data_grads, got, strict=True))
        for name in self.grads:
            if name not in out:
                out[name] = self._grad(layer, name, np.shape(inputs[name]))
        return out


class TorchFunctionSubject:
    """A ``torch.autograd.Function``, called as its users call it: ``Fn.apply`` with the
    tensors, sizes and hyper-parameters its ``forward(ctx, ...)`` names, optional arguments
    left at their defaults (the default is then the hyper-parameter's value), and the
    differentiable tensors passed as non-leaf copies, so that an in-place Function that marks
    its input dirty works as it does inside a network."""

    name = "impl"

    def __init__(self, spec: Spec, fn, mapping, settings=None):
        self.spec, self.fn, self.mapping = spec, fn, mapping
        self.settings = dict(settings or {})
        self.file = _file_of(fn)
        self.grads = [t.name for t in spec.grad_inputs]
        self.outputs = [s.target for s in spec.statements if s.kind == "output"]
        self.signature = list(inspect.signature(fn.forward).parameters.values())[1:]  # no ctx
        self.arg_names = [p.name for p in self.signature]
        self.hyper_values = {name: h.default for name, h in spec.hypers.items()}
        self.hyper_values.update(self.settings)
        self.dirty: list[str] = []

    def resolve(self, dims: dict) -> list[str]:
        """Hyper-parameters from the defaults of ``forward``'s optional arguments."""
        reverse = {v: k for k, v in self.mapping.items()}
        sources = {}
        for p in self.signature:
            key = reverse.get(p.name, p.name)
            if key in self.spec.hypers and key not in self.settings \
                    and _number(p.default) is not None:
                self.hyper_values[key] = _number(p.default)
                sources[key] = f"the default of `{p.name}` in forward"
            elif key in self.settings:
                sources[key] = "--set"
        self.hyper_sources = sources
        hypers = hyper_note(self.spec, self.hyper_values, sources)
        return ["hyper-parameters " + hypers] if hypers else []

    def run(self, inputs, dims, upstream):
        import torch

        values = {**self.hyper_values, **{str(k): int(v) for k, v in dims.items()}}
        reverse = {v: k for k, v in self.mapping.items()}
        leaves, passed, args = {}, {}, []
        for p in self.signature:
            key = reverse.get(p.name, p.name)
            if key in inputs:
                value = torch.tensor(_as_array(self.spec, key, inputs[key]),
                                     requires_grad=key in self.grads)
                leaves[key] = value
                # a non-leaf copy: a Function may modify it in place (ctx.mark_dirty)
                passed[key] = value.clone() if value.requires_grad else value
                args.append(passed[key])
            elif p.default is not p.empty and key not in self.settings:
                break  # optional arguments keep their defaults, as in Fn.apply(X, gamma, beta)
            elif key in values:
                args.append(values[key])
            else:
                raise ImplError(f"{self.fn.__name__}.forward takes `{p.name}`, which is not a "
                                f"tensor, hyper-parameter or size of {self.spec.name}",
                                hint="name its arguments after the spec, or use --map")
        missing = [k for k in self.grads if k not in leaves]
        if missing:
            raise ImplError(f"{self.fn.__name__}.forward does not take "
                            f"{', '.join(missing)}", hint="add them as arguments")
        versions = {k: v._version for k, v in passed.items() if v.requires_grad}
        with running(f"{self.fn.__name__}.apply", self.file):
            out = self.fn.apply(*args)
        outs = out if isinstance(out, tuple) else (out,)
        # modified in place without ctx.mark_dirty: autograd still sees the copy's old history
        self.dirty = [k for k, v in versions.items() if passed[k]._version != v
                      and not any(y is passed[k] for y in outs)]
        _check_output_sizes(self.spec, self.outputs, [to_numpy(y) for y in outs], dims,
                            f"{self.fn.__name__}.forward")
        loss = sum((torch.as_tensor(upstream[o], dtype=torch.float64) * y).sum()
                   for o, y in zip(self.outputs, outs, strict=False))
        wrt = [k for k in self.grads if k in leaves]
        with running(f"{self.fn.__name__}.backward", self.file):
            try:
                got = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
            except RuntimeError as exc:  # autograd's own complaint about the Function
                if line_in(exc.__traceback__, self.file):
                    raise
                raise ImplError(f"{self.fn.__name__}.backward: {exc}") from None
        unused = [k for k, g in zip(wrt, got, strict=True) if g is None]
        if unused:
            raise ImplError(f"{self.fn.__name__}.backward returned None for "
                            f"{', '.join(f'`{k}`' for k in unused)}, which the spec "
                            "differentiates", hint="return its gradient (None is for inputs "
                            "without one, such as targets)")
        grads = {k: to_numpy(g) for k, g in zip(wrt, got, strict=True)}
        state = {s.target: to_numpy(passed[s.target]) for s in self.spec.statements
                 if s.kind == "update" and s.target in passed}
        return {o: to_numpy(y) for o, y in zip(self.outputs, outs, strict=False)}, grads, state

    def contract(self, inputs, dims, upstream):
        """An input the Function changes in place must be marked with ``ctx.mark_dirty``
        (checked on the last :meth:`run`)."""
        if not self.dirty:
            return []
        names = ", ".join(self.dirty)
        return [("in-place inputs marked dirty", False,
                 f"forward changed {names} in place without ctx.mark_dirty({names}); autograd "
                 "then computes gradients from the changed values")]
