"""CNN layers and models: batchnorm2d and global_avgpool against torch in values and
gradients (float64), element-wise specs on images, one conv layer on two image sizes, the
shipped model files, ``--model cnn`` on digits, and one training step of the CIFAR-10 ConvNet
on generated python-batch files against the same network in plain torch.nn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.data import load_dataset
from gradtool.model_files import shipped_models
from gradtool.nn import (
    LayerError,
    ModelError,
    NumpyLayer,
    SpecModule,
    build,
    cnn,
    load_model_file,
)
from tests.helpers import PER_SIZE_SPEC
from tests.test_data import _cifar_folder

TOL = 1e-11


def _layer(name, numpy_backend, **options):
    if numpy_backend:
        return NumpyLayer(name, dtype=np.float64, rng=np.random.default_rng(0), **options)
    return SpecModule(name, dtype=torch.float64, **options)


def _run(layer, x: np.ndarray, g: np.ndarray, numpy_backend: bool):
    """Output and ∂L/∂X of ``layer`` at ``x`` for the upstream gradient ``g``; parameters'
    gradients by name."""
    if numpy_backend:
        y = layer.forward(x)
        dx = layer.backward(g)
        return y, dx, dict(layer.grads)
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(y, [xt, *params.values()], torch.tensor(g))
    return (y.detach().numpy(), grads[0].numpy(),
            {k: v.numpy() for k, v in zip(params, grads[1:], strict=True)})


def _close(ours, theirs, tol=TOL):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert np.allclose(ours, theirs, rtol=tol, atol=tol), np.abs(ours - theirs).max()


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_batchnorm2d_train_and_eval_match_torch_in_values_and_gradients(numpy_backend):
    layer = _layer("batchnorm2d", numpy_backend, C=3)
    gamma, beta = np.array([0.5, 1.5, -2.0]), np.array([0.1, -0.3, 0.7])
    params = layer.params if numpy_backend else {"gamma": layer.gamma.data,
                                                 "beta": layer.beta.data}
    params["gamma"][...] = torch.tensor(gamma) if not numpy_backend else gamma
    params["beta"][...] = torch.tensor(beta) if not numpy_backend else beta
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rng = np.random.default_rng(3)
    # training: statistics over N, H, W; one image of 2×3 is enough, as for nn.BatchNorm2d
    for shape in ((4, 3, 5, 2), (2, 3, 3, 3), (1, 3, 2, 3)):
        x = rng.standard_normal(shape) * 2 + 1
        g = rng.standard_normal(shape)
        y, dx, grads = _run(layer, x, g, numpy_backend)
        xt = torch.tensor(x, requires_grad=True)
        gt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
        ref = F.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, eps=1e-5)
        rdx, rdg, rdb = torch.autograd.grad(ref, [xt, gt, bt], torch.tensor(g))
        _close(y, ref.detach())
        _close(dx, rdx)
        _close(grads["gamma"], rdg)
        _close(grads["beta"], rdb)
    state = layer.state if numpy_backend else {"running_mean": layer.running_mean,
                                               "running_var": layer.running_var}
    _close(state["running_mean"], rm)  # running_var with the unbiased variance, as torch
    _close(state["running_var"], rv)
    layer.eval()
    x = rng.standard_normal((1, 3, 4, 4))  # a batch of one works at eval
    g = rng.standard_normal(x.shape)
    y, dx, grads = _run(layer, x, g, numpy_backend)
    xt = torch.tensor(x, requires_grad=True)
    gt, bt = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    ref = F.batch_norm(xt, rm, rv, gt, bt, training=False, eps=1e-5)
    rdx, rdg, rdb = torch.autograd.grad(ref, [xt, gt, bt], torch.tensor(g))
    _close(y, ref.detach())
    _close(dx, rdx)
    _close(grads["gamma"], rdg)
    _close(grads["beta"], rdb)
    _close(state["running_mean"], rm)  # eval updates nothing


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_batchnorm2d_refuses_a_wrong_channel_count_and_one_value_per_channel_in_training(
        numpy_backend):
    """Training needs N·H·W ≥ 2 values per channel (the unbiased running variance divides by
    N·H·W − 1), as nn.BatchNorm2d: one 1×1 image is refused with the fix, one 5×5 image trains
    and the eval form takes the 1×1 image."""
    layer = _layer("batchnorm2d", numpy_backend, C=3)
    run = layer.forward if numpy_backend else (lambda x: layer(torch.tensor(x)))
    with pytest.raises(LayerError, match="C = 4, but the layer was built with C = 3"):
        run(np.ones((2, 4, 5, 5)))
    with pytest.raises(LayerError, match=r"in training mode needs H\*N\*W >= 2, got N = 1, "
                                         r"H = 1, W = 1 .*call model.eval\(\)"):
        run(np.ones((1, 3, 1, 1)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(3)(torch.ones(1, 3, 1, 1))  # torch refuses the same
    run(np.ones((1, 3, 5, 5)))
    layer.eval()
    run(np.ones((1, 3, 1, 1)))


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_global_avgpool_is_the_mean_over_h_and_w(numpy_backend):
    layer = _layer("global_avgpool", numpy_backend)
    rng = np.random.default_rng(4)
    for shape in ((2, 3, 5, 4), (3, 2, 7, 7)):  # one layer, any image size
        x, g = rng.standard_normal(shape), rng.standard_normal(shape[:2])
        y, dx, _ = _run(layer, x, g, numpy_backend)
        xt = torch.tensor(x, requires_grad=True)
        ref = xt.mean((2, 3))
        (rdx,) = torch.autograd.grad(ref, xt, torch.tensor(g))
        _close(y, ref.detach())
        _close(dx, rdx)


@pytest.mark.parametrize("numpy_backend", [False, True])
@pytest.mark.parametrize("name, oracle", [("relu", F.relu), ("tanh", torch.tanh)])
def test_element_wise_specs_take_images(numpy_backend, name, oracle):
    """relu is declared over X[N, D]; on (N, C, H, W) it merges C, H, W into D."""
    layer = _layer(name, numpy_backend)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5))
    g = rng.standard_normal(x.shape)
    y, dx, _ = _run(layer, x, g, numpy_backend)
    xt = torch.tensor(x, requires_grad=True)
    ref = oracle(xt)
    (rdx,) = torch.autograd.grad(ref, xt, torch.tensor(g))
    _close(y, ref.detach())
    _close(dx, rdx)


def test_dropout_on_images_keeps_the_shape_and_masks_the_gradient_alike():
    layer = NumpyLayer("dropout", p=0.5, dtype=np.float64, rng=np.random.default_rng(0))
    x = np.random.default_rng(6).standard_normal((4, 2, 3, 3)) + 5  # no zeros in x
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.shape == dx.shape == x.shape
    assert np.array_equal(y == 0, dx == 0) and 0 < (y == 0).mean() < 1
    _close(dx[y != 0], np.full((y != 0).sum(), 2.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_size_free_element_wise_kernels_run_on_images_as_they_are(dtype):
    """relu, tanh and div read no size, so the torch layer calls its Function on the
    (N, C, H, W) arrays themselves (its output's node is the Function's, not a view's), with
    the values and gradients of the oracle; an input that asks for no gradient gets none."""
    rng = np.random.default_rng(11)
    x, z = rng.standard_normal((2, 3, 4, 5)), rng.uniform(0.5, 2, (2, 3, 4, 5))
    g = torch.tensor(rng.standard_normal(x.shape), dtype=dtype)
    tol = TOL if dtype == torch.float64 else 1e-6
    for name, inputs, oracle, wants in (("relu", [x], F.relu, [True]),
                                        ("tanh", [x], torch.tanh, [True]),
                                        ("div", [x, z], torch.div, [True, True]),
                                        ("div", [x, z], torch.div, [False, True])):
        layer = SpecModule(name, dtype=dtype)
        ours = [torch.tensor(a, dtype=dtype, requires_grad=w) for a, w in zip(inputs, wants)]
        theirs = [torch.tensor(a, dtype=dtype, requires_grad=w) for a, w in zip(inputs, wants)]
        y, ref = layer(*ours), oracle(*theirs)
        assert y.grad_fn.name().endswith("FunctionBackward"), y.grad_fn.name()
        got = torch.autograd.grad(y, [a for a in ours if a.requires_grad], g)
        expect = torch.autograd.grad(ref, [a for a in theirs if a.requires_grad], g)
        _close(y.detach(), ref.detach(), tol)
        for a, b in zip(got, expect, strict=True):
            _close(a, b, tol)


def test_an_element_wise_spec_that_reads_a_size_merges_trailing_axes(tmp_path):
    """Y[n, d] = X[n, d] / D reads the size D, so on (N, C, H, W) the layer still runs its
    kernel on the (N, C·H·W) view, where D = C·H·W."""
    spec = tmp_path / "per_size.py"
    spec.write_text(PER_SIZE_SPEC)
    layer = SpecModule(str(spec), dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, g)
    _close(y.detach(), x.detach() / 60)
    _close(dx, g / 60)


def test_torch_dropout_on_images_draws_the_mask_of_the_merged_view():
    """Dropout reads no size: on (N, C, H, W) the mask is drawn in the images' shape, the
    same values, in the same order, as for the (N, C·H·W) view, and masks the gradient."""
    layer = SpecModule("dropout", p=0.5, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64) + 5  # no zeros in x
    torch.manual_seed(3)
    flat = layer(x.reshape(4, -1))
    torch.manual_seed(3)
    xt = x.clone().requires_grad_()
    y = layer(xt)
    (dx,) = torch.autograd.grad(y, xt, torch.ones_like(y))
    assert y.shape == dx.shape == x.shape
    _close(y.detach().reshape(4, -1), flat)
    assert torch.equal(y == 0, dx == 0) and 0 < (y == 0).double().mean() < 1
    _close(dx[y != 0], torch.full(((y != 0).sum(),), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_one_conv_layer_serves_two_image_sizes(numpy_backend):
    """Built from C, O, K, S, P only; OH, OW follow from each input."""
    layer = _layer("conv2d", numpy_backend, C=2, O=3, K=3, S=2, P=1)
    params = layer.params if numpy_backend else {k: v.detach().numpy()
                                                 for k, v in layer.named_parameters()}
    rng = np.random.default_rng(7)
    for hw in ((7, 7), (8, 5)):
        x = rng.standard_normal((2, 2, *hw))
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(params["weight"], requires_grad=True)
        bt = torch.tensor(params["bias"], requires_grad=True)
        ref = F.conv2d(xt, wt, bt, stride=2, padding=1)
        g = rng.standard_normal(tuple(ref.shape))
        y, dx, grads = _run(layer, x, g, numpy_backend)
        rdx, rdw, rdb = torch.autograd.grad(ref, [xt, wt, bt], torch.tensor(g))
        _close(y, ref.detach())
        _close(dx, rdx)
        _close(grads["weight"], rdw)
        _close(grads["bias"], rdb)


def test_cnn_model_suits_digits_and_mnist_sizes_and_refuses_flat_data():
    desc = cnn((1, 8, 8), 10)
    model, _ = build(desc, "torch", seed=0)
    for hw in (8, 28):
        assert model(torch.randn(2, 1, hw, hw)).shape == (2, 10)
    assert [e.spec for e in desc.layers][:4] == ["conv2d", "batchnorm2d", "relu", "maxpool2d"]
    with pytest.raises(ModelError, match="needs images"):
        cnn((64,), 10)


def test_shipped_model_files_load_by_name_and_fit_their_images():
    assert {"vu-mnist-cnn", "uva-cifar10-convnet"} <= set(shipped_models())
    vu = load_model_file("vu-mnist-cnn")
    widths = [e.options["O"] for e in vu.layers if e.spec == "conv2d"]
    assert widths == [32, 64, 128] and vu.layers[0].spec == "batchnorm2d"
    assert [e.options["p"] for e in vu.layers if e.spec == "dropout"] == [0.3, 0.3]
    # weights start as nn.Conv2d's and nn.Linear's (±1/√fan_in), as in the course
    assert all(e.options.get("init") in ({"weight": "uniform"}, {"W": "uniform"})
               for e in vu.layers if e.spec in ("conv2d", "linear"))
    model, _ = build(vu, "torch", seed=0)
    assert model.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    uva = load_model_file("uva-cifar10-convnet")
    widths = [e.options["O"] for e in uva.layers if e.spec == "conv2d"]
    assert widths == [64, 128, 256, 256, 512, 512, 512, 512]
    pools = [e.options for e in uva.layers if e.spec == "maxpool2d"]
    assert pools == [{"K": 3, "S": 2, "P": 1}] * 5
    with pytest.raises(ModelError, match="vu-mnist-cnn"):
        load_model_file("no-such-model")


def _plain(desc):
    from bench.bench_cnn import copy_weights, plain_model

    model, loss = build(desc, "torch", dtype="float64", seed=0)
    plain = plain_model(desc).double()
    copy_weights(model, plain)
    return model, loss, plain


def test_cifar10_convnet_one_training_step_on_generated_batches(tmp_path):
    """The UvA ConvNet on 2 images read from python-batch files: the loss and every
    parameter's gradient equal those of the same network in plain torch.nn."""
    _cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=2, n_test=2)
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.0, limit=2)
    assert ds.train.x.shape == (2, 3, 32, 32)
    x, y = torch.tensor(ds.train.x, dtype=torch.float64), torch.tensor(ds.train.y)
    model, loss_fn, plain = _plain(load_model_file("uva-cifar10-convnet"))
    loss = loss_fn(model(x), y)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    ref = F.cross_entropy(plain(x), y)
    theirs = torch.autograd.grad(ref, list(plain.parameters()))
    _close(loss.detach(), ref.detach(), 1e-10)
    for a, b in zip(ours, theirs, strict=True):
        _close(a, b, 1e-8)
    for net, grads in ((model, ours), (plain, theirs)):  # one SGD step on each
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g
        torch.optim.SGD(net.parameters(), lr=0.1).step()
    _close(loss_fn(model(x), y).detach(), F.cross_entropy(plain(x), y).detach(), 1e-9)
    # the running statistics moved alike (two training forwards each)
    for a, b in zip(model.buffers(), [t for n, t in plain.named_buffers()
                                      if "num_batches" not in n], strict=True):
        _close(a, b, 1e-9)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_model_cnn_trains_on_digits(tmp_path, backend):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", "cnn", "--backend", backend,
                                      "--limit", "96", "--epochs", "1", "--batch-size", "32",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 0 <= data["test_acc"] <= 1 and len(data["history"]) == 1
    record = json.loads((out / "config.json").read_text())
    assert [e.get("spec") for e in record["model"]["layers"]][-2:] == ["global_avgpool",
                                                                        "linear"]


