"""A run of consecutive :class:`SpecModule`s as one ``torch.autograd.Function``.

``SpecSequential`` (what :func:`gradtool.nn.build` returns for the torch backend) is a
``torch.nn.Sequential`` whose forward, with grad enabled, runs each maximal run of consecutive
layers that can be chained (:func:`chainable`) as one :class:`ChainFunction`: one autograd node
and one Python backward for the run instead of one per layer. The chain's forward calls each
layer's generated ``autograd.Function`` forward in turn, with the arguments, masks (the same
draws of torch's global RNG, in the same order), running-statistics updates and element-wise
views the layer's own call would use; its backward calls the layers' generated backwards in
reverse order with the ``needs_input_grad`` flags each layer's own node would have had (a
parameter's ``requires_grad``; the input's flag for the first layer, and for a later one
whether the chain's input or any earlier layer's parameter requires grad). So outputs, running
statistics and gradients are those of the layer-by-layer path, bit for bit (tests in
``tests/test_fused.py``).

The first two calls of each kind (the layers, their modes, the input's shape, strides, dtype
and device, which arguments require grad, the parameters' shapes) run that as a loop over the
layers; from the second the chain generates a straight-line forward and backward for the kind
(:class:`_ChainProgram`, its ``source`` readable), which later calls of the kind run instead:
the same calls in the same order with the per-layer decisions of the loop fixed as constants,
the buffers and hyper-parameters read from the layers at each call. At most 16 kinds are kept
(:class:`_Programs`). ``ChainFunction.unrolled = False`` keeps every call on the loop.

A chain passes each layer's parameters by the names its spec gives them, in the spec's order
(``SpecModule._spec_params``): a parameter deleted and set again, or one registered on the
layer besides, leaves the Function's arguments as they were.

The layer-by-layer path (``torch.nn.Sequential.forward``) runs instead under
``torch.no_grad``, while ``torch.compile`` or ``torch.jit.trace`` traces, under saved-tensor
hooks (``torch.autograd.graph.saved_tensors_hooks``), when global module hooks are set, when
nothing in the run requires grad, and for ``SpecSequential.fused = False``; and a layer with
its own hooks, a module that is not a plain :class:`SpecModule` (``torch.nn.Flatten``), or one
with several inputs or outputs runs on its own and ends the chain there.

Double backward (``create_graph=True``) through a chain is refused with a RuntimeError when the
chain's backward runs (``once_differentiable`` alone let a gradient penalty through silently
where the incoming gradient did not require grad: the gradient came back as a constant). Set
``model.fused = False`` for higher-order gradients: layer by layer, each generated Function
whose backward reads only inputs, parameters, state and outputs gives exact ones, and one that
reads forward intermediates (batch norm, layer norm, the losses) refuses too.
"""

from __future__ import annotations

import contextlib
import linecache
import weakref
from operator import itemgetter

import torch
from torch.autograd.function import FunctionCtx
from torch.nn.modules import module as _module

from gradtool.nn.torch_layers import SpecModule

# the context members a generated Function may use for a chain to run it with a plain context
_CTX_USED = {"needs_input_grad", "save_for_backward", "saved_tensors"}
_CTX_OTHER = frozenset(n for n in dir(FunctionCtx) if not n.startswith("__")) - _CTX_USED


class _Context:
    """The part of ``ctx`` a generated Function's forward and backward use: the
    ``needs_input_grad`` flags, ``save_for_backward`` / ``saved_tensors`` and attributes it
    sets (``ctx.p = p``). A chain makes one with ``_new_context(_Context)`` and sets
    ``needs_input_grad``."""

    needs_input_grad: tuple[bool, ...] = ()
    saved_tensors: tuple = ()

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors


_new_context = object.__new__


def _plain_ctx_only(fn) -> bool:
    """Does the generated Function ``fn`` use no ``ctx`` member but those of :class:`_Context`
    (no ``mark_dirty``, ``set_materialize_grads``, ...)?"""
    names = set(fn.forward.__code__.co_names) | set(fn.backward.__code__.co_names)
    return not (names & _CTX_OTHER)


