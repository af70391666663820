"""SpecSequential's chains (gradtool/nn/fused.py): a run of SpecModules as one
autograd.Function gives the layer-by-layer path's outputs, running statistics and gradients bit
for bit (float64), and plain torch.nn's to rounding; the per-layer path where a chain cannot
apply (no_grad, hooks, Flatten, nothing requiring grad); double backward refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench.bench_cnn import copy_weights, plain_model
from gradtool.nn import SpecModule, build, cnn, mlp
from gradtool.nn.fused import ChainFunction, SpecSequential
from tests.helpers import PER_SIZE_SPEC, spec_layer_case


def _nodes(t) -> list[str]:
    """Names of the autograd nodes reachable from ``t``'s grad_fn."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def _step(model, loss_fn, x, y, fused: bool, seed: int = 5):
    """Output, ∂L/∂x, parameter gradients and buffers after one forward + backward."""
    model.fused = fused
    torch.manual_seed(seed)  # the same dropout masks on both paths
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = model(x)
    loss_fn(out, y).backward()
    return (out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()}, out)


def _program_ran(out) -> bool:
    """Did the chain that made ``out`` run its unrolled program (a call of a kind seen before)
    rather than the general loop (the first call of a kind)?"""
    node = out.grad_fn
    return type(node).__name__ == "ChainFunctionBackward" and node.program is not None


def _same(a, b) -> None:
    """Bit-identical: outputs, input gradient, every parameter's .grad and every buffer."""
    assert torch.equal(a[0], b[0])
    assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))
    assert a[2].keys() == b[2].keys() and a[3].keys() == b[3].keys()
    for k in a[2]:
        assert (a[2][k] is None) == (b[2][k] is None), k
        assert a[2][k] is None or torch.equal(a[2][k], b[2][k]), k
    for k in a[3]:
        assert torch.equal(a[3][k], b[3][k]), k


def _both_ways():
    """(fused, model, loss) for a small float64 CNN built the same way, layer by layer
    first, then chained."""
    desc = cnn((1, 8, 8), 10, widths=(4,))
    for fused in (False, True):
        model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
        model.fused = fused
        yield fused, model, loss_fn


def _data(n=4, shape=(1, 8, 8), classes=10, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), dtype=torch.float64, generator=g).requires_grad_(grad)
    return x, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("input_grad", [True, False])
def test_cnn_chain_equals_the_layer_by_layer_path_bit_for_bit(input_grad):
    """The digits CNN with dropout (masks from torch's RNG), training mode, four steps (the
    first two run the chain's general loop, the second making the kind's program, the last
    two that unrolled program): outputs, ∂L/∂x, every gradient (accumulated over the steps)
    and the running statistics equal after each step, and the whole model is one chain."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6), dropout=0.3)
    x, y = _data(grad=input_grad)
    models = {fused: build(desc, "torch", dtype="float64", seed=0) for fused in (False, True)}
    assert isinstance(models[True][0], SpecSequential)
    for step in range(4):
        got = {fused: _step(*models[fused], x, y, fused, seed=step) for fused in (False, True)}
        _same(got[False], got[True])
        assert _program_ran(got[True][4]) == (step >= 2)
    assert (got[True][1] is not None) == input_grad
    chains = _nodes(got[True][4]).count("ChainFunctionBackward")
    assert chains == 1 and "ChainFunctionBackward" not in _nodes(got[False][4])


def test_the_general_loop_alone_equals_the_layer_by_layer_path():
    """With ``ChainFunction.unrolled = False`` every call runs the general loop (no program is
    made), with the same results."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6), dropout=0.3)
    x, y = _data()
    models = {fused: build(desc, "torch", dtype="float64", seed=0) for fused in (False, True)}
    try:
        ChainFunction.unrolled = False
        for step in range(3):
            got = {f: _step(*models[f], x, y, f, seed=step) for f in (False, True)}
            _same(got[False], got[True])
            assert not _program_ran(got[True][4])
    finally:
        ChainFunction.unrolled = True
    assert not models[True][0][0].__dict__.get("_chain_programs")


