"""Affine, strided and split-index reads (issue 7, items 2, 7 and 8): generated kernels against
torch.autograd through the reference convolution / normalisation ops, in float64."""

import textwrap

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F  # noqa: N812

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.spec.loader import load_spec
from tests.helpers import max_rel_err

HEAD = "from gradtool.lang import *\n"

STRIDED = """
    spec = Spec("strided", "one-channel strided correlation")
    N, T, K, S = spec.dims("N T K S")
    n, t, k = spec.indices(n=N, t=T, k=K)
    X = spec.input("X", N, (T - 1) * S + K)
    W = spec.param("W", K)
    spec.output("Y", [n, t], Sum(W[k] * X[n, t * S + k], k))
"""

DEPTHWISE = """
    spec = Spec("depthwise", "depthwise 2-D convolution, stride S")
    N, C, OH, OW, K, S = spec.dims("N C OH OW K S")
    n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
    X = spec.input("X", N, C, (OH - 1) * S + K, (OW - 1) * S + K)
    W = spec.param("W", C, K, K)
    spec.output("Y", [n, c, i, j], Sum(W[c, p, q] * X[n, c, i * S + p, j * S + q], p, q))
"""


def write(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + textwrap.dedent(body))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def kernel_gradients(spec, target, inputs, dims, upstream):
    """(outputs, gradients) of the generated kernels for ``target``, as float64 arrays."""
    kernels = Kernels(spec, target)
    outs, saved, _ = kernels.forward(inputs, dims)
    grads = kernels.backward(upstream, saved, dims)
    return ({k: to_numpy(v) for k, v in outs.items()},
            {k: to_numpy(v) for k, v in grads.items()})


def autograd(fn, inputs, upstream):
    """Outputs and gradients of ``fn`` (a reference op) by torch.autograd, float64."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(upstream))
    return out.detach().numpy(), {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


# -- item 2: a parameter times a strided read ------------------------------------------------

@pytest.mark.parametrize("target", ["numpy", "torch"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_correlation_kernels_match_conv1d(tmp_path, stride, target):
    """Y[n,t] = Σ_k W[k]·X[n, t·S + k]: dX scatters W[k]·G[n,t] to h = S·t + k (a
    conv-transpose), it is not (Σ_k W)·scatter(G)."""
    spec = load_spec(write(tmp_path, "strided", STRIDED))
    rng = np.random.default_rng(stride)
    dims = {"N": 2, "T": 4, "K": 3, "S": stride}
    inputs = {"X": rng.standard_normal((2, 3 * stride + 3)), "W": rng.standard_normal(3)}
    upstream = rng.standard_normal((2, 4))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def conv(X, W):
        return F.conv1d(X[:, None], W[None, None], stride=stride)[:, 0]

    ref, ref_grads = autograd(conv, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "W"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_depthwise_conv2d_kernels_match_grouped_conv2d(tmp_path, target):
    """W[c,p,q]·X[n,c,i·S+p,j·S+q] summed over the 2-D window (p, q) against
    F.conv2d(groups=C): both window indices and the channel stay inside the scatter."""
    spec = load_spec(write(tmp_path, "depthwise", DEPTHWISE))
    rng = np.random.default_rng(7)
    dims = {"N": 2, "C": 3, "OH": 3, "OW": 2, "K": 2, "S": 2}
    inputs = {"X": rng.standard_normal((2, 3, 6, 4)), "W": rng.standard_normal((3, 2, 2))}
    upstream = rng.standard_normal((2, 3, 3, 2))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def conv(X, W):
        return F.conv2d(X, W[:, None], stride=2, groups=3)

    ref, ref_grads = autograd(conv, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "W"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-12, name


GROUPED = """
    spec = Spec("grouped", "grouped 2-D convolution, stride S")
    N, G, Cg, Og, OH, OW, K, S = spec.dims("N G Cg Og OH OW K S")
    n, g, c, o, i, j, p, q = spec.indices(n=N, g=G, c=Cg, o=Og, i=OH, j=OW, p=K, q=K)
    X = spec.input("X", N, G * Cg, (OH - 1) * S + K, (OW - 1) * S + K)
    W = spec.param("W", G * Og, Cg, K, K)
    spec.output("Y", [n, g, o, i, j],
                Sum(W[g * Og + o, c, p, q] * X[n, g * Cg + c, i * S + p, j * S + q], c, p, q))
