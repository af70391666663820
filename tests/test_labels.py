"""Integer class labels in the spec language (issue 7, item 12): ``spec.labels`` and the one-hot
indicator δ(c, y[n]); softmax cross-entropy over labels against F.cross_entropy, in float64."""

from __future__ import annotations

import inspect
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
                       "numpy vs torch kernels", "torch.autograd at zeros of X"}


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
    mod = compile_spec(spec, "torch")
    source = mod.__loader__.get_source(mod.__name__)
    # torch: the softmax along the class axis, F.nll_loss over (N, C, H) and labels (N, H)
    assert "log_P = torch.log_softmax(X, 1)" in source
    assert 'nll_loss(log_P, y, reduction="sum")' in source
    rows = check_spec(spec, CheckOptions(cases=2, oracles=("fd", "reference", "backends")))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert any(r.oracle == "reference" and r.input == "X" for r in rows)


# -- the label pick (forward) and the label scatter (backward): no one-hot array ---------------
# Losses over integer labels written in the spec language, each with its torch reference:
# (body after HEAD, reference(X, y, w) in float64, does the forward pick at the labels, does
# the backward scatter at them?)
LABEL_LOSSES = {
    "cross_entropy": ('''
        e = spec.let("e", [n, c], exp(X[n, c]))
        Z = spec.let("Z", [n], Sum(e[n, k], k))
        P = spec.let("P", [n, c], e[n, c] / Z[n])
        spec.output("L", [], -Sum(spec.onehot(y)[n, c] * log(P[n, c]), n, c) / N)
        ''', lambda X, y, w: F.cross_entropy(X, y), True, True),
    # NLL on log-probabilities: the gradient is the scatter alone (into zeros)
    "nll": ('''
        spec.output("L", [], -Sum(KroneckerDelta(c, y[n]) * X[n, c], n, c) / N)
        ''', lambda X, y, w: F.nll_loss(X, y), True, True),
    # label smoothing written with the one-hot: the forward's one-hot sits inside a sum of
    # terms (no pick, the one-hot stays); the backward's −0.9·δ/N still scatters
    "smoothed": ('''
        e = spec.let("e", [n, c], exp(X[n, c]))
        Z = spec.let("Z", [n], Sum(e[n, k], k))
        P = spec.let("P", [n, c], e[n, c] / Z[n])
        T = spec.onehot(y)
        spec.output("L", [], -Sum((Rational(9, 10) * T[n, c] + Rational(1, 10) / C)
                                  * log(P[n, c]), n, c) / N)
        ''', lambda X, y, w: F.cross_entropy(X, y, label_smoothing=0.1), False, True),
    # class weights: the coefficient of δ reads c, so the scatter adds w[y[n]] (a gather)
    "weighted": ('''
        w = spec.input("w", C)
        e = spec.let("e", [n, c], exp(X[n, c]))
        Z = spec.let("Z", [n], Sum(e[n, k], k))
        P = spec.let("P", [n, c], e[n, c] / Z[n])
        spec.output("L", [], -Sum(KroneckerDelta(c, y[n]) * w[c] * log(P[n, c]), n, c) / N)
        ''', lambda X, y, w: -(w[y] * F.log_softmax(X, 1)[torch.arange(len(y)), y]).sum()
        / len(y), True, True),
    # one label per sample for every position h of X[n, c, h]: the pick broadcasts the labels
    # over h (take_along_axis / take_along_dim); the gradient's δ lacks h: it stays a one-hot
    "shared": ('''
        H = spec.dims("H")
        h = spec.indices(h=H)
        X = spec.input("X", N, C, H)
        y = spec.labels("y", N, classes=C)
        e = spec.let("e", [n, c, h], exp(X[n, c, h]))
        Z = spec.let("Z", [n, h], Sum(e[n, k, h], k))
        P = spec.let("P", [n, c, h], e[n, c, h] / Z[n, h])
        spec.output("L", [], -Sum(KroneckerDelta(c, y[n]) * log(P[n, c, h]), n, c, h) / (N * H))
        ''', lambda X, y, w: F.cross_entropy(X, y[:, None].expand(-1, X.shape[2])), True, False),
}


def label_loss(tmp_path, name):
    body, reference, picks, scatters = LABEL_LOSSES[name]
    path = tmp_path / f"{name}.py"
    head = HEAD.replace("Sum, exp", "Rational, Sum, exp").replace(
        '"labelled"', f'"labelled_{name}"')
    if name == "shared":  # X[n, c, h] instead of X[n, c]: declared in the body
        head = head.split('X = spec.input("X", N, C)')[0]
    path.write_text(head + textwrap.dedent(body))
    return load_spec(path), reference, picks, scatters


