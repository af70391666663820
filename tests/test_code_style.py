"""Generated code reads like a course solution (issue 12, item 7): it passes the project's
own ruff rules, writes plain contractions and means as people do, names its classes as
people do, and its layer classes take their sizes by position as course code does."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradtool.codegen.cache import compile_spec
from gradtool.codegen.emit import class_name, generate
from gradtool.errors import SpecError
from gradtool.spec.loader import builtin_specs, load_spec

SPECS = sorted(builtin_specs())
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))
    for name in [m for m in sys.modules if m.startswith("gradtool_kernels.")]:
        del sys.modules[name]


def _ruff() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.importorskip("ruff")
    return [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("name", SPECS)
def test_generated_sources_pass_the_projects_ruff_rules(name, tmp_path):
    """The project's rules (pyproject.toml: pycodestyle, pyflakes with F841 unused names,
    isort, bugbear, pyupgrade, naming; lines of 100) hold for both targets."""
    files = []
    for target in ("numpy", "torch"):
        path = tmp_path / f"{name}_{target}.py"
        path.write_text(generate(name, target))
        files.append(str(path))
    run = subprocess.run([*_ruff(), "check", "--no-cache", "--config",
                          str(ROOT / "pyproject.toml"), "--output-format", "concise", *files],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_gathers_long_index_breaks_inside_its_subscript(tmp_path):
    """A read whose index alone is longer than a line (a flipped window gathered with integer
    arrays, found by the fuzz property) breaks inside the subscript, where nothing else can
    break, and passes ruff; the kernel still agrees with torch.autograd."""
    from gradtool.check.runner import CheckOptions, check_spec
    from gradtool.spec.loader import load_spec

    path = tmp_path / "flipped.py"
    path.write_text(
        "from gradtool.lang import *\n\n"
        'spec = Spec("flipped", "a strided window read backwards")\n'
        'N, T, K, S = spec.dims("N T K S")\n'
        "n, t, k = spec.indices(n=N, t=T, k=K)\n"
        'X = spec.input("X", N, (T - 1) * S + K)\n'
        'W = spec.param("W", K)\n'
        'spec.output("Y", [n, t], Sum(W[k] * X[n, t * S + K - 1 - k], k))\n')
    files = []
    for target in ("numpy", "torch"):
        out = tmp_path / f"flipped_{target}.py"
        out.write_text(generate(str(path), target))
        assert max(len(line) for line in out.read_text().splitlines()) <= 100
        files.append(str(out))
    run = subprocess.run([*_ruff(), "check", "--no-cache", "--config",
                          str(ROOT / "pyproject.toml"), "--output-format", "concise", *files],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = check_spec(load_spec(str(path)), CheckOptions(cases=1, oracles=("autograd",
                                                                              "backends")))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_plain_linear_contraction_reads_x_at_w_transposed_plus_b():
    assert "    Y = X @ W.T + b\n" in generate("linear", "numpy")
    assert "    Y = torch.addmm(b, X, W.T)\n" in generate("linear", "torch")


def test_a_sum_over_its_count_is_a_mean():
    source = generate("layernorm", "numpy")
    assert "    mu = X.mean(1)\n" in source and "    var = (xc ** 2).mean(1)\n" in source
    assert "    Y = gamma * xhat + beta\n" in source
    assert "    mu = X.mean(0)\n" in generate("batchnorm", "torch")


CENTER = '''\
from gradtool.lang import Spec, Sum

spec = Spec("center", "Scaled rows minus their mean: Y = s·X − mean_d X")
N, D = spec.dims("N D")
n, d, e = spec.indices(n=N, d=D, e=D)
X = spec.input("X", N, D)
s = spec.param("s", D, init="ones")
spec.output("Y", [n, d], s[d] * X[n, d] - Sum(X[n, e], e) / D)
'''


def test_a_mean_broadcast_back_keeps_its_axis_and_agrees_with_autograd(tmp_path):
    from gradtool.check.runner import CheckOptions, check_spec

    path = tmp_path / "center.py"
    path.write_text(CENTER)
    spec = load_spec(path)
    # dX = s·G − mean_d G, broadcast back over d
    assert "dX = s * G - G.mean(1, keepdims=True)" in generate(spec, "numpy")
    assert "G.mean(1, keepdim=True)" in generate(spec, "torch")
    rows = check_spec(spec, CheckOptions(cases=1, oracles=("fd", "autograd", "backends")))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    # the NumPy class against torch.autograd in float64
    mod = compile_spec(spec, "numpy")
    layer = mod.Center(5, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((3, 5))
    g = np.random.default_rng(2).standard_normal((3, 5))
    layer.params["s"] = np.random.default_rng(3).standard_normal(5)
    y = layer.forward(x)
    dx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(layer.params["s"], requires_grad=True)
    yt = st * xt - xt.mean(1, keepdim=True)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["s"], st.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name, expected", [
    ("linear", "Linear"), ("relu", "ReLU"), ("layernorm", "LayerNorm"),
    ("batchnorm", "BatchNorm1d"), ("batchnorm2d", "BatchNorm2d"), ("conv2d", "Conv2d"),
    ("maxpool2d", "MaxPool2d"), ("avgpool2d", "AvgPool2d"), ("softmax", "Softmax")])
def test_built_in_classes_are_named_as_people_write_them(name, expected):
    assert class_name(load_spec(name)) == expected
    assert f"\nclass {expected}:\n" in generate(name, "numpy")
    torch_source = generate(name, "torch")
    assert f"\nclass {expected}Function(torch.autograd.Function):\n" in torch_source
    assert f"\nclass {expected}(torch.nn.Module):\n" in torch_source


def test_every_built_in_states_its_class_name():
    assert all(load_spec(name).class_name for name in SPECS)


def test_a_spec_without_a_class_name_is_camel_cased(tmp_path):
    path = tmp_path / "my_layer.py"
    path.write_text(CENTER.replace('Spec("center"', 'Spec("my_scaled_center"'))
    spec = load_spec(path)
    assert class_name(spec) == "MyScaledCenter"
    assert "\nclass MyScaledCenter:\n" in generate(spec, "numpy")


def test_a_stated_class_name_names_the_class_the_cache_and_nn_use(tmp_path):
    from gradtool.nn import SpecModule

    path = tmp_path / "center.py"
    path.write_text(CENTER.replace(
        '"Scaled rows minus their mean: Y = s·X − mean_d X")',
        '"Scaled rows minus their mean", class_name="Centering")'))
    spec = load_spec(path)
    assert spec.class_name == "Centering"
    assert hasattr(compile_spec(spec, "numpy"), "Centering")
    assert hasattr(compile_spec(spec, "torch"), "CenteringFunction")
    layer = SpecModule(spec, D=4).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (layer.s * xr - xr.mean(1, keepdim=True)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_a_class_name_that_is_no_identifier_is_refused_with_its_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(CENTER.replace('Spec("center", "Scaled rows minus their mean: Y = s·X − '
                                   'mean_d X")',
                                   'Spec("center", "rows", class_name="Layer Norm")'))
    with pytest.raises(SpecError, match="class name") as err:
        load_spec(path)
    assert err.value.line == 3
    path.write_text(CENTER.replace('Spec("center", "Scaled rows minus their mean: Y = s·X − '
                                   'mean_d X")',
                                   'Spec("center", "rows", class_name="forward")'))
    with pytest.raises(SpecError, match="uses for itself"):
        load_spec(path)
    assert class_name("none") == "NoneLayer" and class_name("my_mlp") == "MyMlp"


def test_constructor_takes_sizes_by_position_in_the_specs_order():
    numpy_linear = compile_spec("linear", "numpy").Linear(784, 256, rng=np.random.default_rng(0))
    assert numpy_linear.params["W"].shape == (256, 784)
    torch_linear = compile_spec("linear", "torch").Linear(784, 256)
    assert torch_linear.W.shape == (256, 784)
    assert compile_spec("linear", "torch").Linear(O=256, I=784).W.shape == (256, 784)
    conv = compile_spec("conv2d", "torch").Conv2d(3, 8, 5, 1, 2)  # C, O, K, S, P as torch's
    assert conv.weight.shape == (8, 3, 5, 5) and (conv.S, conv.P) == (1, 2)
    bn = compile_spec("batchnorm", "numpy").BatchNorm1d(4, 1e-3)  # num_features, eps
    assert bn.eps == 1e-3 and bn.params["gamma"].shape == (4,)


def test_numpy_grads_start_as_zeros_of_each_parameters_shape():
    layer = compile_spec("layernorm", "numpy").LayerNorm(6)
    assert set(layer.grads) == {"gamma", "beta"}
    for name, g in layer.grads.items():
        assert g.shape == layer.params[name].shape and not g.any()
