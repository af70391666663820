"""Higher-order gradients through the generated torch Functions (``create_graph=True``:
gradient penalties, Hessian-vector products), for every built-in spec: either exact, against
central finite differences of the (verified) first-order gradient in float64, or refused with
a RuntimeError that says why. A Function whose backward reads forward intermediates (layer
norm's x̂ and rstd) saves them as constants, so differentiating its backward misses every term
through them: layer norm's second directional derivative came out 542.6 against 627.0
(newcomer trial), silently."""

from __future__ import annotations

import pytest
import torch

from gradtool.spec.loader import builtin_specs
from tests.helpers import spec_layer_case

SPECS = sorted(builtin_specs())
REFUSES = "cannot be differentiated again"


def _gradient(layer, inputs, wrt, upstream, create_graph):
    torch.manual_seed(1)  # the same dropout mask at every evaluation
    out = layer(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * u).sum() for o, u in zip(outs, upstream, strict=True))
    return torch.autograd.grad(total, wrt, create_graph=create_graph, allow_unused=True)


@pytest.mark.parametrize("name", SPECS)
def test_second_order_gradients_are_exact_or_refused(name):
    layer, inputs = spec_layer_case(name)
    wrt = [x for x in inputs if x.requires_grad] + [p for p in layer.parameters()]
    if not wrt:
        pytest.skip(f"{name} has nothing to differentiate")
    with torch.no_grad():
        torch.manual_seed(1)
        out = layer(*inputs)
    g = torch.Generator().manual_seed(2)
    outs = out if isinstance(out, tuple) else (out,)
    upstream = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in outs]
    direction = [torch.randn(w.shape, dtype=torch.float64, generator=g) for w in wrt]
    try:
        first = _gradient(layer, inputs, wrt, upstream, create_graph=True)
    except RuntimeError as exc:
        assert REFUSES in str(exc) and name in str(exc)
        return
    terms = [(f * v).sum() for f, v in zip(first, direction) if f is not None and f.requires_grad]
    hvp = torch.autograd.grad(sum(terms), wrt, allow_unused=True) if terms else [None] * len(wrt)
    eps = 1e-6
    shifted = []
    for sign in (1, -1):
        with torch.no_grad():
            for w, v in zip(wrt, direction):
                w.add_(sign * eps * v)
        shifted.append(_gradient(layer, inputs, wrt, upstream, create_graph=False))
        with torch.no_grad():
            for w, v in zip(wrt, direction):
                w.sub_(sign * eps * v)
    for k, (h, a, b) in enumerate(zip(hvp, *shifted)):
        zero = torch.zeros_like(wrt[k])
        fd = ((zero if a is None else a) - (zero if b is None else b)) / (2 * eps)
        got = zero if h is None else h
        torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-6 * (1 + fd.abs().max().item()),
                                   msg=f"{name}: Hessian-vector product, argument {k}")


def test_the_layers_whose_backward_reads_intermediates_refuse_and_the_others_do_not():
    """Which refuse follows from what each backward reads (not a list kept by hand): the
    normalisations and the softmax losses read x̂, rstd or P; linear, conv2d, relu, tanh,
    sigmoid and softmax read inputs, parameters or outputs only, and max pooling reads its
    padded input only through the argmax (piecewise constant: no derivative is lost)."""
    refused = set()
    for name in SPECS:
        layer, inputs = spec_layer_case(name)
        wrt = [x for x in inputs if x.requires_grad] + list(layer.parameters())
        if not wrt:
            continue
        try:
            _gradient(layer, inputs, wrt, [torch.ones_like(o) for o in
                                           _as_tuple(layer(*inputs))], create_graph=True)
        except RuntimeError as exc:
            assert REFUSES in str(exc)
            refused.add(name)
    assert {"layernorm", "batchnorm", "batchnorm2d", "groupnorm",
            "softmax_cross_entropy_labels"} <= refused
    assert not refused & {"linear", "conv2d", "relu", "tanh", "sigmoid", "softmax", "matmul",
                          "maxpool2d"}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)
