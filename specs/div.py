"""Element-wise division: Z = X / Y."""

from gradtool.lang import Spec

spec = Spec("div", "Element-wise division Z = X / Y", reference="torch.div", class_name="Div")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
Y = spec.input("Y", N, D, domain="nonzero")

spec.output("Z", [n, d], X[n, d] / Y[n, d])


@spec.torch_reference
def reference(X, Y):
    import torch

    return torch.div(X, Y)
