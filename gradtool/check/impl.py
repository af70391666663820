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
import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np

from gradtool.check.kernels import to_numpy
from gradtool.errors import GradtoolError
from gradtool.spec.lang import Spec


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
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ImplError(f"syntax error: {exc.msg}", file=str(path), line=exc.lineno,
                        hint="fix the Python syntax on that line") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise ImplError(f"importing it raised {type(exc).__name__}: {exc}", file=str(path),
                        hint="the file must import cleanly") from None
    if not hasattr(module, name):
        found = [n for n, v in vars(module).items() if inspect.isclass(v)
                 and v.__module__ == module_name]
        raise ImplError(f"no `{name}` in this file", file=str(path),
                        hint="classes there: " + (", ".join(found) or "none"))
    return getattr(module, name)


def make_subject(spec: Spec, obj, mapping: dict[str, str] | None = None):
    """A checkable subject for a NumPy layer class or a torch.autograd.Function."""
    mapping = mapping or {}
    try:
        import torch

        if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function):
            return TorchFunctionSubject(spec, obj, mapping)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if inspect.isclass(obj) and callable(getattr(obj, "forward", None)) \
            and callable(getattr(obj, "backward", None)):
        return NumpyLayerSubject(spec, obj, mapping)
    raise ImplError(f"`{getattr(obj, '__name__', obj)}` is neither a class with forward and "
                    "backward methods nor a torch.autograd.Function",
                    hint="see docs/checking-your-layer.md for the shapes gradtool understands")


def _values(spec: Spec, dims: dict) -> dict:
    values = {name: h.default for name, h in spec.hypers.items()}
    values.update({str(k): int(v) for k, v in dims.items()})
    return values