def chainable(layer) -> bool:
    """Can ``layer`` run inside a :class:`ChainFunction`: a :class:`SpecModule` with its own
    ``forward``, no hooks of its own, one data input and one output, and generated Functions
    that use only a plain context."""
    # what cannot change is judged once per layer and kept; its hooks at every call
    ok = layer.__dict__.get("_chainable")
    if ok is None:
        ok = _chainable_kind(layer)
        layer.__dict__["_chainable"] = ok
    return ok and not (layer._forward_hooks or layer._forward_pre_hooks
                       or layer._backward_hooks or layer._backward_pre_hooks)


def _chainable_kind(layer) -> bool:
    """Is ``layer`` of a kind a chain can run (what :func:`chainable` says, less the hooks)?"""
    if type(layer).forward is not SpecModule.forward or not isinstance(layer, SpecModule):
        return False

    fns = [layer._train_fn] + ([layer._eval_fn] if layer._eval_fn is not None else [])
    return (len(layer.plan.data) == 1 and len(layer.spec.outputs) == 1
            and all(_plain_ctx_only(f) for f in fns))


def _saved_tensor_hooks() -> bool:
    """Are saved-tensor hooks active (``torch.autograd.graph.saved_tensors_hooks``,
    ``save_on_cpu``)? They would see only what a chain saves with ``save_for_backward``, not
    its intermediates, so a chain does not run under them. True when this torch cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


class ChainFunction(torch.autograd.Function):
    """``ChainFunction.apply(layers, X, *parameters)``: the layers (chainable
    :class:`SpecModule`s) applied in turn to ``X``, with ``parameters`` every layer's
    parameters in layer order and, within a layer, in its spec's order (``_spec_params``).
    Returns the last layer's output as its kernel gives it: for an element-wise layer run on a
    merged view (see ``SpecModule``), that view, whose shape to restore is
    ``out.grad_fn.out_shape`` (None otherwise; :class:`SpecSequential` restores it outside the
    Function, as ``SpecModule.forward`` does, so that the output is no view made inside a
    custom Function). Its backward returns ∂L/∂X and ∂L/∂ of each parameter from the layers'
    generated backwards (None where not needed). Raises what the layers' calls raise
    (:class:`gradtool.nn.LayerError` for an input shape a layer refuses)."""

    unrolled = True  # False: every call runs the general loop (for tests and benchmarks)

    @staticmethod
    def forward(ctx, layers, X, *parameters):
        ctx.program = None
        if not ChainFunction.unrolled:
            return ChainFunction._forward_each(ctx, layers, X, parameters)
        # the run's straight-line program for this call's kind (see _ChainProgram), made from
        # the second call of that kind, which runs the general loop below (see _Programs)
        key = (*map(id, layers), *[layer.training for layer in layers], X.shape, X.stride(),
               X.dtype, X.device, ctx.needs_input_grad,
               *[None if p is None else p.shape for p in parameters])
        programs = layers[0].__dict__.get("_chain_programs")
        if programs is None:
            programs = layers[0].__dict__["_chain_programs"] = _Programs()
        program = programs.get(key)
        if program is not None and program.made_for(layers):
            ctx.program = program
            return program.forward(ctx, layers, X, *parameters)
        h = ChainFunction._forward_each(ctx, layers, X, parameters)
        programs.add(key, layers, ctx)
        return h

    @staticmethod
    def _forward_each(ctx, layers, X, parameters):
        """The general forward: each layer's prepared step in a loop (what a program unrolls);
        sets ``ctx.calls``, ``ctx.kept``, ``ctx.moved`` and saves the reachable tensors."""
        needs = ctx.needs_input_grad
        flowing = needs[1]        # does the current activation require grad
        calls = []                # per layer: (its step, its context, offset, input shape)
        offset = 2                # where the current layer's parameters start in ``needs``
        h = out = X
        for layer in layers:
            shape = h.shape
            step = layer._chain_steps.get((layer.training, shape))
            if step is None:
                step = _chain_step(layer, h, (layer.training, shape))
            view, masks, arguments, flags_of, forward, n_params = step[:6]
            x = h if view is None else h.reshape(view)
            own = needs[offset:offset + n_params]
            # the flags the layer's own node would get: the input's, each parameter's, no other
            fctx = _new_context(_Context)   # no __init__ frame per layer
            fctx.needs_input_grad = flags_of((False, flowing, *own))
            out = forward(fctx, *arguments(x, _draw(masks, x, layer.plan) if masks else (),
                                           layer._parameters, layer._buffers,
                                           layer.plan.hypers))
            calls.append((step, fctx, offset, shape))
            if not flowing and True in own:
                flowing = True
            offset += n_params
            h = out if view is None else out.reshape(shape)
        # the last layer's output as its kernel gives it; its shape is restored outside
        ctx.out_shape = None if view is None else shape
        h = out
        # a saved tensor the caller can reach (the input, a parameter, a buffer, the output, or
        # a view of one) is saved with save_for_backward, so that changing it in place before
        # backward raises as on the layer-by-layer path; the chain's intermediates are kept
        # in a list that backward empties layer by layer, so that they are freed as early as
        # the layers' own nodes free theirs (holding all until the chain's backward ends was
        # 8–9 % slower per step at 128×1×28×28)
        reachable = {id(t if t._base is None else t._base) for t in (X, *parameters, h, out)}
        for layer in layers:
            for b in layer._buffers.values():
                if b is not None:
                    reachable.add(id(b if b._base is None else b._base))
        checked, kept, moved = [], [], []
        for _, fctx, _, _ in calls:
            tensors = fctx.saved_tensors
            fctx.saved_tensors = ()
            at = [k for k, t in enumerate(tensors)
                  if t is not None and id(t if t._base is None else t._base) in reachable]
            if at:  # kept as None, restored from ``checked`` by backward
                moved.append(tuple((k, len(checked) + j) for j, k in enumerate(at)))
                checked += [tensors[k] for k in at]
                tensors = tuple(None if k in at else t for k, t in enumerate(tensors))
            else:
                moved.append(())
            kept.append(tensors)
        ctx.save_for_backward(*checked)
        ctx.kept = kept
        ctx.moved = moved
        ctx.calls = calls
        return h

    @staticmethod
    def backward(ctx, G):
        if torch.is_grad_enabled():  # create_graph=True: this backward would be differentiated
            raise RuntimeError(
                "backward through a chain of gradtool layers (SpecSequential) with "
                "create_graph=True: a chain's gradients cannot be differentiated again (its "
                "intermediates are saved as constants); set model.fused = False to run layer by "
                "layer, where a layer whose backward reads only its inputs, parameters and "
                "output gives exact higher-order gradients and the others (batch norm, layer "
                "norm, the losses) say so")
        if ctx.program is not None:
            return ctx.program.backward(ctx, G)
        checked, kept, moved = ctx.saved_tensors, ctx.kept, ctx.moved
        if kept is None:
            _freed_error()
        keep_graph = _keep_graph()
        if not keep_graph:
            ctx.kept = None
        grads = [None] * len(ctx.needs_input_grad)
        calls = ctx.calls
        for i in range(len(calls) - 1, -1, -1):
            step, fctx, offset, shape = calls[i]
            if G is None or True not in fctx.needs_input_grad:
                break  # nothing before this layer needs a gradient
            tensors = kept[i]
            if not keep_graph:
                kept[i] = None  # freed with the layer's context, as its own node frees them
            if moved[i]:
                tensors = list(tensors)
                for k, j in moved[i]:
                    tensors[k] = checked[j]
            fctx.saved_tensors = tuple(tensors)
            tensors = None  # freed with the context after the layer's backward, no later
            view, slots = step[0], step[7]
            got = step[6](fctx, G if view is None else G.reshape(view))
            got = got if type(got) is tuple else (got,)
            G = None
            for k, g in zip(slots, got):
                if k == -1:
                    G = g if view is None or g is None else g.reshape(shape)
                elif k is not None:
                    grads[offset + k] = g
            fctx.saved_tensors = ()
        grads[1] = G if ctx.needs_input_grad[1] else None
        return tuple(grads)


class _Programs(dict):
    """A first layer's programs by kind of call, at most 16. A program is made at the second
    call of a kind (a kind seen once, like a last short batch, stays on the loop), and the
    oldest gives way to a new one; once 16 have given way, the chain's kinds are more than it
    keeps and it makes no more (each call would otherwise run the loop and make a program).
    A copy of the layer (``copy.deepcopy``, pickling) starts with none; its calls make their
    own."""

    LIMIT = 16

    def __init__(self):
        super().__init__()
        self.seen: dict = {}   # kinds called once, oldest first (an ordered set)
        self.evicted = self.made = 0

    def add(self, key, layers, ctx) -> None:
        """Note the kind ``key`` after a call on the loop (``ctx`` that call's context); make
        its program if it is the kind's second call and programs are still made."""
        if self.evicted >= self.LIMIT:
            return
        if self.seen.pop(key, None) is None:
            if len(self.seen) >= 4 * self.LIMIT:
                del self.seen[next(iter(self.seen))]
            self.seen[key] = True
            return
        if len(self) >= self.LIMIT:
            del self[next(iter(self))]  # the oldest
            self.evicted += 1
        self[key] = _ChainProgram(layers, ctx)
        self.made += 1

    def __deepcopy__(self, memo):
        return _Programs()

    def __reduce__(self):
        return (_Programs, ())


class _ChainProgram:
    """A run's forward and backward for one kind of call, as straight-line Python generated
    from a call of that kind on ``ChainFunction.forward``'s general loop: per layer the
    same step, arguments, ``needs_input_grad`` flags, masks, element-wise views and saved
    tensors, with what that call found out fixed as constants (each layer's flags and views,
    which saved tensors the caller can reach and so go through ``save_for_backward``, the
    layer below which no gradient is needed). A kind of call is the layers, their modes,
    the input's shape, strides, dtype and device, the ``needs_input_grad`` flags and the
    parameters' shapes (``ChainFunction.forward``'s key): within it, all of this is the same
    at every call, because the generated layers branch on sizes and flags, never on values.
    Buffers and hyper-parameters are read from the layers at each call, as the loop reads
    them. Outputs, running statistics and gradients are the loop's, bit for bit (tests in
    ``tests/test_fused.py``); what is saved for backward and when it is freed too. Unrolled,
    the 8×8 digits CNN's training step is about 0.02 of plain torch.nn's speed faster on one
    CPU thread (docs/training.md). ``source`` is the generated code.

    The program refers to its layers weakly (a replaced layer is not kept alive by it); a
    layer that has died, and another since given its id, fail :meth:`made_for`."""

    def __init__(self, layers, ctx):
        self._layers = tuple(weakref.ref(layer) for layer in layers)
        calls, moved, needs = ctx.calls, ctx.moved, ctx.needs_input_grad
        n_params = len(needs) - 2
        env = {"new": _new_context, "Context": _Context, "draw": _draw, "keep_graph": _keep_graph,
               "freed_error": _freed_error}
        fw = [f"def forward(ctx, L, X{''.join(f', a{j}' for j in range(n_params))}):"]
        h = "X"
        last = len(calls) - 1
        for i, (step, fctx, offset, shape) in enumerate(calls):
            layer = layers[i]
            view, masks, forward, recipe = step[0], step[1], step[4], step[8]
            names = layer._spec_params
            env[f"F{i}"], env[f"N{i}"] = forward, tuple(fctx.needs_input_grad)
            fw.append(f"    # {i}: {layer.spec.name}, input {tuple(shape)}")
            fw.append(f"    c{i} = new(Context)")
            fw.append(f"    c{i}.needs_input_grad = N{i}")
            x = h
            if view is not None:
                env[f"V{i}"] = view
                fw.append(f"    x = {h}.reshape(V{i})")
                x = "x"
            if masks:
                env[f"M{i}"] = masks
                fw.append(f"    m{i} = draw(M{i}, {x}, L[{i}].plan)")
            # buffers and hyper-parameters read at each call: a change takes effect
            if any(kind == 3 for kind, _ in recipe):
                fw.append(f"    B = L[{i}]._buffers")
            if any(kind == 4 for kind, _ in recipe):
                fw.append(f"    H = L[{i}].plan.hypers")
            args = []
            for k, (kind, ref) in enumerate(recipe):
                if kind == 0:
                    args.append(x)
                elif kind == 1:
                    args.append(f"m{i}[{ref!r}]")
                elif kind == 2:
                    args.append(f"a{offset - 2 + names.index(ref)}")
                elif kind == 3:
                    args.append(f"B[{ref!r}]")
                elif kind == 4:
                    args.append(f"H[{ref!r}]")
                else:
                    env[f"K{i}_{k}"] = ref
                    args.append(f"K{i}_{k}")
            # one name for the activation, so that one nothing saved is freed at once
            fw.append(f"    h = F{i}(c{i}, {', '.join(args)})")
            if view is not None:
                fw.append("    x = None")
                if i < last:  # the last layer's shape is restored outside the Function
                    env[f"S{i}"] = shape
                    fw.append(f"    h = h.reshape(S{i})")
            h = "h"
        env["OUT_SHAPE"] = ctx.out_shape
        fw.append("    ctx.out_shape = OUT_SHAPE")
        # the saved tensors: those the caller can reach through save_for_backward, the rest
        # kept in a list that backward empties layer by layer (as the loop does)
        fw.append("    # saved for backward")
        checked, kept = [], []
        for i in range(len(calls)):
            fw.append(f"    t{i} = c{i}.saved_tensors")
            fw.append(f"    c{i}.saved_tensors = ()")
            at = dict(moved[i])
            slots = []
            for k in range(len(ctx.kept[i])):
                if k in at:
                    checked.append(f"t{i}[{k}]")
                    slots.append("None")
                else:
                    slots.append(f"t{i}[{k}]")
            kept.append("(" + "".join(f"{t}, " for t in slots) + ")")
        fw.append(f"    ctx.save_for_backward({', '.join(checked)})")
        fw.append(f"    ctx.kept = [{', '.join(kept)}]")
        fw.append(f"    ctx.calls = ({''.join(f'c{i}, ' for i in range(len(calls)))})")
        fw.append(f"    return {h}")

        bw = ["def backward(ctx, G):",
              "    checked, kept = ctx.saved_tensors, ctx.kept",
              "    if kept is None:",
              "        freed_error()",
              "    keep = keep_graph()",
              "    if not keep:",
              "        ctx.kept = None",
              "    calls = ctx.calls",
              f"    grads = [None] * {len(needs)}"]
        for i in range(len(calls) - 1, -1, -1):
            step, fctx, offset, shape = calls[i]
            if True not in fctx.needs_input_grad:
                break  # no layer below this one needs a gradient (the flags only grow upwards)
            view, backward, slots = step[0], step[6], step[7]
            env[f"D{i}"] = backward
            at = dict(moved[i])
            bw.append(f"    # {i}: {layers[i].spec.name}")
            bw.append("    if G is None:")
            bw.append("        return tuple(grads)")
            bw.append(f"    c, t = calls[{i}], kept[{i}]")
            bw.append("    if not keep:")
            bw.append(f"        kept[{i}] = None")
            parts = [f"checked[{at[k]}]" if k in at else f"t[{k}]"
                     for k in range(len(ctx.kept[i]))]
            bw.append(f"    c.saved_tensors = ({''.join(f'{t}, ' for t in parts)})")
            bw.append("    t = None")
            g_in = "G" if view is None else f"G.reshape(V{i})"
            bw.append(f"    g = D{i}(c, {g_in})")
            bw.append("    g = g if type(g) is tuple else (g,)")
            bw.append("    c.saved_tensors = ()")
            into_g = None
            for k, slot in enumerate(slots):
                if slot == -1:
                    into_g = k
                elif slot is not None:
                    bw.append(f"    grads[{offset + slot}] = g[{k}]")
            if into_g is None:
                bw.append("    G = None")
            elif view is None:
                bw.append(f"    G = g[{into_g}]")
            else:
                env[f"S{i}"] = shape
                bw.append(f"    G = g[{into_g}]")
                bw.append("    if G is not None:")
                bw.append(f"        G = G.reshape(S{i})")
        if needs[1]:
            bw.append("    grads[1] = G")
        bw.append("    return tuple(grads)")
        self.source = "\n".join(fw) + "\n\n\n" + "\n".join(bw) + "\n"
        # the source is shown in tracebacks while the program lives
        filename = f"<gradtool chain {id(self):x}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True),
                                     filename)
        weakref.finalize(self, linecache.cache.pop, filename, None)
        exec(compile(self.source, filename, "exec"), env)
        self.forward, self.backward = env["forward"], env["backward"]

    def made_for(self, layers) -> bool:
        """Are ``layers`` the live layers this program was made for?"""
        return all(ref() is layer for ref, layer in zip(self._layers, layers, strict=True))


