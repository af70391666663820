"""Torch backend: ``nn.Module``s over the generated ``torch.autograd.Function``s.

The layers are ordinary modules whose backward is a generated ``autograd.Function``, so
``torch.optim`` and ``torch.utils.data`` work on them unchanged (and ``torch.compile`` traces
them: without a graph break once each layer has prepared its call for the input shapes,
``gradtool.nn.fused.prepare_calls``)::

    import torch
    from gradtool.nn import SpecModule

    model = torch.nn.Sequential(SpecModule("linear", I=4, O=8),
                                SpecModule("relu"), SpecModule("linear", I=8, O=3))
    y = model(torch.randn(5, 4))          # any batch size: N is read from the input
"""

from __future__ import annotations

import copy
import inspect
import sys
from pathlib import Path

import torch

from gradtool.codegen.cache import compile_spec
from gradtool.codegen.emit import class_name
from gradtool.nn.plan import LayerError, LayerPlan, as_spec, elementwise_view, init_bounds
from gradtool.spec.lang import Spec


def _function(spec: Spec):
    module = compile_spec(spec, "torch")
    return getattr(module, f"{class_name(spec)}Function")


def init_tensor(t, shape, dtype, device=None, kind: str | None = None) -> torch.Tensor:
    """A parameter or state tensor initialised as ``kind`` (default: as the spec says), with
    torch's global RNG."""
    kind = kind or t.init
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if kind == "normal":
        return torch.randn(shape, dtype=dtype, device=device)
    bound = init_bounds(t, shape, kind)
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)


# attributes through which Python code reads an array's rank or sizes
_SHAPE_READS = frozenset({"shape", "size", "dim", "ndim", "numel", "view", "reshape"})


def _shape_free(fn) -> bool:
    """Does the autograd.Function ``fn`` run on arrays of any rank and shape: neither its
    forward and backward nor the generated kernels they call read a size (``X.shape``,
    ``G.new_zeros((N, D))`` after ``N, D = G.shape``) or reshape? Then an element-wise
    spec's kernel computes the same arithmetic element by element on (N, C, H, W) as on the
    (N, C·H·W) view, so the view is not needed."""
    module = sys.modules[fn.__module__]
    # torch.compile'd kernels (use_torch_compile) are judged by the functions they wrap
    codes = [inspect.unwrap(f).__code__
             for f in (fn.forward, fn.backward, module.forward, module.backward)
             if hasattr(inspect.unwrap(f), "__code__")]
    return len(codes) == 4 and not any(_SHAPE_READS & set(c.co_names) for c in codes)


