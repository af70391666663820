"""Every built-in spec's forward equals its independent PyTorch reference (spec.torch_reference).

The reference is usually a ``torch.nn.functional`` op; a disagreement here is a bug in the spec's
math (or in the reference), not in the derivation.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from gradtool.check.runner import call_reference
from gradtool.check.sampling import sample_dims, sample_inputs
from gradtool.spec.loader import builtin_specs, load_spec
from gradtool.symbolic.evaluate import run_forward
from gradtool.symbolic.ir import normalize
from tests.helpers import max_rel_err

SPECS = sorted(builtin_specs())
TOL = 1e-10

def rel_err(ours, oracle) -> float:
    """Relative to the oracle's scale; round-off below 1e-13 counts as zero (softmax
    cross-entropy with one class is 0 exactly in PyTorch, ~1e-17 through exp/sum/log)."""
    return max_rel_err(np.asarray(ours, dtype=np.float64), np.asarray(oracle, dtype=np.float64))


def _fixed(spec, case: str) -> dict | None:
    names = list(spec.base_dims)  # derived sizes (a conv's OH) follow from the others
    if case == "batch1":  # the batch axis, or the rows of a matrix product
        return {"N" if "N" in names else names[0]: 1}
    if case == "nonsquare":  # every dimension a different size; a padding (min 0) is drawn
        return {name: 3 + i for i, name in enumerate(names)  # so that the windows fit
                if spec.min_sizes.get(name, 1) > 0}
    return None  # random sizes in 1..5


# batch norm declares spec.min_size(N=2): its "batch1" case samples N = 2
CASES = [pytest.param(name, case, id=f"{name}-{case}") for name in SPECS
         for case in ("batch1", "nonsquare", "random-a", "random-b")]


@pytest.fixture(scope="module")
def specs():
    return {}


@pytest.mark.parametrize("name", SPECS)
def test_every_builtin_spec_has_a_reference(name):
    assert callable(load_spec(name).reference_fn), f"{name} has no @spec.torch_reference"


@pytest.mark.parametrize("name, case", CASES)
def test_reference_matches_spec_forward(specs, name, case):
    if name not in specs:
        specs[name] = load_spec(name)
    spec = specs[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{case}".encode()))
    dims = sample_dims(spec, rng, low=1, high=5, fixed=_fixed(spec, case))
    inputs = sample_inputs(spec, dims, rng)

    env = run_forward(normalize(spec), {k: v.copy() for k, v in inputs.items()}, dims,
                      backend="torch")
    passed = {k: torch.tensor(np.array(v), dtype=torch.int64 if spec.tensors[k].is_labels
                              else torch.float64) for k, v in inputs.items()}
    outs = call_reference(spec, passed, dims)

    shown = {s.name: n for s, n in dims.items()}
    assert len(outs) == len(spec.outputs), \
        f"{name}: the reference returns {len(outs)} outputs, the spec declares {len(spec.outputs)}"
    for t, ref in zip(spec.outputs, outs):
        err = rel_err(env[t.name].numpy(), ref.detach().numpy())
        assert err < TOL, f"{name}: {t.name} differs from the reference by {err:.2e} at {shown}"
    for state in dict.fromkeys(st.target for st in spec.statements if st.kind == "update"):
        assert state in passed, f"{name}: the reference does not take the state `{state}`"
        err = rel_err(env[f"{state}:new"].numpy(), passed[state].numpy())
        assert err < TOL, (f"{name}: updated {state} differs from the reference's in-place "
                           f"update by {err:.2e} at {shown}")
        assert rel_err(passed[state].numpy(), inputs[state]) > 0, \
            f"{name}: the reference did not update {state} in place"


REFUSING = """\
from gradtool.lang import *

spec = Spec("twice", "Y = 2·X, its reference {what}")
N = spec.dims("N")
n = spec.indices(n=N)
X = spec.input("X", N)
spec.output("Y", [n], 2 * X[n])


@spec.torch_reference
def reference(X):
    {body}
"""


@pytest.mark.parametrize("what, body", [
    ("refusing its sizes", "raise ValueError('Expected more than 1 value per channel')"),
    ("with a bug", "return 2 * X.sum(dim=3)"),
])
def test_only_a_reference_that_refuses_its_sizes_is_skipped(tmp_path, what, body):
    """A reference that raises ValueError (``F.batch_norm`` on a batch of one) gives a
    skipped row; any other exception is a fault that a skipped (passing) row would hide, so
    the check stops with it, at the reference's line."""
    from gradtool.check.runner import CheckOptions, check_spec
    from gradtool.errors import SpecError

    path = tmp_path / "twice.py"
    path.write_text(REFUSING.format(what=what, body=body))
    options = CheckOptions(cases=1, oracles=("reference",))
    if what == "refusing its sizes":
        (row,) = [r for r in check_spec(load_spec(path), options) if r.oracle == "reference"]
        assert row.passed and row.note.startswith("skipped: the reference raised ValueError")
        return
    with pytest.raises(SpecError) as info:
        check_spec(load_spec(path), options)
    assert info.value.file == str(path) and info.value.line == 12
    assert "the reference raised IndexError" in info.value.message
