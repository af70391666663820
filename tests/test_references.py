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
