"""Layers from specs (torch and NumPy backends): sizes read from inputs, train/eval forms,
sampled masks, and the two backends training the same MLP to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtool.nn import LayerError, NumpyLayer, SpecModule, build, load_model_file, mlp

RMSNORM = """\
from gradtool.lang import Spec, Sum, sqrt

spec = Spec("rmsnorm", "RMS normalisation")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
g = spec.param("g", D, init="ones")
eps = spec.hyper("eps", 1e-6)
ms = spec.let("ms", [n], Sum(X[n, k] ** 2, k) / D)
r = spec.let("r", [n], 1 / sqrt(ms[n] + eps))
spec.output("Y", [n, d], g[d] * X[n, d] * r[n])
"""


def _grads_close(ours, theirs, tol=1e-12):
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


@pytest.mark.parametrize("batch", [1, 7])
def test_torch_linear_reads_batch_from_input(batch):
    layer = SpecModule("linear", I=4, O=3, dtype=torch.float64)
    x = torch.randn(batch, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, layer.W, layer.b], g)
    x2 = x.detach().requires_grad_()
    w2, b2 = layer.W.detach().requires_grad_(), layer.b.detach().requires_grad_()
    theirs = torch.autograd.grad(F.linear(x2, w2, b2), [x2, w2, b2], g)
    _grads_close(ours, theirs)


def test_same_layer_two_feature_sizes():
    """A layer without parameters reads every size from its input (softmax over C)."""
    layer = SpecModule("softmax", dtype=torch.float64)
    for shape in ((2, 3), (5, 7)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        (ours,) = torch.autograd.grad(y, x, g)
        x2 = x.detach().requires_grad_()
        (theirs,) = torch.autograd.grad(torch.softmax(x2, 1), x2, g)
        _grads_close([ours], [theirs])


@pytest.mark.parametrize("batch", [2, 6])
def test_numpy_layernorm_reads_batch_from_input(batch):
    layer = NumpyLayer("layernorm", D=5, dtype=np.float64, rng=np.random.default_rng(0))
    layer.params["gamma"][:] = np.linspace(0.5, 1.5, 5)
    x = np.random.default_rng(batch).standard_normal((batch, 5))
    y = layer.forward(x)
    g = np.random.default_rng(9).standard_normal(y.shape)
    dx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    gamma = torch.tensor(layer.params["gamma"], requires_grad=True)
    beta = torch.tensor(layer.params["beta"], requires_grad=True)
    ref = F.layer_norm(xt, (5,), gamma, beta, 1e-5)
    assert np.allclose(y, ref.detach().numpy(), atol=1e-12)
    dxt, dg, db = torch.autograd.grad(ref, [xt, gamma, beta], torch.tensor(g))
    assert np.allclose(dx, dxt.numpy(), atol=1e-11)
    assert np.allclose(layer.grads["gamma"], dg.numpy(), atol=1e-11)
    assert np.allclose(layer.grads["beta"], db.numpy(), atol=1e-11)


def test_wrong_feature_size_is_an_error_not_a_wrong_gradient():
    layer = SpecModule("linear", I=4, O=3)
    with pytest.raises(LayerError, match="I = 5, but the layer was built with I = 4"):
        layer(torch.randn(2, 5))
    with pytest.raises(LayerError, match="read from the input"):
        SpecModule("linear", N=8, I=4, O=3)
    with pytest.raises(LayerError, match="needs the size"):
        SpecModule("linear", I=4)


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_a_kept_binding_still_refuses_a_wrong_shape(numpy_backend):
    """Bindings are kept per (mode, shapes): a wrong shape after a right one, and a right one
    after a refused one, are judged afresh; the kept one still computes F.linear's values."""
    if numpy_backend:
        layer = NumpyLayer("linear", I=4, O=3, dtype=np.float64)
        run = layer.forward
        W, b = layer.params["W"], layer.params["b"]
    else:
        layer = SpecModule("linear", I=4, O=3, dtype=torch.float64)
        def run(x):
            return layer(torch.tensor(x)).detach().numpy()
        W, b = layer.W.detach().numpy(), layer.b.detach().numpy()
    x = np.random.default_rng(0).standard_normal((2, 4))
    for _ in range(2):
        assert np.allclose(run(x), x @ W.T + b, atol=1e-12)
        with pytest.raises(LayerError, match="I = 5, but the layer was built with I = 4"):
            run(np.ones((2, 5)))
        with pytest.raises(LayerError, match="has 3 axes"):
            run(np.ones((2, 4, 1)))
    bn = _batchnorm_pair(numpy_backend)
    def bn_run(x):
        return bn.forward(x) if numpy_backend else bn(torch.tensor(x))
    bn_run(np.ones((4, 3)))
    bn.eval()
    bn_run(np.ones((1, 3)))  # a batch of one is fine at eval ...
    bn.train()
    with pytest.raises(LayerError, match="expected more than 1 value per channel"):
        bn_run(np.ones((1, 3)))  # ... and still refused in training: the mode is in the key