def run_kernels(mod, target, X, y, w, need):
    """Loss and gradients (X, and w if the spec has it) of the generated kernels."""
    args = (X, y) if w is None else (X, y, w)
    # a size no saved tensor has is passed in (NLL saves only the labels)
    sizes = {"C": X.shape[1]} if "C" in inspect.signature(mod.backward).parameters else {}
    if target == "numpy":
        L, saved = mod.forward(*args)
        return float(L), mod.backward(1.0, *saved, need=need, **sizes)
    L, saved = mod.forward(*(torch.from_numpy(a) for a in args))
    grads = mod.backward(torch.tensor(1.0, dtype=torch.float64), *saved, need=need, **sizes)
    return L.item(), tuple(g if g is None else g.numpy() for g in grads)


@pytest.mark.parametrize("target", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(LABEL_LOSSES))
def test_label_pick_and_scatter_match_autograd(tmp_path, name, target):
    """Each loss and its gradients against torch.autograd of the torch reference, float64,
    at N = 1 and with labels at class 0 and C − 1; each ``need`` flag alone."""
    spec, reference, picks, scatters = label_loss(tmp_path, name)
    mod = compile_spec(spec, target)
    source = mod.__loader__.get_source(mod.__name__)
    forward, backward = source.split("def backward(")[0], source.split("def backward(")[1]
    arange_c = "arange(C" if target == "numpy" else "torch.arange(C"
    assert (arange_c not in forward) == picks          # no one-hot where the pick applies
    # torch: a pick summed over every label axis, with nothing else read, is one nll_loss
    assert ("nll_loss(" in forward) == (target == "torch" and name in ("cross_entropy", "nll"))
    assert (arange_c not in backward.split("\nclass ")[0].split("def use_torch_compile")[0]) \
        == scatters
    rng = np.random.default_rng(11)
    for n_, y in ((1, np.array([0])), (1, np.array([3])), (5, np.array([0, 3, 3, 1, 0]))):
        X = rng.standard_normal((n_, 4) if name != "shared" else (n_, 4, 3))
        if name == "nll":
            X = np.log(np.exp(X) / np.exp(X).sum(1, keepdims=True))
        w = rng.uniform(0.5, 2.0, 4) if name == "weighted" else None
        Xt = torch.tensor(X, requires_grad=True)
        wt = None if w is None else torch.tensor(w, requires_grad=True)
        loss = reference(Xt, torch.tensor(y), wt)
        loss.backward()
        expected = [Xt.grad.numpy()] + ([] if w is None else [wt.grad.numpy()])
        flags = len(expected)
        L, grads = run_kernels(mod, target, X, y, w, (True,) * flags)
        assert abs(L - loss.item()) <= 1e-13 * max(1.0, abs(loss.item()))
        for g, e in zip(grads, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-15)
        for k in range(flags):  # one gradient at a time: the others are None
            only = tuple(j == k for j in range(flags))
            _, grads = run_kernels(mod, target, X, y, w, only)
            assert [g is None for g in grads] == [not f for f in only]
            np.testing.assert_allclose(grads[k], expected[k], rtol=1e-12, atol=1e-15)


def test_label_pick_and_scatter_keep_float32_and_leave_saved_tensors_alone():
    """float32 in, float32 out; the backward's scatter writes into an array of its own
    (backward twice from the same saved tensors gives the same gradient)."""
    mod = compile_spec(NAME, "torch")
    X = torch.randn(6, 5, dtype=torch.float32)
    y = torch.tensor([4, 0, 2, 2, 1, 4])
    L, saved = mod.forward(X, y)
    P = saved[1].clone()
    (dX,) = mod.backward(torch.tensor(1.0), *saved)
    (again,) = mod.backward(torch.tensor(1.0), *saved)
    assert L.dtype == dX.dtype == torch.float32
    assert torch.equal(saved[1], P) and torch.equal(dX, again)
    # a float64 upstream gradient: the scatter's values take the gradient's dtype
    (mixed,) = mod.backward(torch.tensor(1.0, dtype=torch.float64), *saved)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, dX)
    Xt = X.clone().requires_grad_()
    F.cross_entropy(Xt, y).backward()
    torch.testing.assert_close(dX, Xt.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(L, F.cross_entropy(X, y), rtol=1e-6, atol=1e-7)


def test_label_pick_and_scatter_sources_pass_ruff(tmp_path):
    """The gathers and in-place scatters of every label loss above, both targets, pass the
    project's ruff rules (as tests/test_code_style.py checks the built-in specs)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from gradtool.codegen.emit import generate

    ruff = ["ruff"] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    root = Path(__file__).resolve().parent.parent
    files = []
    for name in sorted(LABEL_LOSSES):
        spec = label_loss(tmp_path, name)[0]
        for target in ("numpy", "torch"):
            path = tmp_path / f"gen_{name}_{target}.py"
            path.write_text(generate(spec, target))
            files.append(str(path))
    run = subprocess.run([*ruff, "check", "--no-cache", "--config", str(root / "pyproject.toml"),
                          "--output-format", "concise", *files], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
