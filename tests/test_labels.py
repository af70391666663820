"""Integer class labels in the spec language (issue 7, item 12): ``spec.labels`` and the one-hot
indicator δ(c, y[n]); softmax cross-entropy over labels against F.cross_entropy, in float64."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtool.check.runner import CheckOptions, check_spec
from gradtool.check.sampling import sample_dims, sample_inputs
from gradtool.codegen.cache import compile_spec
from gradtool.errors import SpecError
from gradtool.report import derive_report
from gradtool.spec.loader import load_spec
from gradtool.symbolic.printing import present, text
from gradtool.symbolic.reverse import derive

NAME = "softmax_cross_entropy_labels"

HEAD = """\
from gradtool.lang import KroneckerDelta, Spec, Sum, exp, log

spec = Spec("labelled", "a loss over integer labels")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
y = spec.labels("y", N, classes=C)
"""


def write(tmp_path, body: str):
    path = tmp_path / "labelled.py"
    path.write_text(HEAD + textwrap.dedent(body))
    return path


def problem(rng, n=5, c=4):
    X = rng.standard_normal((n, c))
    y = rng.integers(0, c, n)
    return X, y


def torch_oracle(X, y):
    """F.cross_entropy(X, y) and its gradient by torch.autograd, float64."""
    Xt = torch.tensor(X, requires_grad=True)
    loss = F.cross_entropy(Xt, torch.tensor(y))
    loss.backward()
    return loss.item(), Xt.grad.numpy()


def test_derives_to_softmax_minus_onehot_over_n():
    d = derive(load_spec(NAME))
    assert text(present(d.closed["X"])) == "(P[n,c] - onehot_y[n,c])/N"
    report = derive_report(NAME)
    forward = [row["text"] for row in report["forward"]]
    assert forward[0] == "onehot_y[n,c] = δ(c,y[n])"
    assert report["gradients"][0]["matrix"] == "(P − onehot_y)/N"


def test_kronecker_delta_reads_the_same_as_onehot(tmp_path):
    """δ(c, y[n]) written in the loss is the same constant tensor, with the same result."""
    spec = load_spec(write(tmp_path, """
        e = spec.let("e", [n, c], exp(X[n, c]))
        Z = spec.let("Z", [n], Sum(e[n, k], k))
        P = spec.let("P", [n, c], e[n, c] / Z[n])
        spec.output("L", [], -Sum(KroneckerDelta(c, y[n]) * log(P[n, c]), n, c) / N)
    """))
    d = derive(spec)
    assert spec.tensors["onehot_y"].onehot_of == "y"
    assert [s.target for s in spec.statements] == ["e", "Z", "P", "onehot_y", "L"]
    assert text(present(d.closed["X"])) == "(P[n,c] - onehot_y[n,c])/N"


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_kernels_take_int64_labels_and_match_cross_entropy(target):
    rng = np.random.default_rng(3)
    X, y = problem(rng)
    loss, grad = torch_oracle(X, y)
    mod = compile_spec(NAME, target)
    if target == "numpy":
        L, saved = mod.forward(X, y)
        (dX,) = mod.backward(1.0, *saved)
    else:
        Xt = torch.tensor(X, requires_grad=True)
        L = mod.SoftmaxCrossEntropyLabelsFunction.apply(Xt, torch.tensor(y))
        L.backward()
        dX, L = Xt.grad.numpy(), L.item()
    assert abs(float(L) - loss) <= 1e-14 * abs(loss)
    np.testing.assert_allclose(dX, grad, rtol=1e-12, atol=1e-15)
    assert np.allclose(dX, (F.softmax(torch.tensor(X), 1).numpy() - np.eye(4)[y]) / len(y))


def test_backward_keeps_the_labels_not_a_float_onehot():
    mod = compile_spec(NAME, "torch")
    X = torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([4, 0, 2])
    _, saved = mod.forward(X, y)
    assert [t.dtype for t in saved] == [torch.int64, torch.float64]  # y, P
    assert saved[0] is y


def test_numpy_layer_in_course_style():
    rng = np.random.default_rng(5)
    X, y = problem(rng, n=6, c=3)
    layer = compile_spec(NAME, "numpy").SoftmaxCrossEntropyLabels()
    loss, grad = torch_oracle(X, y)
    assert np.isclose(layer.forward(X, y), loss, rtol=1e-14)
    np.testing.assert_allclose(layer.backward(), grad, rtol=1e-12, atol=1e-15)


def test_float32_kernels_keep_the_logits_dtype():
    mod = compile_spec(NAME, "torch")
    X = torch.randn(4, 3, dtype=torch.float32)
    L, saved = mod.forward(X, torch.tensor([0, 2, 1, 1]))
    (dX,) = mod.backward(torch.tensor(1.0), *saved)
    assert L.dtype == dX.dtype == torch.float32


def test_check_passes_every_oracle():
    rows = check_spec(load_spec(NAME), CheckOptions(cases=2))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    oracles = {r.oracle for r in rows if r.input == "X"}
    assert oracles == {"finite differences", "torch.autograd", "reference",
                       "numpy vs torch kernels"}


def test_labels_are_sampled_as_integers_in_range():
    spec = load_spec(NAME)
    rng = np.random.default_rng(1)
    for _ in range(5):
        dims = sample_dims(spec, rng, low=1, high=5)
        y = sample_inputs(spec, dims, rng)["y"]
        assert y.dtype == np.int64 and y.shape == (dims[spec.dim_symbols["N"]],)
        assert 0 <= y.min() and y.max() < dims[spec.dim_symbols["C"]]


@pytest.mark.parametrize("body, line, what", [
    ('spec.output("L", [], -Sum(log(X[n, y[n]]), n))\n', 8, "are read as"),
    ('spec.output("L", [], Sum(y[n] * X[n, c], n, c))\n', 8, "are read as"),
    ('spec.output("L", [], Sum(KroneckerDelta(n, y[n]) * X[n, c], n, c))\n', 8,
     "not an index over the classes"),
    ('spec.output("L", [], Sum(KroneckerDelta(c, k) * X[n, c], n, c, k))\n', 8,
     "compares an index with integer labels only"),
    ('T = spec.onehot(X)\n', 8, "takes integer labels"),
    ('z = spec.labels("z", N, classes=3)\n', 8, "classes=<a declared dimension>"),
])
def test_label_misuse_is_a_spec_error_with_line_and_fix(tmp_path, body, line, what):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, body))
    assert what in err.value.message, err.value
    assert err.value.line == line and err.value.hint


COURSE_LAYER = '''
import numpy as np


class SoftmaxCrossEntropy:
    """Course-style loss over integer labels: forward(X, y) -> L, backward() -> dX."""

    def forward(self, X, y):
        assert y.dtype.kind == "i", "labels arrive as integers"
        shifted = X - X.max(axis=1, keepdims=True)
        self.P = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        self.y = y
        return -np.log(self.P[np.arange(len(y)), y]).mean()

    def backward(self):
        dX = self.P.copy()
        dX[np.arange(len(self.y)), self.y] -= 1
        return dX / len(self.y)
'''


def test_a_hand_written_layer_over_integer_labels_is_checked(tmp_path):
    from typer.testing import CliRunner

    from gradtool.cli import app

    path = tmp_path / "course.py"
    path.write_text(COURSE_LAYER)
    result = CliRunner().invoke(app, ["check", NAME, "--impl", f"{path}:SoftmaxCrossEntropy"])
    assert result.exit_code == 0, result.output
    buggy = COURSE_LAYER.replace("return dX / len(self.y)", "return dX")
    path.write_text(buggy)
    result = CliRunner().invoke(app, ["check", NAME, "--impl", f"{path}:SoftmaxCrossEntropy"])
    assert result.exit_code == 1 and "comparisons failed" in result.stdout


def test_labels_with_two_axes_per_position_cross_entropy(tmp_path):
    """y[N, H] against X[N, C, H], as F.cross_entropy takes them for segmentation: the
    indicator onehot_y[n, h, c] lines up with X's class axis in the middle."""
    path = tmp_path / "seg.py"
    path.write_text(textwrap.dedent('''\
        from gradtool.lang import KroneckerDelta, Spec, Sum, exp, log

        spec = Spec("seg_ce", "per-position cross-entropy")
        N, C, H = spec.dims("N C H")
        n, c, k, h = spec.indices(n=N, c=C, k=C, h=H)
        X = spec.input("X", N, C, H)
        y = spec.labels("y", N, H, classes=C)
        e = spec.let("e", [n, c, h], exp(X[n, c, h]))
        Z = spec.let("Z", [n, h], Sum(e[n, k, h], k))
        P = spec.let("P", [n, c, h], e[n, c, h] / Z[n, h])
        spec.output("L", [], -Sum(KroneckerDelta(c, y[n, h]) * log(P[n, c, h]), n, c, h)
                    / (N * H))


        @spec.torch_reference
        def reference(X, y):
            import torch.nn.functional as F

            return F.cross_entropy(X, y)
        '''))
    spec = load_spec(path)
    assert text(present(derive(spec).closed["X"])) == "(P[n,c,h] - onehot_y[n,h,c])/(H·N)"
    rows = check_spec(spec, CheckOptions(cases=2, oracles=("fd", "reference", "backends")))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert any(r.oracle == "reference" and r.input == "X" for r in rows)