def test_module_hooks_fire_once_per_call_on_images():
    """relu on (N, C, H, W) runs the spec's (N, D) form without calling itself again, so a
    forward hook sees the call once, with the images' shapes."""
    layer = SpecModule("relu", dtype=torch.float64)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", args[0].shape)))
    layer.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape)))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert seen == [("pre", x.shape), ("post", x.shape)]
    assert torch.equal(y, torch.relu(x))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, (x > 0).double())


def test_a_size_no_input_carries_is_given_at_construction():
    layer = SpecModule("expand", D=3, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x[:, None].expand(4, 3))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, torch.full((4,), 3.0, dtype=torch.float64))
    assert NumpyLayer("expand", D=3).forward(np.ones(2)).shape == (2, 3)


def _batchnorm_pair(numpy: bool):
    if numpy:
        return NumpyLayer("batchnorm", C=3, dtype=np.float64, rng=np.random.default_rng(0))
    return SpecModule("batchnorm", C=3, dtype=torch.float64)


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_batchnorm_train_then_eval_matches_torch(numpy_backend):
    layer = _batchnorm_pair(numpy_backend)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rng = np.random.default_rng(1)
    for _ in range(3):  # training: batch statistics, running statistics updated
        x = rng.standard_normal((6, 3)) * 2 + 1
        ours = layer.forward(x) if numpy_backend else layer(torch.tensor(x)).detach().numpy()
        ref = F.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=0.1, eps=1e-5)
        assert np.allclose(ours, ref.numpy(), atol=1e-12)
    state = layer.state if numpy_backend else {"running_mean": layer.running_mean,
                                               "running_var": layer.running_var}
    assert np.allclose(np.asarray(state["running_mean"]), rm.numpy(), atol=1e-12)
    assert np.allclose(np.asarray(state["running_var"]), rv.numpy(), atol=1e-12)
    layer.eval()
    x = rng.standard_normal((1, 3))  # a batch of one works at eval
    ours = layer.forward(x) if numpy_backend else layer(torch.tensor(x)).detach().numpy()
    ref = F.batch_norm(torch.tensor(x), rm, rv, training=False, eps=1e-5)
    assert np.allclose(ours, ref.numpy(), atol=1e-12)
    assert np.allclose(np.asarray(state["running_mean"]), rm.numpy())  # eval updates nothing


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_batchnorm_batch_of_one_in_training_is_a_clear_error(numpy_backend):
    layer = _batchnorm_pair(numpy_backend)
    x = np.ones((1, 3))
    with pytest.raises(LayerError, match="expected more than 1 value per channel"):
        layer.forward(x) if numpy_backend else layer(torch.tensor(x))


def test_batchnorm_eval_gradient_matches_autograd():
    layer = SpecModule("batchnorm", C=4, dtype=torch.float64).eval()
    layer.running_mean.copy_(torch.randn(4))
    layer.running_var.copy_(torch.rand(4) + 0.5)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, layer.gamma, layer.beta], g)
    x2 = x.detach().requires_grad_()
    w, b = layer.gamma.detach().requires_grad_(), layer.beta.detach().requires_grad_()
    ref = F.batch_norm(x2, layer.running_mean, layer.running_var, w, b, training=False)
    _grads_close(ours, torch.autograd.grad(ref, [x2, w, b], g))