def _freed_error():
    raise RuntimeError(
        "backward through a chain of gradtool layers (SpecSequential) a second time: "
        "its intermediates were freed by the first backward, which ran without "
        "retain_graph=True")


def _draw(masks, ref: torch.Tensor, plan) -> list[torch.Tensor]:
    """The layer's masks (``(shape, mask tensor)`` pairs), drawn as ``SpecModule.forward``
    draws them: torch's global RNG at the same point of the sequence, each with its keep
    probability at the layer's hyper-parameters as they are now (``plan.keep``)."""
    dtype = ref.dtype if torch.is_floating_point(ref) else torch.get_default_dtype()
    return [torch.empty(shape, dtype=dtype, device=ref.device).bernoulli_(plan.keep(t))
            for shape, t in masks]


def _keep_graph() -> bool:
    """Does the running backward keep the graph (``retain_graph=True`` or
    ``create_graph=True``)? True when this torch cannot say."""
    get = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if get is None else bool(get())


def _argument_getter(recipe: tuple):
    """``arguments(x, masks, parameters, buffers, hypers)``: the layer's Function arguments
    from its prepared ``recipe`` (see ``SpecModule._prepare``) as one generated lambda, e.g.
    ``(x, P['weight'], P['bias'], H['P'], H['S'])`` for conv2d, so that a chain reads
    parameters, buffers and hyper-parameters at each call (reassigning one takes effect) with
    no per-argument dispatch."""
    sources = ("x", "M", "P", "B", "H")
    parts = ["x" if kind == 0 else f"C[{k}]" if kind == 5 else f"{sources[kind]}[{ref!r}]"
             for k, (kind, ref) in enumerate(recipe)]
    constants = tuple(ref if kind == 5 else None for kind, ref in recipe)
    return eval(f"lambda x, M, P, B, H: ({', '.join(parts)},)", {"C": constants})


