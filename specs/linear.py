"""Fully connected layer: Y[n, o] = Σ_i X[n, i] W[o, i] + b[o]."""

from gradtool.lang import Spec, Sum

spec = Spec("linear", "Fully connected layer Y = X Wᵀ + b",
            reference="torch.nn.functional.linear", class_name="Linear")
N, I, O = spec.dims("N I O")
n, i, o = spec.indices(n=N, i=I, o=O)
X = spec.input("X", N, I)
W = spec.param("W", O, I, init="kaiming_uniform")
b = spec.param("b", O, init="zeros")

spec.output("Y", [n, o], Sum(X[n, i] * W[o, i], i) + b[o])


@spec.torch_reference
def reference(X, W, b):
    import torch.nn.functional as F

    return F.linear(X, W, b)