def test_dropout_samples_its_mask_in_training_and_is_identity_at_eval():
    torch.manual_seed(0)
    layer = SpecModule("dropout", p=0.25, dtype=torch.float64)
    x = torch.rand(400, 50, dtype=torch.float64) + 0.5
    x.requires_grad_()
    y = layer(x)
    kept = y.detach() != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01   # 20 000 draws: sd 0.003
    assert torch.allclose(y[kept], x[kept] / 0.75)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(dx, kept.double() / 0.75)             # the same mask in backward
    layer.eval()
    assert torch.equal(layer(x), x)
    np_layer = NumpyLayer("dropout", p=0.25, dtype=np.float64, rng=np.random.default_rng(0))
    xn = x.detach().numpy()
    yn = np_layer.forward(xn)
    assert abs((yn != 0).mean() - 0.75) < 0.01
    assert np.array_equal(np_layer.backward(np.ones_like(yn)), (yn != 0) / 0.75)
    np_layer.eval()
    assert np.array_equal(np_layer.forward(xn), xn)


def test_user_spec_in_plain_sequential_trains_with_torch_optim(tmp_path):
    """The documented example: a user's RMSNorm inside their own nn.Sequential."""
    spec = tmp_path / "rmsnorm.py"
    spec.write_text(RMSNORM)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), SpecModule(spec, D=16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[1].g.grad is not None and model[1].g.grad.abs().sum() > 0


def test_numpy_and_torch_mlp_agree_after_20_steps():
    """The same MLP in float64, same initial weights and batches, SGD with momentum and weight
    decay from torch.optim on both: the NumPy chain of generated backwards (no autograd)
    matches the torch backend to 1e-10."""
    desc = mlp(12, 4, hidden=(10, 8), norm="batchnorm", activation="tanh")
    tmodel, tloss = build(desc, "torch", dtype="float64", seed=3)
    nmodel, nloss = build(desc, "numpy", dtype="float64", seed=3)
    for k, v in tmodel.state_dict().items():
        assert np.array_equal(nmodel.state_dict()[k].numpy(), v.numpy())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
            for m in (tmodel, nmodel)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal((8, 3, 4))
        y = rng.integers(0, 4, 8)
        loss = tloss(tmodel(torch.tensor(x)), torch.tensor(y))
        opts[0].zero_grad()
        loss.backward()
        opts[0].step()
        nloss.forward(nmodel.forward(x), y)
        nmodel.backward(nloss.backward())
        nmodel.attach_grads()
        opts[1].step()
    ts, ns = tmodel.state_dict(), nmodel.state_dict()
    assert set(ts) == set(ns)
    for k in ts:
        assert np.allclose(ns[k].numpy(), ts[k].numpy(), rtol=0, atol=1e-10), k


def test_model_file_with_a_user_spec(tmp_path):
    (tmp_path / "rmsnorm.py").write_text(RMSNORM)
    (tmp_path / "model.toml").write_text(
        '[[layers]]\nflatten = true\n\n[[layers]]\nspec = "linear"\nI = 6\nO = 5\n\n'
        '[[layers]]\nspec = "rmsnorm.py"\nD = 5\neps = 1e-5\n\n[[layers]]\nspec = "relu"\n')
    desc = load_model_file(tmp_path / "model.toml")
    assert desc.layers[2].spec == str((tmp_path / "rmsnorm.py").resolve())
    model, _ = build(desc, "torch", seed=0)
    assert model(torch.randn(3, 2, 3)).shape == (3, 5)
    assert model[2].plan.hypers["eps"] == 1e-5


@pytest.mark.parametrize("loss", ["softmax_cross_entropy_labels", "softmax_cross_entropy"])
def test_losses_take_integer_labels(loss):
    """Labels reach a labels spec as int64 and a soft-target spec as one-hot rows; both give
    F.cross_entropy's value and gradient, on both backends."""
    from gradtool.nn import LossModule, NumpyLoss

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    ours = LossModule(loss)(x, y)
    (dx,) = torch.autograd.grad(ours, x)
    x2 = x.detach().requires_grad_()
    ref = F.cross_entropy(x2, y)
    (dref,) = torch.autograd.grad(ref, x2)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(dx, dref, atol=1e-12)
    np_loss = NumpyLoss(loss, dtype=np.float64)
    assert np.isclose(np_loss.forward(x.detach().numpy(), y.numpy()), ref.item(), atol=1e-12)
    assert np.allclose(np_loss.backward(), dref.numpy(), atol=1e-12)


@pytest.mark.parametrize("line, message", [
    ('spec.eval_output("Z", [n, d], X[n, d])', "names no output"),
    ('spec.eval_output("Y", [n], X[n, 0])', "indexed over"),
    ('M = spec.mask("M", N, D, keep=1 / N)', "uses `N`, which is not a hyper-parameter"),
])
def test_eval_form_and_mask_errors_name_the_line(tmp_path, line, message):
    from gradtool.errors import SpecError
    from gradtool.spec.loader import load_spec

    path = tmp_path / "bad.py"
    path.write_text('from gradtool.lang import Spec\n\nspec = Spec("bad")\n'
                    'N, D = spec.dims("N D")\nn, d = spec.indices(n=N, d=D)\n'
                    'X = spec.input("X", N, D)\n'
                    'spec.output("Y", [n, d], 2 * X[n, d])\n' + line + "\n")
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert err.value.line == 8 and err.value.file == str(path)


def _specs_with_eval_forms():
    from gradtool.spec.loader import builtin_specs, load_spec

    return [name for name, path in builtin_specs().items() if load_spec(path).eval_statements]


@pytest.mark.parametrize("name", _specs_with_eval_forms())
def test_eval_forms_pass_every_oracle(name):
    """Each built-in eval form is derived, generated and checked like a spec: finite
    differences, torch.autograd, its eval reference (F.batch_norm(training=False), ...),
    NumPy against torch kernels."""
    from gradtool.check.runner import check_spec
    from gradtool.spec.loader import load_spec

    form = load_spec(name).eval_form()
    rows = check_spec(form)
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert any(r.oracle == "reference" for r in rows)


def test_a_whole_model_pickles_and_loads_with_its_state(tmp_path):
    """``torch.save(model)`` of a built CNN (after chained steps, with a hyper-parameter
    changed) and of a user's spec layer: the loaded model has the same parameters, running
    statistics and hyper-parameters, and its next step gives the same outputs and gradients
    bit for bit (float64) as the original's; the spec is named (built-in by name, a file by
    path) and loaded again, not pickled."""
    import io

    from gradtool.nn import cnn

    model, loss_fn = build(cnn((1, 8, 8), 10, widths=(4,), dropout=0.2), "torch",
                           dtype="float64", seed=0)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    for _ in range(2):
        loss_fn(model(x), y).backward()
    model[1].plan.hypers["momentum"] = 0.3
    spec = tmp_path / "rmsnorm.py"
    spec.write_text(RMSNORM)
    user = SpecModule(spec, D=6, dtype=torch.float64, eps=1e-4)
    buffer = io.BytesIO()
    torch.save((model, loss_fn, user), buffer)
    buffer.seek(0)
    model2, loss_fn2, user2 = torch.load(buffer, weights_only=False)
    assert model2[1].plan.hypers["momentum"] == 0.3 and user2.plan.hypers["eps"] == 1e-4
    assert str(user2.spec.file) == str(spec.resolve())
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model.zero_grad(set_to_none=True)
    outs = []
    for m, lf in ((model, loss_fn), (model2, loss_fn2)):
        torch.manual_seed(3)  # the same dropout masks
        out = m(x)
        lf(out, y).backward()
        outs.append((out, [p.grad for p in m.parameters()], list(m.buffers())))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1] + outs[0][2], outs[1][1] + outs[1][2], strict=True):
        assert torch.equal(a, b)
    z = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(user(z), user2(z))