def _flag_picker(slots: tuple):
    """``flags_of((False, flowing, *own))``: per Function argument, the ``needs_input_grad``
    flag its own node would get (the input's ``flowing``; the k-th parameter's own flag;
    False for the rest) from that one tuple."""
    pick = tuple(1 if k == -1 else 0 if k is None else 2 + k for k in slots)
    # one C call either way: a slice for one argument (itemgetter would return no tuple)
    return itemgetter(slice(pick[0], pick[0] + 1)) if len(pick) == 1 else itemgetter(*pick)


def _chain_step(layer, h: torch.Tensor, key: tuple) -> tuple:
    """What :class:`ChainFunction` needs to run ``layer`` on ``h`` in its mode, from the layer's
    prepared call (see ``SpecModule._prepare``; raises as it does): (the element-wise view or
    None, the masks' shapes and keep probabilities, the argument getter, the flag picker, the
    Function's forward, the number of parameters, its backward, and per Function argument -1
    for the input, a parameter's index in ``layer._parameters``, or None); kept per (mode,
    shape) like the preparation; last, the recipe of the Function's arguments."""
    prepared = layer._prepared.get(key)
    if prepared is None:
        prepared = layer._prepare((h,), key)
    view, fn, recipe, masks = prepared
    names = layer._spec_params
    slots = tuple(-1 if kind == 0 else names.index(ref) if kind == 2 else None
                  for kind, ref in recipe)
    step = (view, masks, _argument_getter(recipe), _flag_picker(slots), fn.forward,
            len(names), fn.backward, slots, recipe)
    if len(layer._chain_steps) >= 64:
        layer._chain_steps.clear()
    layer._chain_steps[key] = step
    return step


