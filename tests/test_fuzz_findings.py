# ruff: noqa: E501 - the spec sources stay exactly as the fuzzer wrote them
"""Specs the fuzzer found bugs with (docs/fuzzing.md, findings 1–7): each now derives,
generates and passes every check."""

import pytest

from gradtool.check.runner import CheckOptions, check_spec
from gradtool.spec.loader import load_spec

FOUND = {
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
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_fuzzer_finding_passes_every_check(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(FOUND[name])
    rows = check_spec(load_spec(path), CheckOptions(cases=2))
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, failed