def test_a_layer_of_an_in_memory_spec_refuses_to_pickle_with_what_to_do():
    import io

    ns: dict = {}
    exec(RMSNORM, ns)
    layer = SpecModule(ns["spec"], D=4)
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(layer, io.BytesIO())


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_dropout_p_changed_after_calls_changes_the_masks_too(backend):
    """dropout's p set through ``plan.hypers`` after calls (0.5 → 0.9): the masks keep each
    unit with probability 0.1 and the kept ones are scaled by 10, so E[Y] = X still (the keep
    probability was computed once at construction while the scale read p at each call:
    about half the units kept, E[Y] ≈ 5·X; found by a breaker trial)."""
    layer = SpecModule("dropout", p=0.5) if backend == "torch" else NumpyLayer("dropout", p=0.5)
    x = np.ones((200, 100), dtype=np.float32)
    run = (lambda: layer(torch.from_numpy(x)).numpy()) if backend == "torch" else \
        (lambda: layer.forward(x))
    torch.manual_seed(0)
    run()
    layer.plan.hypers["p"] = 0.9
    y = run()
    kept = (y != 0).mean()
    assert abs(kept - 0.1) < 0.01, kept          # 20,000 draws: σ ≈ 0.002
    assert np.allclose(y[y != 0], 10.0)
    assert abs(y.mean() - 1.0) < 0.1


