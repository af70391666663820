"""A hyper-parameter is only as positive as its spec declares (``spec.hyper(..., domain=...)``),
and a value given at run time outside that domain is refused where it is given.

Before domains, a positive default made the symbol positive, so ``Abs(a)`` and ``sqrt(a**2)``
became ``a`` and a layer built with ``a = -0.5`` computed ``a·X`` instead of ``|a|·X``, silently,
on every backend and in every check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtool.check.impl import make_subject
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.errors import SpecError
from gradtool.nn import LayerError, NumpyLayer, SpecModule
from gradtool.spec.loader import builtin_specs, load_spec

# |a| written two ways; the default is positive, the spec states nothing about a's sign
ABS_HYPER = """\
from gradtool.lang import Spec, sqrt, Abs
spec = Spec("abs_hyper", "uses |a| of a hyper-parameter whose default is positive")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
a = spec.hyper("a", 0.5{domain})
spec.output("Y", [n, d], Abs(a) * X[n, d] + sqrt(a ** 2) * X[n, d] ** 2)
"""

LAYERS = """\
import numpy as np


class AbsHyper:
    def __init__(self, a=-0.5):
        self.a = a

    def forward(self, X):
        self.X = X
        return abs(self.a) * X + abs(self.a) * X ** 2

    def backward(self, G):
        return G * (abs(self.a) + 2 * abs(self.a) * self.X)


class SignedHyper(AbsHyper):
    \"\"\"wrong for a < 0: a where the spec says |a|\"\"\"

    def forward(self, X):
        self.X = X
        return self.a * X + self.a * X ** 2

    def backward(self, G):
        return G * (self.a + 2 * self.a * self.X)


class NegativeEps:
    def __init__(self, D, eps=-1e-5):
        self.eps = eps
        self.gamma, self.beta = np.ones(D), np.zeros(D)

    def forward(self, X):
        return X

    def backward(self, G):
        return G
"""


def _spec(tmp_path, domain=""):
    path = tmp_path / "abs_hyper.py"
    path.write_text(ABS_HYPER.format(domain=domain))
    return path


def _oracle(x: torch.Tensor, a: float):
    """|a|·X + |a|·X² and its gradient by torch.autograd (float64)."""
    x = x.detach().clone().requires_grad_(True)
    y = abs(a) * x + abs(a) * x ** 2
    return y, x


@pytest.mark.parametrize("a", [-0.5, 0.5, -2.0])
def test_a_real_hyper_parameter_keeps_its_absolute_value(tmp_path, a):
    path = _spec(tmp_path)
    spec = load_spec(path)
    assert spec.hypers["a"].symbol.is_positive is None
    x = torch.tensor([[1.0, -2.0, 0.3], [0.7, 2.5, -1.1]], dtype=torch.float64)
    g = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, leaf = _oracle(x, a)
    (want_dx,) = torch.autograd.grad(want, leaf, g)

    layer = SpecModule(spec, a=a, dtype=torch.float64)
    xin = x.clone().requires_grad_(True)
    y = layer(xin)
    (dx,) = torch.autograd.grad(y, xin, g)
    torch.testing.assert_close(y, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)

    np_layer = NumpyLayer(spec, a=a, dtype=np.float64)
    np.testing.assert_allclose(np_layer.forward(x.numpy()), want.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(np_layer.backward(g.numpy()), want_dx.numpy(), rtol=1e-12)


def test_check_tells_the_right_layer_from_the_wrong_one_at_a_negative_value(tmp_path):
    """check reads a = -0.5 from the layer; the layer that uses a for |a| must fail."""
    spec = load_spec(_spec(tmp_path))
    (tmp_path / "layers.py").write_text(LAYERS)
    from gradtool.check.impl import load_impl

    opts = CheckOptions(cases=1)
    right = check_spec(spec, opts, make_subject(spec, load_impl(f"{tmp_path}/layers.py:AbsHyper")))
    assert right and all(r.passed for r in right)
    wrong = check_spec(spec, opts,
                       make_subject(spec, load_impl(f"{tmp_path}/layers.py:SignedHyper")))
    assert any(not r.passed and r.input == "X" for r in wrong)


def _declaration_line(path, name):
    lines = open(path).read().splitlines()
    return next(k for k, line in enumerate(lines, 1) if f'spec.hyper("{name}"' in line)


@pytest.mark.parametrize("backend", [SpecModule, NumpyLayer])
@pytest.mark.parametrize("spec_name, options, name, says", [
    ("layernorm", dict(D=3, eps=-1e-5), "eps", "positive"),
    ("layernorm", dict(D=3, eps=0.0), "eps", "positive"),
    ("batchnorm", dict(C=3, momentum=1.5), "momentum", "in [0, 1]"),
    ("dropout", dict(p=-0.1), "p", "in [0, 1]"),
    ("leaky_relu", dict(slope=float("nan")), "slope", "a real number"),
])
def test_a_value_outside_the_declared_domain_is_refused_at_the_declaration(
        backend, spec_name, options, name, says):
    with pytest.raises(LayerError) as info:
        backend(spec_name, **options)
    err = info.value
    path = str(builtin_specs()[spec_name])
    assert err.file == path and err.line == _declaration_line(path, name)
    assert f"`{name}` = " in err.message and says in err.message
    assert f"give `{name}` a value" in err.hint


def test_a_value_where_a_statement_divides_by_zero_is_refused():
    """dropout's Y = X·M/(1 − p) at p = 1: in [0, 1], but the forward divides by zero."""
    with pytest.raises(LayerError, match=r"`Y` divides by zero at p = 1"):
        SpecModule("dropout", p=1.0)
    assert SpecModule("dropout", p=0.0).plan.hypers["p"] == 0.0  # the edge of the domain


def test_a_negative_slope_is_fine_where_the_spec_allows_it():
    """leaky ReLU declares no domain for its slope: -0.2 computes X or -0.2·X."""
    layer = SpecModule("leaky_relu", slope=-0.2, dtype=torch.float64)
    x = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.nn.functional.leaky_relu(x, -0.2))


def test_check_refuses_a_value_outside_the_domain_from_set_or_the_layer(tmp_path):
    (tmp_path / "layers.py").write_text(LAYERS)
    from gradtool.check.impl import load_impl

    spec = load_spec("layernorm")
    line = _declaration_line(spec.file, "eps")
    impl = load_impl(f"{tmp_path}/layers.py:NegativeEps")
    with pytest.raises(SpecError) as info:
        check_spec(spec, CheckOptions(cases=1), make_subject(spec, impl))
    assert info.value.line == line and "your layer's `eps`" in info.value.message
    with pytest.raises(SpecError) as info:
        make_subject(spec, impl, settings={"eps": -1.0})
    assert info.value.line == line and info.value.message.startswith("--set")


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_generated_layer_classes_refuse_a_value_outside_the_domain(tmp_path, target):
    """The classes `derive --code` writes check the declared domain in their constructor."""
    from gradtool.codegen.emit import generate

    path = tmp_path / f"batchnorm_{target}.py"
    path.write_text(generate(load_spec("batchnorm"), target))
    namespace = {"__name__": "generated"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    cls = namespace["BatchNorm1d"]
    cls(3, eps=1e-3, momentum=1.0, correction=0)  # at the domains' edges
    for bad, message in [({"eps": 0.0}, "eps = 0.0: these kernels need eps > 0"),
                         ({"momentum": -0.1}, "need 0 <= momentum <= 1"),
                         ({"correction": float("nan")}, "need correction >= 0")]:
        with pytest.raises(ValueError, match=message):
            cls(3, **bad)
