"""Softmax over the last axis: S[n, c] = e^X[n, c] / Σ_k e^X[n, k]."""

from gradtool.lang import Spec, Sum, exp

spec = Spec("softmax", "Softmax over the last axis S = exp(X) / Σ_k exp(X)",
            reference="torch.nn.functional.softmax(X, dim=-1)", class_name="Softmax")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)

e = spec.let("e", [n, c], exp(X[n, c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
spec.output("S", [n, c], e[n, c] / Z[n])


@spec.torch_reference
def reference(X):
    import torch.nn.functional as F

    return F.softmax(X, dim=-1)