@pytest.mark.parametrize("numpy_backend", [False, True])
def test_init_option_replaces_the_specs_initialisation(numpy_backend):
    """conv2d's spec says kaiming_uniform, ±√(6/fan_in); init={"weight": "uniform"} gives
    nn.Conv2d's ±1/√fan_in (fan_in = C·K·K = 36 here); bias keeps the spec's zeros."""
    torch.manual_seed(0)
    layer = _layer("conv2d", numpy_backend, C=4, O=50, K=3, S=1, P=1,
                   init={"weight": "uniform"})
    params = layer.params if numpy_backend else {k: v.detach().numpy()
                                                 for k, v in layer.named_parameters()}
    w = np.abs(params["weight"])
    assert w.max() <= 1 / 6 and w.max() > 0.9 / 6
    assert not params["bias"].any()
    with pytest.raises(LayerError, match="no parameter `W`.*bias, weight"):
        _layer("conv2d", numpy_backend, C=4, O=5, K=3, S=1, P=1, init={"W": "uniform"})
    with pytest.raises(LayerError, match="unknown init 'he'"):
        _layer("conv2d", numpy_backend, C=4, O=5, K=3, S=1, P=1, init={"weight": "he"})


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_model_for_other_images_fails_before_training_at_the_layer_that_refuses(backend):
    """vu-mnist-cnn's first linear takes 128·3·3 features from 28×28 images; 8×8 digits
    give it 128."""
    from gradtool.nn.models import check_input

    desc = load_model_file("vu-mnist-cnn")
    model, _ = build(desc, backend, seed=0)
    check_input(model, desc, (1, 28, 28))
    assert model.training
    with pytest.raises(ModelError, match=r"layer 12 \(linear\) cannot take the samples of "
                                         r"shape \(128,\) .* data of shape \(1, 8, 8\)"):
        check_input(model, desc, (1, 8, 8))
    assert model.training  # the mode is restored
