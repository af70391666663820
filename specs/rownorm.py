"""Row normalisation: Y[n, d] = X[n, d] / Σ_k X[n, k]."""

from gradtool.lang import Spec, Sum

spec = Spec("rownorm", "Row normalisation Y = X / Σ_k X (each row sums to one)",
            reference="X / X.sum(-1, keepdim=True)", class_name="RowNorm")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D, domain="positive")

s = spec.let("s", [n], Sum(X[n, k], k))
spec.output("Y", [n, d], X[n, d] / s[n])


@spec.torch_reference
def reference(X):
    return X / X.sum(-1, keepdim=True)
