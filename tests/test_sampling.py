"""Checks sample inputs that keep the spec's stated facts (issue 7, item 12).

A fact Σ_k T[n, k] = r is what lets the simplifier reach a textbook form, so a check that
samples inputs breaking it compares the derivation at inputs it was never meant for (0/0 rows
of a one-hot target gave NaN gradients). Each domain keeps the sum its own way; a fact the
sampler cannot keep is reported at its line.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from gradtool.check.runner import CheckOptions, check_spec
from gradtool.check.sampling import sample_dims, sample_inputs
from gradtool.cli import app
from gradtool.errors import SpecError
from gradtool.spec.loader import load_spec

HEAD = """\
from gradtool.lang import Spec, Sum, exp, log

spec = Spec("facts", "a loss over a target with a stated fact")
N, C, H = spec.dims("N C H")
n, c, k, h = spec.indices(n=N, c=C, k=C, h=H)
"""

# cross-entropy on probabilities against one-hot targets: the case of the issue
ONE_HOT = HEAD + """\
P = spec.input("P", N, C, domain="unit")
T = spec.input("T", N, C, grad=False, domain="binary")
spec.fact(Sum(T[n, k], k), 1)  # one-hot rows
spec.output("L", [], -Sum(T[n, c] * log(P[n, c]), n, c) / N)


@spec.torch_reference
def reference(P, T):
    import torch.nn.functional as F

    return F.nll_loss(P.log(), T.argmax(1))
"""


def write(tmp_path, source: str):
    path = tmp_path / "facts.py"
    path.write_text(textwrap.dedent(source))
    return path


def target_spec(tmp_path, domain: str, fact: str):
    """A loss reading T[N, C, H] in ``domain`` with the fact ``fact`` (about T)."""
    return load_spec(write(tmp_path, HEAD + f"""\
X = spec.input("X", N, C, H)
T = spec.input("T", N, C, H, grad=False, domain="{domain}")
spec.fact({fact})
spec.output("L", [], Sum(T[n, c, h] * X[n, c, h], n, c, h))
"""))


def samples(spec, count: int = 6, low: int = 1):
    rng = np.random.default_rng(7)
    for _ in range(count):
        dims = sample_dims(spec, rng, low=low, high=5)
        yield {s.name: v for s, v in dims.items()}, sample_inputs(spec, dims, rng)


def test_one_hot_targets_are_sampled_as_one_hot_rows(tmp_path):
    spec = load_spec(write(tmp_path, ONE_HOT))
    for dims, inputs in samples(spec):
        T = inputs["T"]
        assert set(np.unique(T)) <= {0.0, 1.0}, dims
        assert np.array_equal(T.sum(axis=1), np.ones(dims["N"])), (dims, T)
        assert 0 < inputs["P"].min() and inputs["P"].max() < 1


def test_check_passes_on_one_hot_targets(tmp_path):
    """Every oracle (finite differences, autograd, F.nll_loss, both kernels) agrees, and no
    gradient is NaN: before, half-empty rows were divided by their sum 0."""
    result = CliRunner().invoke(app, ["check", str(write(tmp_path, ONE_HOT)), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert all(r["passed"] for r in rows)
    oracles = {r["oracle"] for r in rows if r["input"] == "P"}
    assert {"finite differences", "torch.autograd", "reference"} <= oracles


@pytest.mark.parametrize("domain", ["real", "positive", "unit", "nonzero"])
@pytest.mark.parametrize("over, axes", [("c", (1,)), ("c, h", (1, 2)), ("n", (0,))])
def test_sums_hold_in_every_domain(tmp_path, domain, over, axes):
    total = "0.75" if domain == "unit" else "2"  # (0, 1) values: below the smallest count
    spec = target_spec(tmp_path, domain, f"Sum(T[n, c, h], {over}), {total}")
    for dims, inputs in samples(spec):
        T = inputs["T"]
        assert np.allclose(T.sum(axis=axes), float(total), rtol=0, atol=1e-12), dims
        if domain == "positive":
            assert T.min() > 0
        if domain == "unit":
            assert 0 < T.min() and T.max() < 1
        if domain == "nonzero":
            assert np.abs(T).min() >= 0.1


def test_binary_sum_of_two_is_two_ones_per_slice(tmp_path):
    spec = target_spec(tmp_path, "binary", "Sum(T[n, c, h], c, h), 2")
    for dims, inputs in samples(spec, low=2):
        T = inputs["T"]
        assert set(np.unique(T)) <= {0.0, 1.0}
        assert np.array_equal(T.sum(axis=(1, 2)), np.full(dims["N"], 2.0))


def test_probability_rows_in_unit_domain_include_a_single_class(tmp_path):
    """Rows of one element in (0, 1] summing to one are [1]; wider rows stay inside (0, 1)."""
    spec = target_spec(tmp_path, "unit", "Sum(T[n, c, h], c), 1")
    seen = set()
    for dims, inputs in samples(spec, count=12):
        T = inputs["T"]
        assert np.allclose(T.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        seen.add(dims["C"])
        if dims["C"] == 1:
            assert np.all(T == 1.0)
        else:
            assert 0 < T.min() and T.max() < 1
    assert 1 in seen and len(seen) > 1


def test_sum_may_name_a_size(tmp_path):
    spec = target_spec(tmp_path, "positive", "Sum(T[n, c, h], c), H")
    for dims, inputs in samples(spec):
        assert np.allclose(inputs["T"].sum(axis=1), dims["H"], atol=1e-12)


@pytest.mark.parametrize("domain, fact, why", [
    ("binary", "Sum(T[n, c, h], c), 1.5", "whole number"),
    ("positive", "Sum(T[n, c, h], c), -1", "positive values cannot sum to -1"),
    ("real", "Sum(T[n, c, h] ** 2, c), 1", "not a sum of one input"),
    ("real", "Sum(T[n, c, h], c), X[n, 0, 0]", "right side must be a number"),
])
def test_a_fact_the_sampler_cannot_keep_is_named_at_its_line(tmp_path, domain, fact, why):
    spec = target_spec(tmp_path, domain, fact)
    rng = np.random.default_rng(0)
    with pytest.raises(SpecError) as err:
        sample_inputs(spec, sample_dims(spec, rng, low=2, high=3), rng)
    assert why in err.value.message and err.value.line == 8 and err.value.hint


def test_two_sum_facts_on_one_tensor_are_refused(tmp_path):
    spec = load_spec(write(tmp_path, HEAD + """\
