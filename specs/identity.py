"""Identity activation: Y = X (a linear layer's "no activation", as in the CMU course)."""

from gradtool.lang import Spec

spec = Spec("identity", "Identity activation Y = X", reference="torch.nn.Identity",
            class_name="Identity")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n, d], X[n, d])


@spec.torch_reference
def reference(X):
    import torch

    return torch.nn.Identity()(X)