def test_a_pickled_model_whose_spec_file_changed_refuses_to_load(tmp_path):
    """The pickle records its spec file's sha256: after the file is edited, ``torch.load``
    raises a LayerError naming the file (the weights were trained for the spec as it was;
    the edited spec would compute something else with them, silently: found by a newcomer
    trial), and loads again once the file is put back."""
    import io

    from gradtool.nn import LayerError

    spec = tmp_path / "rmsnorm.py"
    spec.write_text(RMSNORM)
    buffer = io.BytesIO()
    torch.save(SpecModule(spec, D=6), buffer)
    spec.write_text(RMSNORM.replace("** 2, k) / D", "** 2, k) / (2 * D)"))
    buffer.seek(0)
    with pytest.raises(LayerError, match="changed since the model was saved") as info:
        torch.load(buffer, weights_only=False)
    assert str(spec) in str(info.value)
    spec.write_text(RMSNORM)
    buffer.seek(0)
    assert isinstance(torch.load(buffer, weights_only=False), SpecModule)


def test_hyper_parameters_read_and_set_as_attributes_like_torch_nn():
    """``dropout.p = 0.9`` and ``bn.momentum = 0.5`` take effect at the next call, as on
    torch.nn's layers (they made a plain attribute nothing read: 30 % still dropped, found by a
    newcomer trial); a value outside the declared domain is refused at the assignment, not met
    as a ZeroDivisionError in forward."""
    from gradtool.spec.lang import SpecError

    drop = SpecModule("dropout", p=0.3)
    assert drop.p == 0.3
    drop.p = 0.9
    assert drop.plan.hypers["p"] == 0.9 and "p=0.9" in repr(drop)
    torch.manual_seed(0)
    kept = (drop(torch.ones(200, 100)) != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.01
    with pytest.raises(SpecError, match="p"):
        drop.p = 1.0
    assert drop.p == 0.9
    bn = SpecModule("batchnorm", C=3, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3, momentum=0.5).double()
    bn.momentum = 0.5
    x = torch.randn(8, 3, dtype=torch.float64)
    bn(x)
    ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-14)


def test_a_misspelt_spec_in_a_model_file_names_the_file_the_layer_and_the_close_names(tmp_path):
    from gradtool.nn.models import ModelError

    path = tmp_path / "m.toml"
    path.write_text('[[layers]]\nflatten = true\n[[layers]]\nspec = "lienar"\nI = 64\nO = 10\n')
    with pytest.raises(ModelError, match="layer 2: no built-in spec named `lienar`") as info:
        load_model_file(path)
    assert info.value.file == str(path) and "linear" in info.value.hint
    path.write_text('loss = "softmax_xent"\n[[layers]]\nspec = "linear"\nI = 64\nO = 10\n')
    with pytest.raises(ModelError, match="loss: no built-in spec"):
        load_model_file(path)