"""


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_grouped_conv2d_kernels_match_conv2d_groups(tmp_path, target):
    """Channels split into groups (g·Cg + c, g·Og + o) and a strided 2-D window at once,
    against F.conv2d(groups=G); the output keeps the split axis (N, G, Og, OH, OW)."""
    spec = load_spec(write(tmp_path, "grouped", GROUPED))
    rng = np.random.default_rng(11)
    dims = {"N": 2, "G": 2, "Cg": 2, "Og": 3, "OH": 2, "OW": 3, "K": 2, "S": 2}
    inputs = {"X": rng.standard_normal((2, 4, 4, 6)), "W": rng.standard_normal((6, 2, 2, 2))}
    upstream = rng.standard_normal((2, 2, 3, 2, 3))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def conv(X, W):
        return F.conv2d(X, W, stride=2, groups=2).reshape(2, 2, 3, 2, 3)

    ref, ref_grads = autograd(conv, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "W"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_scatter_keeps_a_window_index_its_sum_leaves_free(target):
    """Σ_t δ(h, S·t + k)·G[n,t] with k free is one scatter per k (axes n, k, h), as a
    common term lowered on its own would need."""
    import math

    from gradtool.codegen.emit import _printer

    n, t, k, h = sp.symbols("n t k h", integer=True)
    T, K, S, N = sp.symbols("T K S N", integer=True, positive=True)
    expr = sp.Sum(sp.KroneckerDelta(h, S * t + k) * sp.IndexedBase("G")[n, t], (t, 0, T - 1))
    printer, _ = _printer(target, {"G": "G", "T": "T", "K": "K", "S": "S"})
    printer.ref = "G"
    printer.ranges = {n: N, t: T, k: K, h: (T - 1) * S + K}
    code = printer.assign(expr, (n, k, h), ("N", "K", "H"))
    helpers = __import__(f"gradtool.codegen.{target}_target", fromlist=["HELPERS"]).HELPERS
    namespace = {"np": np, "torch": torch, "math": math}
    exec(helpers["scatter_add"], namespace)
    g = np.random.default_rng(0).standard_normal((2, 3))
    namespace.update(G=torch.tensor(g) if target == "torch" else g, T=3, K=2, S=2)
    got = to_numpy(eval(code, namespace))
    want = np.zeros((2, 2, 6))
    for kk in range(2):
        for tt in range(3):
            want[:, kk, 2 * tt + kk] += g[:, tt]
    assert np.array_equal(got, want), code


# -- item 7: an index that can leave its tensor's range is a spec error -----------------------

RANGE_HEAD = """\
from gradtool.lang import Spec, Sum

