# ruff: noqa: E501 - the spec sources stay exactly as the fuzzer wrote them
"""Specs the fuzzer found bugs with (docs/fuzzing.md): each now derives, generates and passes
every check, and its derived closed forms agree with torch.autograd."""

import numpy as np
import pytest

from gradtool.check.kernels import Kernels, shape_of, to_numpy
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.check.sampling import sample_dims, sample_inputs
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive
from tests.helpers import assert_matches_autograd
from tests.test_lowering import BROADCAST_EXPONENTIAL_LET
from tests.test_saved_exponentials import ATTENTION, OUTPUT

FOUND = {
    "index_named_like_a_let": """\
from gradtool.lang import *

spec = Spec("fuzz_window", "a random strided window")
N, T, K, S, G, Cg = spec.dims("N T K S G Cg")
n, t, k, g, c = spec.indices(n=N, t=T, k=K, g=G, c=Cg)
X = spec.input("X", N, G * Cg, (T - 1) * S + K)
W = spec.param("W", G * Cg, K)
t2 = spec.indices(t2=T)
u = spec.let("u", [n, g, c, t], Sum(W[g * Cg + c, k] * exp(tanh(X[n, g * Cg + c, t * S + k])), k))
spec.output("Y", [n, g, c, t], u[n, g, c, t] - Sum(u[n, g, c, t2], t2) / T)
""",
    "masks_summed": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("np torch math")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("G", N)
W = spec.param("G_Y", N, init="normal")
W2 = spec.param("s_Y", D, E)
t0 = spec.let("m_Y", [], tanh(Max(A[i], i)))
spec.output("Y", [], (Max(A[i], i)) + (t0))
""",
    "two_maxima_summed": """\
from gradtool.lang import *

spec = Spec("two_maxima", "two maxima of one tensor added: their masks add as numbers")
N = spec.dims("N")
n, i = spec.indices(n=N, i=N)
A = spec.input("A", N)
B = spec.input("B", N)
spec.output("Y", [], Max(A[i], i) + Max(A[i] + B[i], i))
""",
    "argmax_mask_rescaled": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N = spec.dims("N")
n, i = spec.indices(n=N, i=N)
A = spec.input("A", N, domain="positive")
t0 = spec.let("t0", [], Max(A[i], i))
spec.output("Y", [], (2*(t0)) / (1 + (t0)**2))
""",
    "captured_sum": """\
from gradtool.lang import *

spec = Spec("captured_sum", "a let whose body is a sum over k divided by an element")
D = spec.dims("D")
d, k = spec.indices(d=D, k=D)
A = spec.input("A", D)
B = spec.input("B", D, domain="positive")
t = spec.let("t", [d], Sum(A[k], k) / B[d])
spec.output("Y", [], Sum(t[k] * A[k], k))
""",
    "chain_three_axes": """\
from gradtool.lang import *

spec = Spec("chain", "element-wise chain over three axes")
N, D, E = spec.dims("N D E")
n, d, e = spec.indices(n=N, d=D, e=E)
A = spec.input("A", N, D, E)
t0 = spec.let("t0", [n, d, e], exp(tanh(A[n, d, e])))
t1 = spec.let("t1", [n, d, e], tanh(t0[n, d, e]))
t2 = spec.let("t2", [n, d, e], exp(tanh(t1[n, d, e])))
t3 = spec.let("t3", [n, d, e], tanh(t2[n, d, e]))
spec.output("Y", [n, d, e], tanh(t3[n, d, e]))
""",
    "one_plus_product": """\
from gradtool.lang import *

spec = Spec("one_plus_product", "1 + a*b")
D = spec.dims("D")
d = spec.indices(d=D)
A = spec.input("A", D)
B = spec.input("B", D)
spec.output("Y", [d], 1 + A[d] * B[d])
""",
    "broadcast_scalar_let": """\
from gradtool.lang import *

spec = Spec("broadcast_scalar_let", "a let over d that is the same for every d")
D = spec.dims("D")
d, k = spec.indices(d=D, k=D)
A = spec.input("A", D)
B = spec.input("B", D)
t = spec.let("t", [d], Sum(A[k] * B[k], k) + 1)
spec.output("Y", [d], tanh(A[d]) + Sum(A[k] * t[k], k))
""",
    "unused_input": """\
from gradtool.lang import *

spec = Spec("unused_input", "a scalar loss that does not read A")
N = spec.dims("N")
n = spec.indices(n=N)
A = spec.input("A", N)
B = spec.input("B", N)
spec.output("L", [], Sum(B[n] ** 2, n))
""",
    "negated_mask": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", E, D, N)
W = spec.param("W", E, N, init="xavier_uniform")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n, d, e], ((Max(W[e, i], i)) + (Sum((A[j, d, n])*(W[j, n]), j))) / (1 + (Max((W[j, n])*(A[j, d, n]), j))**2))
t1 = spec.let("t1", [n, d, e], ((Sum(Max(W[j, i], j), i)) + (Sum((A[e, d, i])*(A[e, d, i]), i))) + (t0[n, d, e]))
t2 = spec.let("t2", [n, d, e], (Max((W[e, i])*(A[e, d, i]), i)) + (t1[n, d, e]))
t3 = spec.let("t3", [n, d, e], ((exp((A[e, d, n]) / 4)) + ((t0[n, d, e]) + (t1[n, d, e]))) + (t2[n, d, e]))
spec.output("Y", [n, d, e], (exp(tanh(t0[n, d, e]))) + (t3[n, d, e]))
""",
    "max_of_product": """\