X = spec.input("X", N, C)
T = spec.input("T", N, C, grad=False, domain="positive")
spec.fact(Sum(T[n, k], k), 1)
spec.fact(Sum(T[n, k], n), 1)
spec.output("L", [], Sum(T[n, c] * X[n, c], n, c))
"""))
    rng = np.random.default_rng(0)
    with pytest.raises(SpecError, match="already has the fact on line 8") as err:
        sample_inputs(spec, sample_dims(spec, rng), rng)
    assert err.value.line == 9


def test_a_false_fact_about_intermediates_stops_the_check(tmp_path):
    """Σ_k exp(X) = 1 is false: the check says so at the fact instead of comparing
    gradients the simplifier derived from it."""
    path = write(tmp_path, HEAD + """\
X = spec.input("X", N, C)
e = spec.let("e", [n, c], exp(X[n, c]))
spec.fact(Sum(e[n, k], k), 1)
spec.output("L", [], Sum(log(e[n, c]), n, c))
""")
    with pytest.raises(SpecError, match="does not hold on the sampled inputs") as err:
        check_spec(load_spec(path), CheckOptions(cases=1, oracles=("forward",)))
    assert err.value.line == 8
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "facts.py:8" in result.stderr and "does not hold" in result.stderr


def test_a_true_fact_about_intermediates_passes(tmp_path):
    """Σ_d (X − mean X) = 0 holds to round-off; verifying it must not flag round-off."""
    spec = load_spec(write(tmp_path, HEAD + """\
X = spec.input("X", N, C)
mu = spec.let("mu", [n], Sum(X[n, k], k) / C)
xc = spec.let("xc", [n, c], X[n, c] - mu[n])
spec.fact(Sum(xc[n, k], k), 0)
spec.output("L", [], Sum(xc[n, c] ** 2, n, c))
"""))
    rows = check_spec(spec, CheckOptions(cases=2, oracles=("forward", "autograd")))
    assert rows and all(r.passed for r in rows)


def test_a_fact_about_a_differentiable_input_is_refused(tmp_path):
    """Finite differences move X off Σ_k X = 1; the check says why instead of failing rows."""
    spec = load_spec(write(tmp_path, HEAD + """\
X = spec.input("X", N, C, domain="positive")
spec.fact(Sum(X[n, k], k), 1)
spec.output("L", [], Sum(log(X[n, c]), n, c))
"""))
    rng = np.random.default_rng(0)
    with pytest.raises(SpecError, match="`X` is differentiable") as err:
        sample_inputs(spec, sample_dims(spec, rng), rng)
    assert err.value.line == 7 and "grad=False" in err.value.hint


REQUIRES_LARGE = '''\
from gradtool.lang import Spec

spec = Spec('req_big', 'rows at least six more than columns')
N, D = spec.dims('N D')
n, d = spec.indices(n=N, d=D)
X = spec.input('X', N, D)
spec.require(N > D + 5)
spec.output('Y', [n, d], X[n, d] * 2)
'''


def test_a_requirement_that_needs_larger_sizes_widens_the_draw_and_skips_a_batch_of_one(
        tmp_path):
    """spec.require(N > D + 5) holds for no sizes up to 5: the sizes are drawn from a wider
    range, and check, whose first shape is a batch of one, draws that one freely too."""
    path = tmp_path / "req_big.py"
    path.write_text(REQUIRES_LARGE)
    spec = load_spec(str(path))
    for seed in range(5):
        dims = {s.name: v for s, v in sample_dims(spec, np.random.default_rng(seed)).items()}
        assert dims["N"] > dims["D"] + 5
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