spec = Spec("ranges", "affine reads")
N, T, K, S, A, B = spec.dims("N T K S A B")
n, t, k, a, b = spec.indices(n=N, t=T, k=K, a=A, b=B)
"""
RANGE_LINE = RANGE_HEAD.count("\n") + 2  # the output statement, after the input


def load_access(tmp_path, size: str, access: str, lhs: str = "n, t", extra: str = ""):
    path = tmp_path / "ranges.py"
    path.write_text(RANGE_HEAD + f'X = spec.input("X", N, {size})\n'
                    + f'spec.output("Y", [{lhs}], {access})\n' + extra)
    return path, lambda: load_spec(path)


def test_shifted_read_is_refused_with_file_line_and_fix(tmp_path):
    """Y[n,t] = X[n, t − 1] read X[n, −1] at t = 0 (torch wrapped around to X[n, T − 1])."""
    from gradtool.errors import SpecError

    path, load = load_access(tmp_path, "T", "X[n, t - 1]")
    with pytest.raises(SpecError) as info:
        load()
    err = info.value
    assert err.file == str(path) and err.line == RANGE_LINE
    assert "`X[n, t - 1]` can read outside `X`" in err.message
    assert "below 0" in err.message and "reaches -1 (t = 0)" in err.message
    assert "shift the index" in err.hint
    assert 'spec.pad("Xp", X, (0, 0, P, P))' in err.hint


@pytest.mark.parametrize("size, access, lhs, reason", [
    ("T", "X[n, t + 1]", "n, t", "past the last entry T - 1"),
    ("T", "X[n, t*S]", "n, t", "S = 2, T = 2"),
    ("T", "X[n, t + k]", "n, t, k", "past the last entry"),
    ("A*B", "X[n, a*B + b + 1]", "n, a, b", "past the last entry A*B - 1"),
    ("T", "X[n, (A - B)*t]", "n, t", "cannot tell"),
])
def test_reads_that_can_leave_the_axis_are_refused(tmp_path, size, access, lhs, reason):
    from gradtool.errors import SpecError

    _, load = load_access(tmp_path, size, access, lhs)
    with pytest.raises(SpecError) as info:
        load()
    assert reason in info.value.message
    assert info.value.line == RANGE_LINE


@pytest.mark.parametrize("size, access, lhs", [
    ("(T - 1)*S + K", "X[n, t*S + k]", "n, t, k"),   # a strided window
    ("T + K - 1", "X[n, t + k]", "n, t, k"),         # stride one
    ("T", "X[n, T - 1 - t]", "n, t"),                # reversed
    ("A*B", "X[n, a*B + b]", "n, a, b"),             # a split index
    ("A*B", "X[n, b*A + a]", "n, a, b"),             # the other way round
    ("T*S", "X[n, (S - 1)*t]", "n, t"),              # a step that may be zero
])
def test_reads_inside_the_axis_are_accepted(tmp_path, size, access, lhs):
    load_access(tmp_path, size, access, lhs)[1]()


def test_a_stated_minimum_size_makes_a_constant_index_safe(tmp_path):
    from gradtool.errors import SpecError

    with pytest.raises(SpecError, match="past the last entry T - 1"):
        load_access(tmp_path, "T", "X[n, 1]", "n")[1]()
    load_access(tmp_path, "T", "X[n, 1]", "n", "spec.min_size(T=2)\n")[1]()


def test_builtin_affine_specs_still_load():
    for name in ("conv2d", "maxpool2d"):
        assert load_spec(name).name == name


# -- item 8: a channel split into groups ------------------------------------------------------

SPLIT = """
    spec = Spec("split", "rows of X centred within blocks of B")
    N, A, B = spec.dims("N A B")
    n, a, b = spec.indices(n=N, a=A, b=B)
    X = spec.input("X", N, A * B)
    W = spec.param("W", A * B)
    m = spec.let("m", [n, a], Sum(W[a * B + b] * X[n, a * B + b], b) / B)
    spec.output("Y", [n, a, b], X[n, a * B + b] * m[n, a])
