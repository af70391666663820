"""NumPy backend: layers with ``forward``/``backward``/``params``/``grads`` and no autograd.

A model's backward is the chain of the generated backwards, last layer first. Parameters are
NumPy arrays; :meth:`NumpySequential.parameters` views them as torch tensors without copying
(``torch.from_numpy``), so ``torch.optim`` updates them in place and both backends share one
update rule::

    import numpy as np
    from gradtool.nn import NumpyLayer

    layer = NumpyLayer("linear", I=4, O=3)
    y = layer.forward(np.ones((2, 4), dtype=np.float32))
    dx = layer.backward(np.ones_like(y))        # fills layer.grads["W"], layer.grads["b"]
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import numpy as np

from gradtool.codegen.cache import compile_spec
from gradtool.nn.plan import LayerPlan, as_spec, elementwise_view, init_bounds
from gradtool.spec.lang import Spec


def init_array(t, shape, dtype, rng: np.random.Generator, kind: str | None = None
               ) -> np.ndarray:
    kind = kind or t.init
    if kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if kind == "ones":
        return np.ones(shape, dtype=dtype)
    if kind == "normal":
        return rng.standard_normal(shape).astype(dtype)
    bound = init_bounds(t, shape, kind)
    return rng.uniform(-bound, bound, shape).astype(dtype)


class NumpyLayer:
    """A layer from any spec on NumPy arrays (sizes and hyper-parameters as in
    :class:`gradtool.nn.SpecModule`). ``forward(*inputs)`` caches what ``backward`` needs;
    ``backward(*grad_outputs)`` stores parameter gradients in ``grads`` and returns the input
    gradients (one array, a tuple for several, None when no input takes a gradient).
    Sampled masks are drawn with ``rng`` in training; ``train()``/``eval()`` switch modes.
    An element-wise spec takes inputs of higher rank, as :class:`gradtool.nn.SpecModule`."""

    def __init__(self, spec: Spec | str, *, dtype=np.float32, rng=None, **options):
        self.plan = LayerPlan(as_spec(spec), options)
        self.spec = self.plan.spec
        self.rng = np.random.default_rng() if rng is None else rng
        self.dtype = np.dtype(dtype)
        self._train = compile_spec(self.spec, "numpy")
        self._eval = compile_spec(self.plan.eval_spec, "numpy") if self.plan.eval_spec else None
        self.params: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        for t in self.plan.owned:
            value = init_array(t, self.plan.owned_shape(t), self.dtype, self.rng,
                               self.plan.inits[t.name])
            (self.params if t.kind == "param" else self.state)[t.name] = value
        self.grads: dict[str, np.ndarray] = {}
        self.training = True
        self._saved = None
        self._shape = None  # an element-wise layer's input shape when it was merged (forward)

    def train(self, mode: bool = True) -> NumpyLayer:
        self.training = mode
        return self

    def eval(self) -> NumpyLayer:
        return self.train(False)

    def _form(self):
        if not self.training and self._eval is not None:
            return self._eval, self.plan.eval_spec
        return self._train, self.spec

    def forward(self, *inputs: np.ndarray):
        plan = self.plan
        if len(inputs) != len(plan.data):
            raise TypeError(f"{self.spec.name} takes {len(plan.data)} input(s), "
                            f"got {len(inputs)}")
        self._shape = None
        if plan.elementwise:  # relu on (N, C, H, W): the spec's (N, D) with D = C·H·W
            shape = np.shape(inputs[0])
            view = elementwise_view(shape, len(plan.data[0].dims))
            if view is not None and all(np.shape(x) == shape for x in inputs):
                inputs = tuple(np.reshape(x, view) for x in inputs)
                self._shape = shape
        tensors = {t.name: x for t, x in zip(plan.data, inputs, strict=True)}
        dims = plan.bind({k: np.shape(v) for k, v in tensors.items()}, self.training)
        module, spec = self._form()
        if module is self._train:
            for t in plan.masks:
                keep = plan.keep(t)
                tensors[t.name] = (self.rng.random(plan.shape(t, dims)) < keep).astype(
                    inputs[0].dtype)
        tensors.update(self.params)
        tensors.update(self.state)
        args, kwargs = plan.call(module.forward, spec, tensors, dims)
        result = module.forward(*args, **kwargs)
        out, self._saved = result[0], result[1]
        if self._shape is not None:
            out = out.reshape(self._shape)
        updates = [s.target for s in spec.statements if s.kind == "update"]
        for name, value in zip(updates, result[2] if updates else (), strict=True):
            self.state[name][...] = value  # in place: views of the state stay valid
        self._backward_kw = plan.call(module.backward, spec, {}, dims, keywords_only=True)[1]
        self._module, self._spec = module, spec
        return out

    def backward(self, *grad_outputs, input_grads: bool = True):
        """``input_grads=False``: skip the inputs' gradients (the first layer of a model), where
        the generated backward takes ``need`` flags."""
        if self._saved is None:
            raise RuntimeError(f"{self.spec.name}: backward() before forward()")
        seeds = grad_outputs or (1.0,)
        if self._shape is not None:
            view = elementwise_view(self._shape, len(self.plan.data[0].dims))
            seeds = tuple(np.reshape(g, view) if np.ndim(g) else g for g in seeds)
        names = [t.name for t in self._spec.grad_inputs]
        kw = dict(self._backward_kw)
        if not input_grads and "need" in inspect.signature(self._module.backward).parameters:
            kw["need"] = tuple(n in self.params for n in names)
        grads = self._module.backward(*seeds, *self._saved, **kw)
        grads = dict(zip(names, grads if isinstance(grads, tuple) else (grads,), strict=True))
        self.grads = {k: np.asarray(v) for k, v in grads.items() if k in self.params}
        inputs = [grads[t.name] for t in self.plan.data if t.name in grads]
        if self._shape is not None:
            inputs = [g.reshape(self._shape) for g in inputs]
        if not inputs:
            return None
        return inputs[0] if len(inputs) == 1 else tuple(inputs)


class NumpyFlatten:
    """(N, d1, d2, ...) → (N, d1·d2·…); its backward reshapes back."""

    params: dict = {}
    state: dict = {}
    grads: dict = {}
    training = True

    def train(self, mode: bool = True):
        return self

    def eval(self):
        return self

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, g: np.ndarray, input_grads: bool = True) -> np.ndarray:
        return g.reshape(self._shape)


class NumpyLoss:
    """A loss spec on NumPy arrays: ``forward(outputs, targets) -> float``, ``backward()`` →
    ∂L/∂outputs. Integer labels become one-hot rows for a spec whose target is ``T[N, C]``."""

    def __init__(self, spec: Spec | str, *, dtype=np.float32, **options):
        self.layer = NumpyLayer(spec, dtype=dtype, **options)
        self.target = self.layer.plan.data[-1]

    def forward(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        if len(self.target.dims) == outputs.ndim:
            if not np.issubdtype(targets.dtype, np.floating):
                targets = np.eye(outputs.shape[-1], dtype=outputs.dtype)[targets]
            targets = targets.astype(outputs.dtype, copy=False)
        return self.layer.forward(outputs, targets)

    def backward(self) -> np.ndarray:
        return self.layer.backward(1.0)


class NumpySequential:
    """Layers applied in order; ``backward(grad)`` runs their backwards in reverse and leaves
    the parameters' gradients in each layer's ``grads``.

    Parameter names match the torch backend's ``nn.Sequential`` (``"1.W"``, ``"3.running_mean"``)
    so that state dicts move between the backends."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.training = True
        self._tensors = None

    def __iter__(self):
        return iter(self.layers)

    def train(self, mode: bool = True) -> NumpySequential:
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self) -> NumpySequential:
        return self.train(False)

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, g) -> None:
        """Run the layers' backwards last to first; the input's own gradient is not computed
        (the first layer with parameters is asked for those only)."""
        first = next((k for k, layer in enumerate(self.layers) if layer.params), 0)
        for k in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[k]
            g = layer.backward(g, input_grads=False) if k == first else layer.backward(g)

    def named_arrays(self, kind: str = "params"):
        for k, layer in enumerate(self.layers):
            for name, value in getattr(layer, kind).items():
                yield f"{k}.{name}", value

    def parameters(self) -> list:
        """The parameters as torch tensors sharing memory with the arrays, for torch.optim
        (made once, so the optimiser's state stays attached to the same tensors)."""
        import torch

        if self._tensors is None:
            self._tensors = OrderedDict((n, torch.from_numpy(a))
                                        for n, a in self.named_arrays("params"))
        return list(self._tensors.values())

    def attach_grads(self) -> None:
        """Point each parameter tensor's ``.grad`` at its layer's latest gradient."""
        import torch

        self.parameters()
        grads = {f"{k}.{n}": g for k, layer in enumerate(self.layers)
                 for n, g in layer.grads.items()}
        for name, tensor in self._tensors.items():
            g = grads.get(name)
            tensor.grad = None if g is None else torch.from_numpy(
                np.ascontiguousarray(g, dtype=tensor.numpy().dtype))

    def state_dict(self) -> OrderedDict:
        import torch

        out = OrderedDict()
        for kind in ("params", "state"):
            for name, value in self.named_arrays(kind):
                out[name] = torch.from_numpy(value.copy())
        return out

    def load_state_dict(self, state: dict) -> None:
        """Copy values into the arrays in place (the optimiser's tensor views stay valid)."""
        mine = dict(self.named_arrays("params"))
        mine.update(self.named_arrays("state"))
        missing = set(mine) - set(state)
        unexpected = set(state) - set(mine)
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for name, value in state.items():
            src = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            mine[name][...] = src