from gradtool.lang import *

spec = Spec("max_of_product", "a max whose body SymPy can expand")
N, D = spec.dims("N D")
n, k = spec.indices(n=N, k=D)
A = spec.input("A", N, D)
B = spec.input("B", D)
spec.output("Y", [n], Max((A[n, k] + B[k]) * A[n, k], k))
""",
    "max_of_product_chain": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", N, E, D)
B = spec.input("B", D)
W = spec.param("W", D, N, E, init="uniform")
t0 = spec.let("t0", [n, e], Max(((B[k]) + (A[n, e, k]))*((B[k])*(A[n, e, k])), k))
t1 = spec.let("t1", [n, d, e], (sigmoid(B[d]))*(t0[n, e]))
t2 = spec.let("t2", [n, d, e], (Sum((W[k, n, e])*(B[k]), k)) + (t1[n, d, e]))
t3 = spec.let("t3", [n, d, e], (log(1 + (((t0[n, e]) + (t0[n, e])) + (t0[n, e]))**2)) + (t2[n, d, e]))
spec.output("Y", [n, d, e], (-(t1[n, d, e])) + (t3[n, d, e]))
""",
    "mask_times_hyper": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N = spec.dims("N")
n, i = spec.indices(n=N, i=N)
A = spec.input("A", N)
B = spec.input("B", N, domain="positive")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n], alpha*((Max(A[i], i))*((A[n])*(A[n]))))
t1 = spec.let("t1", [n], (Sum(A[i], i) / N) + (t0[n]))
t2 = spec.let("t2", [n], (exp((A[n]) / 4)) + (t1[n]))
t3 = spec.let("t3", [n], (Sum((t1[i]) / (1 + (A[i])**2), i) / N) + (t2[n]))
spec.output("Y", [n], (exp(tanh(A[n])))*(t3[n]))
""",
    "fd_roundoff": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", N)
B = spec.input("B", D, N, E)
W = spec.param("W", E, D, N, init="xavier_uniform")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n, d, e], (A[n])*(W[e, d, n]))
t1 = spec.let("t1", [n, d, e], (Sum((B[d, i, e])*(B[d, i, e]), i)) / (1 + (t0[n, d, e])**2))
t2 = spec.let("t2", [n, d, e], ((Sum(A[i], i)) + (((t0[n, d, e])**2) + 3)) + (t1[n, d, e]))
t3 = spec.let("t3", [n, d, e], (tanh(Sum((A[i])*(t0[i, d, e]), i))) + (t2[n, d, e]))
spec.output("Y", [n, d, e], (tanh((t1[n, d, e]) + (t1[n, d, e]))) + (t3[n, d, e]))
""",
    "quotient_of_a_chain": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N = spec.dims("N")