"""


def test_split_index_derives_checks_and_generates_code(tmp_path):
    """X[n, a·B + b] with a parameter at the same split position: every oracle of
    ``check`` (finite differences, torch.autograd, NumPy vs torch kernels) and both targets."""
    from typer.testing import CliRunner

    from gradtool.check.runner import CheckOptions, check_spec
    from gradtool.cli import app

    path = write(tmp_path, "split", SPLIT)
    for target in ("numpy", "torch"):
        result = CliRunner().invoke(app, ["derive", str(path), "--code", target])
        assert result.exit_code == 0, result.output
        # every position of the split axis is read once: its scatter-add is a reshape
        assert "join_axes(" in result.output and "scatter_add(" not in result.output
    rows = check_spec(load_spec(path), CheckOptions(cases=2))
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, failed


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_groupnorm_kernels_match_torch_group_norm(target):
    """specs/groupnorm.py, written with X[n, g·Cg + q, l], against F.group_norm by autograd:
    dX, dγ, dβ."""
    spec = load_spec("groupnorm")
    rng = np.random.default_rng(3)
    dims = {"N": 2, "G": 3, "Cg": 2, "L": 4}
    inputs = {"X": rng.standard_normal((2, 6, 4)), "gamma": rng.standard_normal(6),
              "beta": rng.standard_normal(6)}
    upstream = rng.standard_normal((2, 3, 2, 4))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def group_norm(X, gamma, beta):
        return F.group_norm(X, 3, gamma, beta, 1e-5).reshape(2, 3, 2, 4)

    ref, ref_grads = autograd(group_norm, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "gamma", "beta"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-10, name


def test_groupnorm_closed_form_is_the_textbook_one():
    """The statistics reduce over two indices (q, l): Σ_{q,l} X = Cg·L·μ is folded like layer
    norm's Σ_d X = D·μ, so Σ_{q,l} x̂ = 0 drops out and dX keeps three terms,
    rstd·(Gγ − mean(Gγ) − x̂·mean(Gγ·x̂)), each scattered back by δ(h, Cg·g + q)."""
    from gradtool.symbolic.reverse import derive
    from tests.helpers import unsimplified

    d = derive(load_spec("groupnorm"))
    dX = d.closed["X"]
    assert len(sp.Add.make_args(sp.expand(dX))) == 3, dX
    sums = [s for s in sp.preorder_traversal(dX) if isinstance(s, sp.Sum)]
    assert not any(isinstance(s.function, sp.Indexed) and s.function.base.label.name ==
                   "xhat" for s in sums), dX
    reads = {a.base.label.name for a in dX.atoms(sp.Indexed)}
    assert reads == {"G_Y", "gamma", "rstd", "xhat"}, reads
    for name in ("X", "gamma", "beta"):
        assert unsimplified(d.closed[name]) == [], name


SHIFTED = """
    spec = Spec("shifted", "shifted and reversed reads, a three-way split")
    N, T, A, B, C = spec.dims("N T A B C")
    n, t, a, b, c = spec.indices(n=N, t=T, a=A, b=B, c=C)
    X = spec.input("X", N, T + 1)
    Z = spec.input("Z", N, A * B * C)
    W = spec.param("W", B * C)
    d = spec.let("d", [n, t], X[n, t + 1] * X[n, T - t])
    s = spec.let("s", [n, a], Sum(W[b * C + c] * tanh(Z[n, a * B * C + b * C + c]), b, c))
    spec.output("Y", [n, t, a], d[n, t] * s[n, a])
"""


def test_two_scatters_grouped_in_one_sum_and_a_three_way_split_pass_check(tmp_path):
    """dX = Σ_t (δ(h, T − t)·X[n, t + 1] + δ(h, t + 1)·X[n, T − t])·…: the factored form
    groups two scatters in one sum; each becomes its own scatter-add."""
    from gradtool.check.runner import CheckOptions, check_spec

    rows = check_spec(load_spec(write(tmp_path, "shifted", SHIFTED)), CheckOptions(cases=1))
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, failed


CENTRED_MAX = """
    spec = Spec("centred_max", "max over overlapping windows, centred over t")
    N, T, K, S = spec.dims("N T K S")
    n, t, t2, k = spec.indices(n=N, t=T, t2=T, k=K)
    X = spec.input("X", N, (T - 1) * S + K)
    u = spec.let("u", [n, t], Max(X[n, t * S + k], k))
    spec.output("Y", [n, t], u[n, t] - Sum(u[n, t2], t2) / T)
"""


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_a_mask_scattered_by_overlapping_windows_counts_them(tmp_path, target):
    """dX = Σ_t [X = u]·δ·G − mean(G)·Σ_t [X = u]·δ: where two windows share their maximum
    the second scatter adds the mask twice (booleans would give True + True = True)."""
    spec = load_spec(write(tmp_path, "centred_max", CENTRED_MAX))
    inputs = {"X": np.array([[0.0, 5.0, 1.0, 2.0], [3.0, -1.0, 0.5, 4.0]])}
    dims = {"N": 2, "T": 2, "K": 3, "S": 1}
    upstream = np.array([[0.3, -1.2], [2.0, 0.7]])
    _, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def centred_max(X):
        u = F.max_pool1d(X[:, None], 3, stride=1)[:, 0]
        return u - u.mean(1, keepdim=True)

    _, ref_grads = autograd(centred_max, inputs, upstream)
    assert max_rel_err(grads["X"], ref_grads["X"]) < 1e-12
