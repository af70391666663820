"""Leaky ReLU: Y = X if X > 0 else slope · X."""

from gradtool.lang import Piecewise, Spec

spec = Spec("leaky_relu", "Leaky ReLU Y = X if X > 0 else slope·X",
            reference="torch.nn.functional.leaky_relu", class_name="LeakyReLU")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
slope = spec.hyper("slope", 0.01)

spec.output("Y", [n, d], Piecewise((X[n, d], X[n, d] > 0), (slope * X[n, d], True)))


@spec.torch_reference
def reference(X, slope):
    import torch.nn.functional as F

    return F.leaky_relu(X, negative_slope=slope)
