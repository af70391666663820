"""Call generated kernels by name: inputs, sizes and hyper-parameters in, dicts out."""

from __future__ import annotations

import inspect

import numpy as np
import sympy as sp

from gradtool.codegen.cache import compile_spec
from gradtool.spec.lang import Spec


class Kernels:
    """The generated ``forward``/``backward`` of one spec on one target (numpy or torch)."""

    def __init__(self, spec: Spec, target: str, module=None):
        self.spec, self.target = spec, target
        self.module = module if module is not None else compile_spec(spec, target)
        self.inputs = [t for t in spec.tensors.values() if t.kind in ("input", "param", "state")]
        self.outputs = [s.target for s in spec.statements if s.kind == "output"]
        self.updates = [s.target for s in spec.statements if s.kind == "update"]
        self.grads = [t.name for t in spec.grad_inputs]

    def _keywords(self, fn, dims: dict) -> dict:
        values = {name: h.default for name, h in self.spec.hypers.items()}
        values.update({str(k): int(v) for k, v in dims.items()})
        params = inspect.signature(fn).parameters
        return {name: values[name.rstrip("_")] for name, p in params.items()
                if p.kind == p.KEYWORD_ONLY and name.rstrip("_") in values}

    def convert(self, value, dtype="float64", labels: bool = False):
        """``value`` as the target's array of ``dtype``; integer labels as int64."""
        if self.target == "torch":
            import torch

            dt = torch.float64 if dtype == "float64" else torch.float32
            return torch.as_tensor(np.asarray(value), dtype=torch.int64 if labels else dt)
        if labels:
            return np.asarray(value, dtype=np.int64)
        return np.asarray(value, dtype=np.float64 if dtype == "float64" else np.float32)

    def forward(self, inputs: dict, dims: dict, dtype="float64"):
        """(outputs by name, saved tensors, new state by name)."""
        args = [self.convert(inputs[t.name], dtype, t.is_labels) for t in self.inputs]
        result = self.module.forward(*args, **self._keywords(self.module.forward, dims))
        out, saved = result[0], result[1]
        outs = out if len(self.outputs) > 1 else (out,)
        new_state = dict(zip(self.updates, result[2], strict=True)) if self.updates else {}
        return dict(zip(self.outputs, outs, strict=True)), saved, new_state

    def backward(self, upstream: dict, saved, dims: dict, dtype="float64") -> dict:
        """Gradients by input name, given the upstream gradient of each output."""
        # a loss's upstream gradient: a 0-d tensor on torch (as autograd passes it), else a float
        seeds = [self.convert(upstream[o], dtype) if np.ndim(upstream[o]) or
                 self.target == "torch" else float(upstream[o]) for o in self.outputs]
        grads = self.module.backward(*seeds, *saved,
                                     **self._keywords(self.module.backward, dims))
        return dict(zip(self.grads, grads, strict=True))


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def shape_of(spec: Spec, name: str, dims: dict) -> tuple[int, ...]:
    return tuple(int(sp.sympify(d).subs(dims)) for d in spec.tensors[name].dims)
