"""Log-softmax over the last axis: Y[n, c] = X[n, c] − log Σ_k e^X[n, k]."""

from gradtool.lang import Spec, Sum, exp, log

spec = Spec("log_softmax", "Log-softmax over the last axis Y = X − log Σ_k exp(X)",
            reference="torch.nn.functional.log_softmax(X, dim=-1)", class_name="LogSoftmax")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)

Z = spec.let("Z", [n], Sum(exp(X[n, k]), k))
lse = spec.let("lse", [n], log(Z[n]))
spec.output("Y", [n, c], X[n, c] - lse[n])


@spec.torch_reference
def reference(X):
    import torch.nn.functional as F

    return F.log_softmax(X, dim=-1)