def test_a_new_kind_of_call_gets_its_own_program():
    """Batch size, train/eval mode and which parameters require grad each change the kind of
    call: each new kind runs the general loop twice (the second call makes its program), then
    its own program; alternating between kinds, every step equals the layer-by-layer path's
    (outputs, gradients, running statistics)."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6), dropout=0.3)
    models = {fused: build(desc, "torch", dtype="float64", seed=0) for fused in (False, True)}
    kinds = [(4, True, None), (3, True, None), (4, False, None), (4, True, 0), (4, True, 4)]
    for round_ in range(3):
        for k, (n, training, frozen) in enumerate(kinds):
            x, y = _data(n=n)
            got = {}
            for fused, (model, loss_fn) in models.items():
                model.train(training)
                model.requires_grad_(True)
                if frozen is not None:
                    model[frozen].requires_grad_(False)
                model.zero_grad(set_to_none=True)
                got[fused] = _step(model, loss_fn, x, y, fused, seed=10 * round_ + k)
            _same(got[False], got[True])
            assert _program_ran(got[True][4]) == (round_ == 2), (round_, k)


def test_cnn_chain_matches_plain_torch_nn_in_float64():
    """The same CNN in torch.nn (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Linear) with autograd:
    outputs, gradients and running statistics to rounding, over two training steps' forwards."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6))
    model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
    plain = plain_model(desc).double()
    copy_weights(model, plain)
    x, y = _data()
    for _ in range(2):
        out = model(x)
        ours = torch.autograd.grad(loss_fn(out, y), [x, *model.parameters()])
        ref = plain(x)
        theirs = torch.autograd.grad(F.cross_entropy(ref, y), [x, *plain.parameters()])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bufs = [b for n, b in plain.named_buffers() if "num_batches" not in n]
    for a, b in zip(model.buffers(), bufs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_mlp_chain_starts_after_flatten_and_matches_both_oracles():
    """flatten → linear → relu → linear: Flatten runs on its own, the three SpecModules as
    one chain; equal to the layer-by-layer path bit for bit and to torch.nn to rounding."""
    desc = mlp(12, 5, hidden=(7,))
    x, y = _data(shape=(3, 2, 2), classes=5)
    got = {}
    for fused in (False, True):
        model, loss_fn = build(desc, "torch", dtype="float64", seed=1)
        got[fused] = _step(model, loss_fn, x, y, fused)
    _same(got[False], got[True])
    assert _nodes(got[True][4]).count("ChainFunctionBackward") == 1
    model, _ = build(desc, "torch", dtype="float64", seed=1)
    plain = plain_model(desc).double()
    copy_weights(model, plain)
    xp = x.detach().clone().requires_grad_()
    F.cross_entropy(plain(xp), y).backward()
    torch.testing.assert_close(got[True][1], xp.grad, rtol=1e-10, atol=1e-13)
    for (n, a), b in zip(got[True][2].items(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-13, msg=n)


def test_eval_mode_chain_equals_layer_by_layer_and_torch_nn():
    """Eval forms (batch norm on running statistics, dropout the identity) inside a chain."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6), dropout=0.5)
    x, y = _data()
    got = {}
    for fused in (False, True):
        model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
        with torch.no_grad():  # running statistics away from their initial 0, 1
            model.train()(x * 3 + 1)
        model.eval()
        got[fused] = _step(model, loss_fn, x, y, fused)
    _same(got[False], got[True])
    assert "ChainFunctionBackward" in _nodes(got[True][4])
    model, _ = build(desc, "torch", dtype="float64", seed=0)
    plain = plain_model(desc).double()
    copy_weights(model, plain)
    with torch.no_grad():
        plain.train()(x * 3 + 1)
    xp = x.detach().clone().requires_grad_()
    ref = plain.eval()(xp)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(got[True][0], ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[True][1], xp.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("frozen", [0, 1, 4])
def test_frozen_layers_get_no_gradient_and_the_rest_are_unchanged(frozen):
    """A layer whose parameters do not require grad (the first conv, its batch norm, the
    second conv), input without grad: no .grad for it, and the rest as layer by layer."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6))
    x, y = _data(grad=False)
    got = {}
    for fused in (False, True):
        model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
        model[frozen].requires_grad_(False)
        got[fused] = _step(model, loss_fn, x, y, fused)
    _same(got[False], got[True])
    assert all(g is None for n, g in got[True][2].items() if n.startswith(f"{frozen}."))
    assert all(g is not None for n, g in got[True][2].items() if not n.startswith(f"{frozen}."))


def test_no_grad_and_nothing_requiring_grad_run_layer_by_layer():
    desc = cnn((1, 8, 8), 10, widths=(4, 6))
    model, _ = build(desc, "torch", dtype="float64", seed=0)
    x, _ = _data(grad=False)
    with torch.no_grad():
        a = model(x)
    model.requires_grad_(False)
    b = model(x)
    assert a.grad_fn is None and b.grad_fn is None and torch.equal(a, b)


def test_a_hooked_layer_runs_on_its_own_and_its_hook_fires_once():
    """A forward hook on the third layer splits the model into chains around it; the hook
    sees that layer's output, and the results equal the layer-by-layer path's."""
    desc = cnn((1, 8, 8), 10, widths=(4, 6))
    x, y = _data()
    got, seen = {}, {}
    for fused in (False, True):
        model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
        calls = seen[fused] = []
        model[2].register_forward_hook(lambda m, inp, out, calls=calls: calls.append(out))
        got[fused] = _step(model, loss_fn, x, y, fused)
    _same(got[False], got[True])
    assert len(seen[True]) == len(seen[False]) == 1
    assert torch.equal(seen[True][0], seen[False][0])
    assert _nodes(got[True][4]).count("ChainFunctionBackward") == 2


def test_a_hook_added_after_chaining_splits_the_chain_and_removing_it_joins_it_again():
    """What a chain prepares per layer is kept, but a layer's hooks are read at every call: a
    hook registered after chained steps takes that layer out (and fires), and once removed the
    model is one chain again, with the layer-by-layer path's results throughout."""
    desc = cnn((1, 8, 8), 10, widths=(4,))
    x, y = _data()
    model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
    twin, _ = build(desc, "torch", dtype="float64", seed=0)
    seen = []
    for hooked, chains in ((False, 1), (True, 2), (False, 1)):
        handle = model[2].register_forward_hook(lambda m, i, o: seen.append(o)) \
            if hooked else None
        ours, theirs = _step(model, loss_fn, x, y, True), _step(twin, loss_fn, x, y, False)
        _same(ours, theirs)
        assert _nodes(ours[4]).count("ChainFunctionBackward") == chains
        if handle is not None:
            handle.remove()
    assert len(seen) == 1


def test_chain_reads_reassigned_parameters_and_hyper_parameters_at_each_call():
    """After chained steps, a convolution weight replaced by a new Parameter and batch norm's
    momentum changed take effect in the next chained step: ∂L/∂W reaches the new Parameter, and
    outputs, gradients and running statistics equal torch.nn's (Conv2d, BatchNorm2d with that
    momentum) to rounding and the layer-by-layer path's bit for bit."""
    desc = cnn((1, 8, 8), 10, widths=(4,))
    x, y = _data()
    models = [build(desc, "torch", dtype="float64", seed=0)[0] for _ in range(2)]
    _, loss_fn = build(desc, "torch", dtype="float64", seed=0)
    plain = plain_model(desc).double()
    copy_weights(models[0], plain)
    for model, fused in zip(models, (True, False)):
        _step(model, loss_fn, x, y, fused)
        model.zero_grad(set_to_none=True)
        model[0].weight = torch.nn.Parameter(model[0].weight.detach() * 0.5)
        model[1].plan.hypers["momentum"] = 0.25
    F.cross_entropy(plain(x), y).backward()  # the same first step's running statistics
    with torch.no_grad():
        plain[0].weight.mul_(0.5)
    plain[1].momentum = 0.25
    plain.zero_grad()
    ours, theirs = _step(models[0], loss_fn, x, y, True), _step(models[1], loss_fn, x, y, False)
    _same(ours, theirs)
    assert _nodes(ours[4]).count("ChainFunctionBackward") == 1
    assert models[0][0].weight.grad is ours[2]["0.weight"]
    xp = x.detach().clone().requires_grad_()
    ref = plain(xp)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(ours[0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], xp.grad, rtol=1e-10, atol=1e-13)
    for (n, a), b in zip(ours[2].items(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad, rtol=1e-10, atol=1e-13, msg=n)
    bufs = [b for n, b in plain.named_buffers() if "num_batches" not in n]
    for a, b in zip(ours[3].values(), bufs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_element_wise_layer_on_a_merged_view_inside_a_chain(tmp_path):
    """Y[n, d] = X[n, d] / D reads its size: inside a chain it runs on the (N, C·H·W) view of
    the convolution's output and its gradient is viewed back, as on its own."""
    spec = tmp_path / "per_size.py"
    spec.write_text(PER_SIZE_SPEC)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    got = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = SpecSequential(SpecModule("conv2d", C=1, O=3, K=3, S=1, P=1,
                                          dtype=torch.float64),
                               SpecModule(str(spec), dtype=torch.float64),
                               SpecModule("batchnorm2d", C=3, dtype=torch.float64))
        model.fused = fused
        out = model(x)
        g = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).reshape(out.shape)
        got.append((out, *torch.autograd.grad(out, [x, *model.parameters()], g)))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)
    conv = F.conv2d(x, model[0].weight, model[0].bias, padding=1) / 48
    ref = F.batch_norm(conv, None, None, model[2].gamma, model[2].beta, training=True,
                       eps=model[2].plan.hypers["eps"])
    torch.testing.assert_close(got[1][0], ref, rtol=1e-12, atol=1e-12)


def test_double_backward_through_a_chain_is_refused():
    """create_graph=True through a chain raises at once and says to set model.fused = False,
    also where the incoming gradient needs none (a gradient penalty on model(x).sum(): with
    once_differentiable alone the gradient came back a constant and the penalty was silently
    dropped, found by a newcomer trial); layer by layer, tanh and linear give the
    second-order gradients of torch.nn's twin."""
    desc = mlp(4, 3, hidden=(5,), activation="tanh")
    model, _ = build(desc, "torch", dtype="float64", seed=0)
    x, _ = _data(shape=(4,), classes=3)
    for loss in (lambda out: out.square().sum(), lambda out: out.sum()):
        with pytest.raises(RuntimeError, match="model.fused = False"):
            torch.autograd.grad(loss(model(x)), [x], create_graph=True)
    model.fused = False
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for ours, theirs in ((model[1], plain[1]), (model[3], plain[3])):
            theirs.weight.copy_(ours.W)
            theirs.bias.copy_(ours.b)
    got = []
    for m in (model, plain):
        xi = x.detach().clone().requires_grad_()
        gx, = torch.autograd.grad(m(xi).square().sum(), [xi], create_graph=True)
        penalty = gx.square().sum()
        got.append(torch.autograd.grad(penalty, [xi, *m.parameters()]))
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chain_function_lists_each_parameter_once_per_layer_in_order():
    """ChainFunction.apply's gradients line up with the parameters given (conv: W then b)."""
    layers = [SpecModule("linear", I=3, O=2, dtype=torch.float64),
              SpecModule("tanh", dtype=torch.float64)]
    params = [p for m in layers for p in m.parameters()]
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = ChainFunction.apply(layers, x, *params)
    got = torch.autograd.grad(y.sum(), [x, *params])
    ref = torch.tanh(F.linear(x, *params))
    want = torch.autograd.grad(ref.sum(), [x, *params])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_retain_graph_backward_twice_and_in_place_changes_as_layer_by_layer():
    """retain_graph=True: a second backward through the chain accumulates the same gradients
    again (its intermediates are freed only by a backward that keeps no graph; a third, after
    that, is refused); changing the input in place after the forward is caught on backward."""
    x, y = _data()
    got = {}
    for fused, model, loss_fn in _both_ways():
        loss_fn(model(x), y).backward()  # a first call: what follows runs the chain's program
        xi = x.detach().clone().requires_grad_()
        loss_fn(model(xi), y).backward()
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert _program_ran(out) == fused
        loss = loss_fn(out, y)
        loss.backward(retain_graph=True)
        once = [p.grad.clone() for p in model.parameters()]
        loss.backward()
        got[fused] = [(a, p.grad.clone()) for a, p in zip(once, model.parameters(),
                                                          strict=True)]
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()
        xi = x.detach().clone().requires_grad_()
        out = model(xi)
        assert _program_ran(out) == fused
        with torch.no_grad():
            xi.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        out = model(x)  # and a parameter changed in place
        with torch.no_grad():
            model[0].weight.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    for (a1, b1), (a2, b2) in zip(got[False], got[True], strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        torch.testing.assert_close(b2, 2 * a2, rtol=1e-14, atol=0)


def test_saved_tensor_hooks_see_every_saved_tensor_layer_by_layer():
    """Under torch.autograd.graph.saved_tensors_hooks the model runs layer by layer, so the
    pack hook sees every tensor a layer saves (a chain keeps its intermediates itself)."""
    x, y = _data()
    counts = {}
    for fused, model, _ in _both_ways():
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, p=packed: p.append(t) or t,
                                                      lambda t: t):
            out = model(x)
        counts[fused] = len(packed)
        assert "ChainFunctionBackward" not in _nodes(out)
    assert counts[True] == counts[False] > 0


def test_a_deep_copied_model_chains_on_its_own_parameters_and_buffers():
    """A chain's prepared steps are copied with the layers (copy.deepcopy after chained
    steps), its programs are not: the copy's steps read the copy's parameters and update the
    copy's running statistics, the original's stay as they were, and both equal the
    layer-by-layer path."""
    desc = cnn((1, 8, 8), 10, widths=(4,))
    x, y = _data()
    model, loss_fn = build(desc, "torch", dtype="float64", seed=0)
    twin, _ = build(desc, "torch", dtype="float64", seed=0)
    _step(model, loss_fn, x, y, True)
    _step(twin, loss_fn, x, y, False)
    _step(model, loss_fn, x, y, True)  # the second call makes the chain's program
    _step(twin, loss_fn, x, y, False)
    assert model[0]._chain_programs
    clone = copy.deepcopy(model)
    assert not clone[0]._chain_programs  # a program is made for the original's layers
    with torch.no_grad():
        clone[0].weight.mul_(0.5)
        twin[0].weight.mul_(0.5)
    before = {n: b.clone() for n, b in model.named_buffers()}
    clone.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    for _ in range(3):  # the general loop (the second call makes the clone's own program)
        _same(_step(clone, loss_fn, x, y, True), _step(twin, loss_fn, x, y, False))
    (program,) = clone[0]._chain_programs.values()
    assert program.made_for(list(clone)) and not program.made_for(list(model))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def _chain_cases() -> list[str]:
    """Every built-in spec that can be a layer inside a chain: one data input, one output."""
    from gradtool.spec.loader import builtin_specs, load_spec

    def data(spec):  # the data inputs: inputs less sampled masks (dropout's)
        return [t for t in spec.tensors.values() if t.kind == "input" and t.keep is None]

    return sorted(n for n, path in builtin_specs().items()
                  if len(data(load_spec(path))) == 1 and len(load_spec(path).outputs) == 1)


CHAIN_CASES = _chain_cases()


@pytest.mark.parametrize("name", CHAIN_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_every_built_in_layer_in_a_chain_equals_its_own_function_bit_for_bit(name, training):
    """Each built-in spec that can be a layer, chained with relu (after it, or before it where
    the layer's output is not a batch relu takes), in training and eval mode: the chain calls
    the Function's forward and backward with a plain context (its arguments, flags, running
    statistics and saved tensors as the chain arranges them), the layer-by-layer path calls
    ``Function.apply``; outputs, ∂L/∂x, every gradient and every buffer agree bit for bit, in
    the first steps (the chain's general loop) and the third (its unrolled program)."""
    def model_and_input(relu_first: bool):
        layer, (x,) = spec_layer_case(name)
        x = x.detach()
        relu = SpecModule("relu", dtype=torch.float64)
        model = SpecSequential(*((relu, layer) if relu_first else (layer, relu)))
        return model.train(training), x

    relu_first = False
    try:
        with torch.no_grad():
            out = model_and_input(False)[0](model_and_input(False)[1])
    except Exception:  # relu takes no output of this rank (a scalar): relu first
        relu_first = True
        with torch.no_grad():
            out = model_and_input(True)[0](model_and_input(True)[1])
    upstream = torch.randn(out.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    models = {fused: model_and_input(relu_first) for fused in (False, True)}
    for step in range(3):  # the chain's general loop twice, then its unrolled program
        got = {}
        for fused, (model, x) in models.items():
            got[fused] = _step(model, lambda out, u: (out * u).sum(), x.requires_grad_(),
                               upstream, fused, seed=step)
        assert _nodes(got[True][4]).count("ChainFunctionBackward") == 1
        assert _nodes(got[False][4]).count("ChainFunctionBackward") == 0
        assert _program_ran(got[True][4]) == (step == 2)
        _same(got[False], got[True])


def test_the_chain_cases_cover_the_course_layers():
    assert {"linear", "relu", "elu", "sigmoid", "tanh", "softmax", "batchnorm", "layernorm",
            "dropout", "conv2d", "maxpool2d", "avgpool2d", "batchnorm2d",
            "global_avgpool"} <= set(CHAIN_CASES)


def _three_paths(make, run, calls: int = 4):
    """``run(model)`` on a model from ``make()`` for ``calls`` calls each: layer by layer, the
    chain's general loop alone, and the chain with programs (from the third call); returns
    each path's list of results."""
    got = {}
    for path in ("layer", "loop", "program"):
        ChainFunction.unrolled = path == "program"
        try:
            model = make()
            model.fused = path != "layer"
            got[path] = [run(model, k) for k in range(calls)]
        finally:
            ChainFunction.unrolled = True
    return got


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _bn_chain():
    torch.manual_seed(0)
    d = torch.float64
    return SpecSequential(SpecModule("linear", I=3, O=4, dtype=d),
                          SpecModule("batchnorm", C=4, dtype=d), SpecModule("tanh", dtype=d))


@pytest.mark.parametrize("change", ["hypers_dict", "parameter_order", "extra_parameter"])
def test_a_layer_changed_after_its_program_was_made_is_read_as_it_is_now(change):
    """After the kind's program exists (third call on): batch norm's hyper-parameter dict
    replaced (momentum 0.1 → 0.5), its γ deleted and set again (so ``_parameters`` holds β
    first), or a parameter the kernel never reads registered on the first layer: the layer
    path, the loop and the program give the same outputs, gradients and running statistics
    (the chain passes each layer's spec parameters by name; found by a breaker trial: the
    program read the old dict, fed β as γ, or shifted every later layer's parameters)."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def run(model, k):
        if k == 2:
            if change == "hypers_dict":
                model[1].plan.hypers = {**model[1].plan.hypers, "momentum": 0.5}
            elif change == "parameter_order":
                gamma = model[1].gamma
                del model[1].gamma
                model[1].gamma = gamma
            else:
                model[0].register_parameter("extra", torch.nn.Parameter(torch.ones(4)))
        model.zero_grad(set_to_none=True)
        out = model(x)
        gx, = torch.autograd.grad(out.sum(), x, retain_graph=True)
        out.sum().backward()
        return [out, gx, *[model[i]._parameters[n].grad for i in range(3)
                           for n in model[i]._spec_params], *model.buffers()]

    got = _three_paths(_bn_chain, run)
    assert _equal(got["layer"], got["loop"]) and _equal(got["layer"], got["program"])


def test_unrolled_false_stops_programs_already_made():
    """``ChainFunction.unrolled = False`` keeps every call on the general loop, also for a
    model whose programs were made before (they were looked up first)."""
    model = _bn_chain()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        out = model(x)
    assert _program_ran(out)
    try:
        ChainFunction.unrolled = False
        assert not _program_ran(model(x))
    finally:
        ChainFunction.unrolled = True


def test_in_place_change_of_an_output_viewed_back_is_allowed_as_layer_by_layer(tmp_path):
    """The last layer an element-wise spec that reads its size (run on the merged view): the
    chain's output is viewed back outside the Function, as ``SpecModule.forward`` does, so
    ``out.mul_(2)`` then backward works on every path with the same gradients (it raised
    "Output 0 of ChainFunction is a view ... modified inplace")."""
    spec = tmp_path / "per_size.py"
    spec.write_text(PER_SIZE_SPEC)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)

    def make():
        torch.manual_seed(0)
        return SpecSequential(SpecModule("conv2d", C=1, O=3, K=3, S=1, P=1,
                                         dtype=torch.float64),
                              SpecModule(str(spec), dtype=torch.float64))

    def run(model, k):
        out = model(x)
        assert out.shape == (2, 3, 4, 4)
        out.mul_(2)
        return [out, *torch.autograd.grad(out.sum(), [x, *model.parameters()])]

    got = _three_paths(make, run)
    assert _equal(got["layer"], got["loop"]) and _equal(got["layer"], got["program"])


def test_programs_are_bounded_and_stop_when_the_kinds_keep_changing():
    """17 kinds of call in rotation (here input strides): at most 16 programs are kept, and
    once 16 have given way no more are made (every call would otherwise run the loop and make
    one); results stay the loop's. A kind called once makes none."""
    model = _bn_chain()
    xs = [torch.randn(8, 3 * s, dtype=torch.float64)[:, ::s].requires_grad_()
          for s in range(1, 18)]
    model(xs[0])
    programs = model[0]._chain_programs
    assert not programs
    for _ in range(40):
        for x in xs:
            model(x).sum().backward()
            assert len(programs) <= programs.LIMIT
    assert programs.evicted == programs.LIMIT and programs.made == 2 * programs.LIMIT
    for x in xs:
        model(x).sum().backward()
    assert programs.made == 2 * programs.LIMIT


def test_programs_keep_no_replaced_layer_alive_and_leave_no_source_behind():
    """A program refers to its layers weakly: a layer replaced in the model is freed (and a
    program made for it no longer applies); a program's source, in ``linecache`` for
    tracebacks, goes with it."""
    import gc
    import linecache
    import weakref

    model = _bn_chain()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        model(x).sum().backward()
    (program,) = model[0]._chain_programs.values()
    name = program.forward.__code__.co_filename
    assert name in linecache.cache
    old = weakref.ref(model[2])
    model[2] = SpecModule("tanh", dtype=torch.float64)
    gc.collect()
    assert old() is None and not program.made_for(list(model))
    del program
    model[0]._chain_programs.clear()
    gc.collect()
    assert name not in linecache.cache