n, i = spec.indices(n=N, i=N)
A = spec.input("A", N)
B = spec.input("B", N)
W = spec.param("W", N, init="normal")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n], (exp((A[n]) / 4)) / 2)
t1 = spec.let("t1", [n], ((Sum(B[i], i)) + ((t0[n]) + (A[n])))*(B[n]))
t2 = spec.let("t2", [], Sum(t1[i], i))
t3 = spec.let("t3", [n], ((t1[n]) + 3) + (t2))
spec.output("Y", [n], (2*(t1[n])) / (1 + (t3[n])**2))
""",
    "mask_minus_number": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D = spec.dims("N D")
n, d, i, k = spec.indices(n=N, d=D, i=N, k=D)
A = spec.input("A", N, D)
B = spec.input("B", N, D)
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n], Max(A[n, k], k))
t1 = spec.let("t1", [n], (Sum(A[n, k], k) / D)*(t0[n]))
t2 = spec.let("t2", [n], (t0[n]) + (-(t1[n])))
spec.output("Y", [n, d], (Sum((B[i, d]) / 2, i)) + (t2[n]))
""",
    "constant_output": """\
from gradtool.lang import *

spec = Spec("constant_output", "an output that does not depend on the input")
N = spec.dims("N")
n = spec.indices(n=N)
A = spec.input("A", N)
t = spec.let("t", [n], exp(A[n]))
spec.output("Y", [n], tanh(t[n] / t[n]))
""",
    "constant_loss": """\
from gradtool.lang import *

spec = Spec("constant_loss", "a scalar loss that does not depend on the input")
N = spec.dims("N")
n = spec.indices(n=N)
A = spec.input("A", N)
spec.output("L", [], Sum(exp(A[n]) / exp(A[n]), n))
""",
    "shifted_exponential_inside_an_exponent": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N = spec.dims("N")
n, i = spec.indices(n=N, i=N)
A = spec.input("A", N, domain="positive")
W = spec.param("W", N, init="normal")
t0 = spec.let("t0", [n], exp(tanh(A[n])))
t1 = spec.let("t1", [n], exp(tanh(t0[n])))
t2 = spec.let("t2", [n], ((t0[n]) + (Sum((t0[i]) / (1 + (W[i])**2), i) / N)) + (t1[n]))
t3 = spec.let("t3", [n], (Sum((W[i])*(A[i]), i))*(t2[n]))
spec.output("Y", [n], (Sum((t2[i])*(t1[i]), i)) + (t3[n]))
""",
    "log_sum_exp_over_a_shifted_sum": """\
from gradtool.lang import *

spec = Spec("lse_of_lse", "a log-sum-exp whose exponent reads another sum of exponentials")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
A = spec.input("A", N, D)
Z1 = spec.let("Z1", [n], Sum(exp(A[n, k]), k))
Z2 = spec.let("Z2", [n], Sum(exp(A[n, k] / Z1[n]), k))
spec.output("Y", [n, d], A[n, d] + log(Z2[n]))
""",
    "named_number_in_addcmul": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, E = spec.dims("N E")
n, e, i, j = spec.indices(n=N, e=E, i=N, j=E)
A = spec.input("A", E, N)
W = spec.param("W", E, N, init="uniform")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n, e], exp((W[e, n]) / 4))
t1 = spec.let("t1", [n, e], tanh(t0[n, e]))
t2 = spec.let("t2", [n, e], (Sum((t0[n, j]) + (t1[n, j]), j) / E) / (1 + (t1[n, e])**2))
t3 = spec.output("t3", [n, e], tanh(t2[n, e]))
spec.output("Y", [n, e], (log(1 + (t1[n, e])**2)) + (t3[n, e]))
""",
    "inverse_left_in_a_local_form": """\
from gradtool.lang import *

spec = Spec("chain", "a composed element-wise chain")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], tanh(sigmoid(log(1 + exp(X[n, d])))))
""",
    "max_of_exponentials_centred": """\
from gradtool.lang import *

spec = Spec("fuzz_window", "a random strided window")
N, T, K, S, G, Cg = spec.dims("N T K S G Cg")
n, t, k, g, c = spec.indices(n=N, t=T, k=K, g=G, c=Cg)
X = spec.input("X", N, G * Cg, (T - 1) * S + K)
t2 = spec.indices(t2=T)
u = spec.let("u", [n, g, c, t], Max(exp(tanh(X[n, g * Cg + c, t * S + K - 1 - k])), k))
spec.output("Y", [n, g, c, t], u[n, g, c, t] - Sum(u[n, g, c, t2], t2) / T)
""",
    "sum_of_exponentials_centred": """\
from gradtool.lang import *

spec = Spec("fuzz_window", "a random strided window")
N, T, K, S = spec.dims("N T K S")
n, t, k = spec.indices(n=N, t=T, k=K)
X = spec.input("X", N, (T - 1) * S + K)
t2 = spec.indices(t2=T)
u = spec.let("u", [n, t], Sum(exp(tanh(X[n, t * S + k])), k))
spec.output("Y", [n, t], u[n, t] - Sum(u[n, t2], t2) / T)
""",
    "mask_body_shared_with_a_fact": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", N)