class NumpyLayerSubject:
    name = "impl"

    def __init__(self, spec: Spec, cls, mapping):
        self.spec, self.cls, self.mapping = spec, cls, mapping
        self.params = [t.name for t in spec.tensors.values() if t.kind in ("param", "state")]
        self.data = [t.name for t in spec.tensors.values() if t.kind == "input"]
        self.grads = [t.name for t in spec.grad_inputs]
        self.outputs = [s.target for s in spec.statements if s.kind == "output"]

    def _name(self, name: str) -> str:
        return self.mapping.get(name, name)

    def build(self, inputs: dict, dims: dict):
        values = _values(self.spec, dims)
        try:
            sig = inspect.signature(self.cls)
        except (TypeError, ValueError):
            sig = None
        kwargs = {}
        if sig is not None:
            for p in sig.parameters.values():
                key = next((k for k, v in self.mapping.items() if v == p.name), p.name)
                if key in values:
                    kwargs[p.name] = values[key]
                elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    raise ImplError(f"cannot construct {self.cls.__name__}: no value for "
                                    f"`{p.name}`", hint="name __init__ arguments after the "
                                    "spec's sizes and hyper-parameters, give them defaults, or "
                                    "map them with --map")
        try:
            layer = self.cls(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ImplError(f"{self.cls.__name__}(**{kwargs}) raised {type(exc).__name__}: "
                            f"{exc}") from None
        for name in self.params:
            value = np.array(inputs[name], dtype=np.float64)
            store = getattr(layer, "params", None)
            if isinstance(store, dict) and (self._name(name) in store or not
                                            hasattr(layer, self._name(name))):
                store[self._name(name)] = value
            else:
                setattr(layer, self._name(name), value)
        return layer

    def _grad(self, layer, name):
        attr = self._name(name)
        store = getattr(layer, "grads", None)
        if isinstance(store, dict) and attr in store:
            return store[attr]
        for candidate in (f"d{attr}", f"grad_{attr}", f"{attr}_grad"):
            if hasattr(layer, candidate):
                return getattr(layer, candidate)
        raise ImplError(f"after backward, {self.cls.__name__} holds no gradient for `{name}`",
                        hint=f"store it in self.grads[{attr!r}] or self.d{attr}, or map the "
                             "name with --map")

    def takes_upstream(self) -> bool:
        params = [p for p in inspect.signature(self.cls.backward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(params) > 1  # beyond self

    def _backward(self, layer, upstream, copy_inputs=True):
        seeds = [upstream[o] for o in self.outputs]
        fn = layer.backward
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not params:
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
        try:
            out = layer.forward(*data)
        except Exception as exc:  # noqa: BLE001
            raise ImplError(f"{self.cls.__name__}.forward raised {type(exc).__name__}: {exc}",
                            hint=f"it is called as forward({', '.join(self.data)})") from None
        outs = out if isinstance(out, tuple) and len(self.outputs) > 1 else (out,)
        try:
            returned = self._backward(layer, upstream)
        except ImplError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ImplError(f"{self.cls.__name__}.backward raised {type(exc).__name__}: "
                            f"{exc}") from None
        grads = {}
        data_grads = [n for n in self.grads if n in self.data]
        if data_grads:
            got = returned if isinstance(returned, tuple) else (returned,)
            if len(got) < len(data_grads):
                raise ImplError(f"backward returned {len(got)} gradient(s) but the spec has "
                                f"{len(data_grads)} differentiable input(s): "
                                f"{', '.join(data_grads)}")
            grads.update(zip(data_grads, got, strict=False))
        for name in self.grads:
            if name not in grads:
                grads[name] = self._grad(layer, name)
        state = {}
        for s in self.spec.statements:
            if s.kind == "update":
                holder = getattr(layer, "params", {})
                state[s.target] = holder.get(self._name(s.target)) if isinstance(holder, dict) \
                    and self._name(s.target) in holder else getattr(layer, self._name(s.target))
        self.last = (layer, data)
        return dict(zip(self.outputs, outs, strict=False)), grads, state

    def contract(self, inputs, dims, upstream) -> list[tuple[str, bool, str]]:
        """backward is linear in grad_out, repeatable, and mutates nothing it is given."""
        results = []
        layer = self.build(inputs, dims)
        data = [_as_array(self.spec, n, inputs[n]) for n in self.data]
        before = [d.copy() for d in data]
        layer.forward(*data)
        ups = {o: (np.array(v) if np.ndim(v) else v) for o, v in upstream.items()}
        kept = copy.deepcopy(ups)  # backward receives ``ups`` itself: did it change them?

        try:
            first = self._collect(layer, self._backward(layer, ups, copy_inputs=False))
            if not all(np.all(np.isfinite(g)) for g in first.values()):
                return [("finite gradients", False, "backward returned NaN or inf; the "
                         "contract checks need finite gradients")]
            again = self._collect(layer, self._backward(layer, kept))
            doubled = {o: v * 2.0 for o, v in kept.items()}
            # a loss whose backward() takes no grad_out has no linearity to check
            twice = self._collect(layer, self._backward(layer, doubled)) \
                if self.takes_upstream() else None
        except Exception as exc:  # noqa: BLE001
            return [("repeatable", False, f"calling backward again raised {exc}")]
        same = all(np.allclose(first[k], again[k], rtol=1e-12, atol=1e-14) for k in first)
        results.append(("repeatable", same, "" if same else
                        "a second backward with the same grad_out gave a different result "
                        "(does it accumulate into stored gradients?)"))
        if twice is not None:
            linear = all(np.allclose(twice[k], 2 * first[k], rtol=1e-9, atol=1e-12)
                         for k in first)
            results.append(("linear in grad_out", linear, "" if linear else
                            "backward(2·G) ≠ 2·backward(G)"))
        untouched = all(np.array_equal(a, b) for a, b in zip(before, data, strict=True))
        results.append(("inputs not mutated", untouched, "" if untouched else
                        "forward or backward changed the input arrays in place"))
        g_same = all(np.array_equal(np.asarray(kept[o]), np.asarray(ups[o])) for o in ups)
        results.append(("grad_out not mutated", g_same, "" if g_same else
                        "backward changed grad_out in place"))
        return results

    def _collect(self, layer, returned):
        out = {}
        data_grads = [n for n in self.grads if n in self.data]
        got = returned if isinstance(returned, tuple) else (returned,)
        for name, g in zip(data_grads, got, strict=False):
            out[name] = np.array(g, dtype=np.float64)
        for name in self.grads:
            if name not in out:
                out[name] = np.array(self._grad(layer, name), dtype=np.float64)
        return out


class TorchFunctionSubject:
    name = "impl"

    def __init__(self, spec: Spec, fn, mapping):
        self.spec, self.fn, self.mapping = spec, fn, mapping
        self.grads = [t.name for t in spec.grad_inputs]
        self.outputs = [s.target for s in spec.statements if s.kind == "output"]
        params = list(inspect.signature(fn.forward).parameters)[1:]  # drop ctx
        self.arg_names = params

    def run(self, inputs, dims, upstream):
        import torch

        values = _values(self.spec, dims)
        reverse = {v: k for k, v in self.mapping.items()}
        leaves, args = {}, []
        for p in self.arg_names:
            key = reverse.get(p, p)
            if key in inputs:
                leaves[key] = torch.tensor(_as_array(self.spec, key, inputs[key]),
                                           requires_grad=key in self.grads)
                args.append(leaves[key])
            elif key in values:
                args.append(values[key])
            else:
                raise ImplError(f"{self.fn.__name__}.forward takes `{p}`, which is not a "
                                f"tensor, hyper-parameter or size of {self.spec.name}",
                                hint="name its arguments after the spec, or use --map")
        try:
            out = self.fn.apply(*args)
        except Exception as exc:  # noqa: BLE001
            raise ImplError(f"{self.fn.__name__}.apply raised {type(exc).__name__}: "
                            f"{exc}") from None
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((torch.as_tensor(upstream[o], dtype=torch.float64) * y).sum()
                   for o, y in zip(self.outputs, outs, strict=False))
        wrt = [k for k in self.grads if k in leaves]
        missing = [k for k in self.grads if k not in leaves]
        if missing:
            raise ImplError(f"{self.fn.__name__}.forward does not take "
                            f"{', '.join(missing)}", hint="add them as arguments")
        try:
            got = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise ImplError(f"{self.fn.__name__}.backward raised {type(exc).__name__}: "
                            f"{exc}") from None
        grads = {k: (np.zeros(np.shape(inputs[k])) if g is None else to_numpy(g))
                 for k, g in zip(wrt, got, strict=True)}
        state = {s.target: to_numpy(leaves[s.target]) for s in self.spec.statements
                 if s.kind == "update" and s.target in leaves}
        return {o: to_numpy(y) for o, y in zip(self.outputs, outs, strict=False)}, grads, state

    def contract(self, inputs, dims, upstream):
        return []
