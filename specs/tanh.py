"""Hyperbolic tangent: Y = tanh(X)."""

from gradtool.lang import Spec, tanh

spec = Spec("tanh", "Hyperbolic tangent Y = tanh(X)", reference="torch.tanh", class_name="Tanh")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n, d], tanh(X[n, d]))


@spec.torch_reference
def reference(X):
    import torch

    return torch.tanh(X)
