"""Logistic sigmoid: Y = 1 / (1 + e^(−X))."""

from gradtool.lang import Spec, sigmoid

spec = Spec("sigmoid", "Logistic sigmoid Y = 1 / (1 + exp(−X))", reference="torch.sigmoid",
            class_name="Sigmoid")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n, d], sigmoid(X[n, d]))


@spec.torch_reference
def reference(X):
    import torch

    return torch.sigmoid(X)