B = spec.input("B", N)
W = spec.param("W", N, D, E, init="normal")
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [n, d, e], (A[n])*(W[n, d, e]))
t1 = spec.let("t1", [n, d, e], 2*((B[n])*(t0[n, d, e])))
T = spec.input("T", N, D, E, grad=False, domain="binary")
spec.fact(Sum(T[i, d, e], i), 1)
spec.output("Y", [n, d, e], ((Max(((W[n, k, e]) + 3) + (Sum((t0[i, k, e])*(A[i]), i)), k)) + (t1[n, d, e])) * T[n, d, e])
""",
    "max_of_a_shifted_body": """\
from gradtool.lang import *

spec = Spec("shifted_max", "a max over a body shifted by a parameter and a constant")
N, D, E = spec.dims("N D E")
n, k, j = spec.indices(n=N, k=D, j=E)
X = spec.input("X", N, D, E)
W = spec.param("W", N, init="normal")
spec.output("Y", [n, j], Max(X[n, k, j] + W[n] + 3, k))
""",
    "tanh_chain_after_max": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", D, N, E, domain="positive")
t0 = spec.let("t0", [n, d, e], exp(tanh((Max(A[d, n, j], j)) / (1 + (A[d, n, e])**2))))
t1 = spec.let("t1", [n, d, e], exp(tanh(t0[n, d, e])))
t2 = spec.let("t2", [n, d, e], exp(tanh(t1[n, d, e])))
t3 = spec.let("t3", [n, d, e], tanh(t2[n, d, e]))
spec.output("Y", [n, d, e], exp(tanh(t3[n, d, e])))
""",
    "label_coefficient_on_the_first_label_axis": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", E, D, N)
W = spec.param("W", E, init="ones")
t0 = spec.let("t0", [n, d, e], (W[e])*(A[e, d, n]))
y = spec.labels("y", N, E, classes=D)
spec.output("L", [], Sum(KroneckerDelta(d, y[n, e]) * ((W[e])*(t0[n, d, e])), n, d, e))
""",
    "one_hot_dtype_of_a_float_upstream_gradient": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", E, D, N, domain="positive")
W = spec.param("W", E, init="ones")
t0 = spec.let("t0", [n, e], Sum(A[e, k, n], k) / D)
y = spec.labels("y", E, classes=N)
spec.output("L", [], Sum(KroneckerDelta(n, y[e]) * ((t0[n, e]) / 2), n, e))
""",
    "nested_fold_attempts": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
N, D, E = spec.dims("N D E")
n, d, e, i, k, j = spec.indices(n=N, d=D, e=E, i=N, k=D, j=E)
A = spec.input("A", N)
W2 = spec.param("W2", D, E)
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [], Sum(A[i], i))
t1 = spec.let("t1", [n, d, e], ((W2[d, e])*(A[n])) / (1 + (t0)**2))
t2 = spec.let("t2", [n, d, e], (tanh(t0)) + (t1[n, d, e]))
t3 = spec.let("t3", [n, d, e], exp(tanh(t2[n, d, e])))
spec.output("Y", [n, d, e], (Sum((t2[n, k, e])*(W2[k, e]), k) / D)*(t3[n, d, e]))
""",
    "attention_saved_exponentials": ATTENTION + OUTPUT,  # finding 29, as the newcomer wrote it
    "average_of_values_exp_of_a_sum": """\
from gradtool.lang import *

