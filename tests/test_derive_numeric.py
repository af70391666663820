"""Every built-in spec: the derived backward equals torch.autograd through the same forward."""

import zlib

import pytest

from gradtool.spec.loader import builtin_specs, load_spec
from gradtool.symbolic.reverse import derive
from tests.helpers import SHAPES, assert_matches_autograd, unsimplified

SPECS = sorted(builtin_specs())


@pytest.fixture(scope="module")
def derivations():
    return {}


def _derivation(cache, name):
    if name not in cache:
        cache[name] = derive(load_spec(name))
    return cache[name]


@pytest.mark.parametrize("case, fixed", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("name", SPECS)
def test_backward_matches_autograd(derivations, name, case, fixed):
    seed = zlib.crc32(f"{name}/{case}".encode())
    assert_matches_autograd(_derivation(derivations, name), seed=seed, fixed=fixed)


@pytest.mark.parametrize("name", SPECS)
def test_closed_forms_are_simplified(derivations, name):
    d = _derivation(derivations, name)
    for t in d.spec.grad_inputs:
        assert unsimplified(d.closed[t.name]) == [], t.name


@pytest.mark.parametrize("name", SPECS)
def test_every_differentiable_input_has_a_gradient(derivations, name):
    d = _derivation(derivations, name)
    for t in d.spec.grad_inputs:
        assert d.closed[t.name] != 0, f"{name}: d{t.name} is zero"