class SpecSequential(torch.nn.Sequential):
    """``torch.nn.Sequential`` that runs each run of chainable layers (see the module
    docstring) as one :class:`ChainFunction` when grad is enabled; otherwise, and with
    ``fused = False``, exactly ``torch.nn.Sequential``. Same modules, parameters and
    ``state_dict`` keys as the ``Sequential`` of the same layers."""

    fused = True

    def forward(self, X):
        # torch.compile first: dynamo cannot trace the saved-tensor-hooks query (a graph break)
        if torch.compiler.is_compiling() or not (self.fused and torch.is_grad_enabled()) or \
                torch.jit.is_tracing() or _global_hooks() or _saved_tensor_hooks():
            return super().forward(X)
        run, params = [], []   # the current run of chainable layers and their parameters
        for layer in self._modules.values():
            if chainable(layer):
                run.append(layer)
                own = layer._parameters
                params += [own.get(name) for name in layer._spec_params]
                continue
            if run:
                X = _run(run, params, X)
                run, params = [], []
            X = layer(X)
        return _run(run, params, X) if run else X


def _run(run: list, params: list, X):
    """``X`` through the chainable layers ``run`` (``params`` their parameters in order): one
    :class:`ChainFunction` for two or more layers on a tensor when something requires grad,
    else each layer's own call."""
    if len(run) > 1 and isinstance(X, torch.Tensor) and \
            (X.requires_grad or any(p is not None and p.requires_grad for p in params)):
        out = ChainFunction.apply(run, X, *params)
        shape = out.grad_fn.out_shape  # an element-wise last layer's view, undone out here
        return out if shape is None else out.reshape(shape)
    for layer in run:
        X = layer(X)
    return X


@contextlib.contextmanager
def restored_state(model: torch.nn.Module, device=None):
    """Run the block, then put ``model``'s buffers (running statistics) and its training mode
    back as they were; torch's random generators are forked (CPU, and ``device`` if CUDA), so
    the block's draws do not change the run's."""
    device = torch.device("cpu") if device is None else torch.device(device)
    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            model.train(was_training)


def prepare_calls(model: torch.nn.Module, shapes, dtype, device=None) -> None:
    """Have every :class:`SpecModule` in ``model`` prepare its training-mode call (sizes bound,
    kernel chosen; ``SpecModule._prepare``) for inputs of each of ``shapes`` (the model's input
    shapes, batch first), by one forward of zeros per shape under ``torch.no_grad``; the
    buffers (running statistics) and torch's random generators are put back afterwards
    (:func:`restored_state`), so nothing the run computes changes. Do this before
    ``torch.compile(model)``: dynamo would otherwise trace the preparation's Python at the first
    call and break the graph at every layer. Raises what the model's forward raises for a shape
    it refuses."""
    with restored_state(model, device), torch.no_grad():
        model.train()
        for shape in shapes:
            model(torch.zeros(shape, dtype=dtype, device=device))