spec = Spec("lse", "a normalised exponential at large logits")
N, C, D = spec.dims("N C D")
n, c, k, d = spec.indices(n=N, c=C, k=C, d=D)
X = spec.input("X", N, C)
B = spec.input("B", C, domain="positive")
V = spec.input("V", C, D)
e = spec.let("e", [n, c], exp(X[n, c] + B[c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
spec.output("Y", [n, d], Sum(e[n, k] * V[k, d], k) / Z[n])
""",
    # h30 trial, item 10: the torch forward crashed ("output with shape [] doesn't match the
    # broadcast shape [N]"): the shift of B by its maximum over d was torch's amax(()), a 0-d
    # maximum over every axis, then updated in place with c
    "broadcast_exponential_let_summed": "from gradtool.lang import *\n" + BROADCAST_EXPONENTIAL_LET,
    # found by the index-value property: the common term 1 + Min(0, d, m_t0)² reads no
    # tensor element, so the backward took it for a number (no axes) and divided an array
    # over e by it unaligned ("operands could not be broadcast together")
    "index_value_in_a_common_term": """\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
D, E = spec.dims("D E")
d, e, k, j = spec.indices(d=D, e=E, k=D, j=E)
A = spec.input("A", E, domain="positive")
W2 = spec.param("W2", D)
alpha = spec.hyper("alpha", 0.7)
t0 = spec.let("t0", [d, e], (Max(A[e], 0, e)) / (1 + (Min(Max(W2[k], k), 0, d))**2))
t1 = spec.let("t1", [], Sum(Sum(Min(t0[k, j], 0, k), j), k) / D)
spec.output("Y", [], exp(tanh(t1)))
""",
    # h30 trial, item 11: the torch forward was `max(0, torch.arange(D))` (Python's max)
    "index_as_a_value_in_max": """from gradtool.lang import *
spec = Spec("index_in_max", "entries floored at 0 and at their column index")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], Max(X[n, d], 0, d))
""",
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_fuzzer_finding_derives_what_autograd_computes(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(FOUND[name])
    d = derive(load_spec(path))
    for seed in range(6):
        assert_matches_autograd(d, seed=seed)


@pytest.mark.parametrize("name", sorted(FOUND))
def test_fuzzer_finding_passes_every_check(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(FOUND[name])
    rows = check_spec(load_spec(path), CheckOptions(cases=2))
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, failed


@pytest.mark.parametrize("name", sorted(FOUND))
def test_fuzzer_finding_kernels_agree_to_round_off(tmp_path, name):
    """The NumPy and the torch kernel compute the same float64 numbers (finding 13: a mask
    times a Python number was float32 in torch)."""
    path = tmp_path / f"{name}.py"
    path.write_text(FOUND[name])
    spec = load_spec(path)
    kernels = [Kernels(spec, "numpy"), Kernels(spec, "torch")]
    for seed in range(4):
        rng = np.random.default_rng(seed)
        dims = sample_dims(spec, rng, low=1, high=4)
        inputs = sample_inputs(spec, dims, rng)
        upstream = {o: rng.standard_normal(shape_of(spec, o, dims)) for o in kernels[0].outputs}
        got = []
        for k in kernels:
            _, saved, _ = k.forward(inputs, dims)
            got.append({n: to_numpy(g) for n, g in k.backward(upstream, saved, dims).items()})
        for n in got[0]:
            scale = max(1.0, float(np.abs(got[0][n]).max()))
            assert np.abs(got[0][n] - got[1][n]).max() <= 1e-13 * scale, (n, dims)


SATURATED_TANH = """\
from gradtool.lang import *

spec = Spec("m", "x")
E = spec.dims("E")
e, j = spec.indices(e=E, j=E)
A = spec.input("A", E)
B = spec.input("B", E)
W = spec.param("W", E)
t0 = spec.let("t0", [e], 2*Sum(A[j], j) + exp(W[e] / 4)*A[e] / (1 + B[e]**2))
t1 = spec.let("t1", [e], 4*t0[e])
t2 = spec.let("t2", [e], log(1 + t0[e]**2) + t1[e])
t3 = spec.let("t3", [e], tanh(t1[e])*t2[e])
spec.output("Y", [e], exp(tanh(t3[e])))
"""


def test_saturated_tanh_keeps_its_precision(tmp_path):
    """Finding 11: with 1 − tanh² expanded, 8 of these 60 seeds lost all relative precision
    where tanh saturates; factored, every one matches autograd."""
    path = tmp_path / "saturated.py"
    path.write_text(SATURATED_TANH)
    d = derive(load_spec(path))
    for seed in range(60):
        assert_matches_autograd(d, seed=seed)


def test_chain_rule_through_saturating_lets_stays_a_product(tmp_path):
    """Finding 21: each 1 − tanh² of the chain was multiplied out against the others, so dA
    grew to about 1600 operations (2⁴ products, each times the arg-max mask's terms) and the
    spec took 84 s to check. Sums that can fold nothing stay factors: dA is the chain's
    product, each factor once, and still autograd's gradient."""
    import sympy as sp

    path = tmp_path / "chain.py"
    path.write_text(FOUND["tanh_chain_after_max"])
    d = derive(load_spec(path))
    closed = d.closed["A"]
    assert sp.count_ops(closed) < 200, sp.count_ops(closed)  # 1631 before the fix

    def one_minus_tanh_squared_of(name):  # a factor 1 − tanh(name[…])², kept as one
        return [f for f in sp.preorder_traversal(closed)
                if isinstance(f, sp.Mul) and any(
                    isinstance(a, sp.Add) and len(a.args) == 2 and sp.Integer(1) in a.args
                    and any(isinstance(t, sp.Indexed) and t.base.label.name == name
                            for t in sp.preorder_traversal(a))
                    and a.has(sp.tanh) for a in f.args)]

    assert one_minus_tanh_squared_of("t0") and one_minus_tanh_squared_of("t1"), closed
    for seed in range(3):
        assert_matches_autograd(d, seed=seed)


def _count_fold_attempts(monkeypatch) -> list[int]:
    """Record the inlining attempts of each top-level simplification (``FOLD_BUDGET``)."""
    from gradtool.symbolic.simplify import Simplifier

    peaks = []
    call = Simplifier.__call__

    def counted(self, expr, depth=0):
        top = not self._top
        out = call(self, expr, depth)
        if top:
            peaks.append(self._attempts)
        return out

    monkeypatch.setattr(Simplifier, "__call__", counted)
    return peaks


def test_nested_folds_are_not_attempted_where_none_can_succeed(tmp_path, monkeypatch):
    """Finding 18: the adjoint of t0 = Σ_i A[i] gathers sums over n, d, e and k, and each was
    inlined and simplified again, nested three deep, in every order of its limits (minutes).
    A sum whose terms cannot match any definition (each read of one, with the summed index
    in place, and no other read of that index such as the upstream gradient) is no longer
    inlined, so this spec makes no nested simplification at all; its gradient is unchanged."""
    from gradtool.symbolic.simplify import Simplifier

    nested = []
    call = Simplifier.__call__

    def counted(self, expr, depth=0):
        if depth:  # only an inlining attempt simplifies at depth > 0
            nested.append(expr)
        return call(self, expr, depth)

    monkeypatch.setattr(Simplifier, "__call__", counted)
    path = tmp_path / "nested.py"
    path.write_text(FOUND["nested_fold_attempts"])
    d = derive(load_spec(path))
    assert nested == []
    for seed in range(2):
        assert_matches_autograd(d, seed=seed)


def test_fold_budget_bounds_the_nested_attempts(tmp_path, monkeypatch):
    """Where every fold looks possible (the test pretends so), the budget per top-level
    simplification stops the nesting: no call makes more than ``FOLD_BUDGET`` attempts, and
    the sums it did not try stay sums, so the gradient is still autograd's."""
    import gradtool.symbolic.simplify as simplify

    monkeypatch.setattr(simplify, "FOLD_BUDGET", 4)
    monkeypatch.setattr(simplify.Simplifier, "_could_fold", lambda self, expr, var, stages: True)
    peaks = _count_fold_attempts(monkeypatch)
    path = tmp_path / "nested.py"
    path.write_text(FOUND["nested_fold_attempts"])
    d = derive(load_spec(path))
    assert max(peaks) == 4, peaks  # the budget was reached, and never passed
    for seed in range(2):
        assert_matches_autograd(d, seed=seed)


def test_numpy_class_reads_sizes_from_its_parameters(tmp_path):
    """Finding 24's spec: the backward needs sizes (of s_Y's zero gradient) that only a
    parameter carries; the NumPy class reads them from ``self.params``, and its gradient of G
    is both maxima's masks added as numbers, against torch.autograd."""
    import inspect

    import torch

    from gradtool.codegen.emit import generate

    path = tmp_path / "masks_summed.py"
    path.write_text(FOUND["masks_summed"])
    namespace: dict = {}
    exec(compile(generate(load_spec(str(path)), "numpy"), "generated", "exec"), namespace)
    cls = next(v for v in namespace.values() if isinstance(v, type) and hasattr(v, "backward")
               and hasattr(v, "forward"))
    sizes = {p: 3 for p in inspect.signature(cls).parameters if p != "rng"}
    layer = cls(**sizes, rng=np.random.default_rng(0))
    g = np.array([0.3, 1.2, -0.5])
    layer.forward(g)
    got = layer.backward()
    gt = torch.tensor(g, requires_grad=True)
    (gt.max() + torch.tanh(gt.max())).backward()
    np.testing.assert_allclose(got, gt.grad.numpy(), rtol=1e-12)
    assert layer.grads["s_Y"].shape == (3, 3) and not layer.grads["s_Y"].any()


def test_a_label_scatter_coefficient_broadcasts_along_its_own_axis(tmp_path):
    """Finding 28: with E = N the coefficient G·W[e] of a scatter at labels y[n, e] was added
    along n (silently wrong); both kernels' dA and dW against torch.autograd in float64."""
    import torch

    path = tmp_path / "labels2.py"
    path.write_text(FOUND["label_coefficient_on_the_first_label_axis"])
    spec = load_spec(path)
    rng = np.random.default_rng(0)
    E = N = 3
    A = rng.standard_normal((E, 2, N))
    W = rng.standard_normal(E)
    y = rng.integers(0, 2, (N, E))
    At, Wt = torch.tensor(A, requires_grad=True), torch.tensor(W, requires_grad=True)
    picked = At[torch.arange(E)[:, None], torch.tensor(y).T, torch.arange(N)]  # (E, N)
    L = (Wt[:, None] ** 2 * picked).sum()
    dA, dW = torch.autograd.grad(L, [At, Wt])
    inputs = {"A": A, "W": W, "y": y}
    dims = {s: {"N": N, "D": 2, "E": E}[str(s)] for s in spec.dim_symbols.values()}
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        _, saved, _ = k.forward(inputs, dims)
        got = {n: to_numpy(g) for n, g in k.backward({"L": np.array(1.0)}, saved, dims).items()}
        assert np.allclose(got["A"], dA.numpy(), atol=1e-12), target
        assert np.allclose(got["W"], dW.numpy(), atol=1e-12), target


def test_average_of_values_is_finite_and_right_at_800_logits(tmp_path):
    """Finding 29: the backward reads e and Z (and writes e's definition exp(X + B) in dB);
    the kernels save the shifted e and Z and read e for exp(X + B), so nothing overflows."""
    import torch

    path = tmp_path / "average.py"
    path.write_text(FOUND["average_of_values_exp_of_a_sum"])
    spec = load_spec(path)
    rng = np.random.default_rng(0)
    x = rng.permuted(np.c_[[[800.0, -800.0]] * 3, rng.uniform(-800, 800, (3, 2))], axis=1)
    b, v, g = rng.uniform(0.5, 2, 4), rng.standard_normal((4, 2)), rng.standard_normal((3, 2))
    xt, bt, vt = (torch.tensor(a, requires_grad=True) for a in (x, b, v))
    y = torch.softmax(xt + bt, 1) @ vt
    y.backward(torch.tensor(g))
    want = {"Y": y.detach().numpy(), "X": xt.grad.numpy(), "B": bt.grad.numpy(),
            "V": vt.grad.numpy()}
    dims = {spec.dim_symbols["N"]: 3, spec.dim_symbols["C"]: 4, spec.dim_symbols["D"]: 2}
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        outs, saved, _ = k.forward({"X": x, "B": b, "V": v}, dims)
        got = {n: to_numpy(a) for n, a in {**outs, **k.backward({"Y": g}, saved, dims)}.items()}
        for name, w in want.items():
            assert np.all(np.isfinite(got[name])), (target, name)
            np.testing.assert_allclose(got[name], w, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{target}: {name}")