class SpecModule(torch.nn.Module):
    """A layer from any spec (built-in name, spec file path, or :class:`Spec`).

    Args:
        spec: the layer's spec.
        dtype, device: of the parameters and state buffers.
        **options: the sizes of its parameters (``linear``: I, O; ``layernorm``: D) and
            hyper-parameters (``eps=1e-6``); ``init={"weight": "uniform"}`` replaces the
            spec's initialisation of the parameters it names. Sizes the input determines are
            read at each call.

    ``forward`` takes the spec's inputs in declaration order, less sampled masks (drawn here in
    training with torch's global RNG) and returns its output(s). An element-wise spec (relu,
    dropout) also takes inputs of higher rank than it declares, e.g. (N, C, H, W) images for
    relu's X[N, D]: a kernel that reads no size runs on them as they are, and one that does
    (``X[n, d] / D``) on a view with the trailing axes merged into the spec's last. In eval mode a
    spec with an eval form (batch norm, dropout) runs that form. Raises
    :class:`gradtool.nn.LayerError` when an input's shape disagrees with the parameters, or a
    size is below the spec's ``min_size`` or breaks a training-only ``spec.require`` in
    training (batch norm at N = 1, batch norm over channels at N·H·W = 1).
    """

    def __init__(self, spec: Spec | str, *, dtype=torch.float32, device=None, **options):
        super().__init__()
        self._make_from_spec(as_spec(spec), options)
        for t in self.plan.owned:
            value = init_tensor(t, self.plan.owned_shape(t), dtype, device,
                                self.plan.inits[t.name])
            if t.kind == "param":
                self.register_parameter(t.name, torch.nn.Parameter(value))
            else:
                self.register_buffer(t.name, value)

    def _make_from_spec(self, spec: Spec, options: dict) -> None:
        """What the layer makes from its spec and options (at construction and unpickling):
        the plan, the generated Functions, and empty caches of prepared calls."""
        self.plan = LayerPlan(spec, options)
        self.spec = self.plan.spec
        self._train_fn = _function(self.spec)
        self._eval_fn = _function(self.plan.eval_spec) if self.plan.eval_spec else None
        self._prepared: dict[tuple, tuple] = {}  # (mode, input shapes) -> what forward needs
        self._chain_steps: dict[tuple, tuple] = {}  # the same for gradtool.nn.fused's chains
        # the parameters a chain passes for the layer: the spec's, by name, in its order (not
        # ``_parameters``' order, which deleting and setting one again changes, and which
        # holds any parameter registered on the layer besides, that its kernel never reads)
        self._spec_params = tuple(t.name for t in self.plan.owned if t.kind == "param")

    # A hyper-parameter reads and sets as an attribute, as on torch.nn's layers
    # (``dropout.p = 0.9``, ``bn.momentum = 0.01``): set, it is checked against its declared
    # domain (SpecError at the declaration, as at construction) and takes effect at the next
    # call, on every path (the kernels, the masks' keep probability, a chain's programs all
    # read ``plan.hypers`` at each call). Without this, the assignment made a plain attribute
    # that nothing read.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            plan = self.__dict__.get("plan")
            if plan is not None and name in plan.hypers:
                return plan.hypers[name]
            raise

    def __setattr__(self, name: str, value) -> None:
        plan = self.__dict__.get("plan")
        if plan is not None and name in plan.hypers and not isinstance(value, torch.Tensor):
            plan.hypers.update(plan.spec.check_hypers({name: value}, f"{plan.spec.name} layer"))
            return
        super().__setattr__(name, value)

    # What is made from the spec (its plan, the generated Functions, the calls prepared per
    # shape, a chain's steps and programs) holds functions of the spec file and of generated
    # modules, which pickle cannot name. A pickled layer (``torch.save(model)``) keeps its
    # parameters, buffers and hyper-parameters and names its spec instead: a built-in by name,
    # a spec file by its absolute path; unpickling loads that spec again and regenerates the
    # rest, as a layer built anew would. ``copy.deepcopy`` copies everything as it is.
    _MADE_FROM_SPEC = ("plan", "spec", "_train_fn", "_eval_fn", "_prepared", "_chain_steps",
                       "_chain_programs", "_chainable")

    def __getstate__(self) -> dict:
        from gradtool.nn.models import spec_hash
        from gradtool.spec.loader import builtin_specs

        spec = self.spec
        builtin = builtin_specs().get(spec.name)
        if spec.file is None:
            raise TypeError(f"cannot pickle the {spec.name} layer: its Spec was built in "
                            "Python, not loaded from a spec file, so loading the pickle could "
                            "not rebuild it; save model.state_dict() instead, or load the "
                            "spec from a file")
        path = Path(spec.file).resolve()
        source = spec.name if builtin is not None and builtin.resolve() == path else str(path)
        state = {k: v for k, v in self.__dict__.items() if k not in self._MADE_FROM_SPEC}
        state["_spec_source"] = source
        state["_spec_sha256"] = spec_hash(str(path))
        state["_spec_options"] = dict(self.plan.options)
        state["_spec_hypers"] = dict(self.plan.hypers)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        source = state.pop("_spec_source")
        sha = state.pop("_spec_sha256", None)
        if sha is not None:
            from gradtool.nn.models import spec_hash

            now = spec_hash(source)
            if now != sha:
                raise LayerError(f"the {source} layer's spec changed since the model was "
                                 f"saved: its sha256 is {now[:12]}…, the pickle recorded "
                                 f"{sha[:12]}… (its weights were trained for the spec as it "
                                 "was)", hint="put the spec file back as it was to load this "
                                              "model, or load only its state_dict into a "
                                              "model built from the new spec")
        options = state.pop("_spec_options")
        hypers = state.pop("_spec_hypers")
        super().__setstate__(state)
        self._make_from_spec(as_spec(source), options)
        self.plan.hypers.update(hypers)

    def __deepcopy__(self, memo):
        # the default deep copy (every attribute copied), not the pickled state above
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            clone.__dict__[k] = copy.deepcopy(v, memo)
        return clone

    def extra_repr(self) -> str:
        opts = [f"{k}={v}" for k, v in self.plan.sizes.items()]
        opts += [f"{k}={v:g}" for k, v in self.plan.hypers.items()]
        return ", ".join([self.spec.name, *opts])

    def forward(self, *inputs: torch.Tensor):
        # everything that depends only on the input shapes and the mode is prepared once per
        # (mode, shapes) and kept: the bound sizes, the kernel and where each argument comes from
        key = (self.training, *(x.shape for x in inputs))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepare(inputs, key)
        view, fn, recipe, masks = prepared
        if view is not None:  # tanh on (N, C, H, W) for a kernel that reads sizes: (N, C·H·W)
            shape = inputs[0].shape
            inputs = tuple(x.reshape(view) for x in inputs)
        drawn = []
        if masks:  # sampled in training with torch's global RNG, fresh at every call
            ref = next((x for x in inputs if torch.is_floating_point(x)), inputs[0])
            dtype = ref.dtype if torch.is_floating_point(ref) else torch.get_default_dtype()
            plan = self.plan
            drawn = [torch.empty(mshape, dtype=dtype, device=ref.device).bernoulli_(plan.keep(t))
                     for mshape, t in masks]
        sources = (inputs, drawn, self._parameters, self._buffers, self.plan.hypers)
        out = fn.apply(*[sources[kind][ref] if kind < 5 else ref for kind, ref in recipe])
        return out if view is None else out.reshape(shape)

    def _prepare(self, inputs: tuple[torch.Tensor, ...], key: tuple) -> tuple:
        """Bind the sizes for these inputs (raising :class:`LayerError` as ``forward``
        documents) and return (the element-wise view or None, the autograd.Function, the
        recipe of its arguments, the masks' shapes and tensors). Only a successful
        preparation is kept, so a refused shape is refused again at every call."""
        plan = self.plan
        if len(inputs) != len(plan.data):
            names = ", ".join(t.name for t in plan.data)
            raise TypeError(f"{self.spec.name} takes {len(plan.data)} input(s) ({names}), "
                            f"got {len(inputs)}")
        shapes = shapes_in = [tuple(x.shape) for x in inputs]
        view = None
        if plan.elementwise and all(s == shapes[0] for s in shapes):
            view = elementwise_view(shapes[0], len(plan.data[0].dims))
            if view is not None:
                shapes = [view] * len(shapes)
        dims = plan.bind({t.name: s for t, s in zip(plan.data, shapes, strict=True)},
                         self.training)
        use_eval = not self.training and self._eval_fn is not None
        fn = self._eval_fn if use_eval else self._train_fn
        mask_names = [] if use_eval else [t.name for t in plan.masks]
        masks = [(plan.shape(t, dims), t) for t in plan.masks if not use_eval]
        # each Function argument as (source, key): 0 an input (index), 1 a mask (index),
        # 2 / 3 a parameter / buffer and 4 a hyper-parameter (by name, read at each call, so
        # that reassigning one takes effect), 5 a size (its value)
        where = {**{t.name: (0, k) for k, t in enumerate(plan.data)},
                 **{n: (1, k) for k, n in enumerate(mask_names)},
                 **{n: (2, n) for n in self._parameters}, **{n: (3, n) for n in self._buffers}}
        recipe = [where[ref] if source == "tensor" else (4, ref) if source == "hyper"
                  else (5, ref)
                  for _, _, source, ref in plan.arg_sources(fn.forward, self.spec, where, dims)]
        if view is not None and plan.any_shape and not any(k == 5 for k, _ in recipe) and \
                _shape_free(fn):
            # relu on (N, C, H, W): a kernel that reads no size runs on the images as they
            # are, with no view into the Function and none of its output (two autograd nodes)
            view = None
            masks = [(shapes_in[0], t) for _, t in masks]
        prepared = (view, fn, tuple(recipe), masks)
        if len(self._prepared) >= 64:
            self._prepared.clear()
        self._prepared[key] = prepared
        return prepared


class LossModule(torch.nn.Module):
    """A loss spec (softmax cross-entropy, MSE, ...) as ``loss(outputs, targets) -> scalar``.

    Integer class labels ``y[N]`` are given as they are to a spec whose target has one axis
    (labels), and as one-hot rows to a spec whose target is ``T[N, C]`` like the outputs.
    """

    def __init__(self, spec: Spec | str, **options):
        super().__init__()
        self.layer = SpecModule(spec, **options)
        self.target = self.layer.plan.data[-1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "target"}  # from the spec

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.target = self.layer.plan.data[-1]

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(targets) and len(self.target.dims) == outputs.ndim:
            targets = torch.nn.functional.one_hot(targets, outputs.shape[-1])
        if len(self.target.dims) == outputs.ndim:
            targets = targets.to(outputs.dtype)
        return self.layer(outputs, targets)
