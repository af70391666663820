"""Rectified linear unit: Y = max(X, 0)."""

from gradtool.lang import Max, Spec

spec = Spec("relu", "Rectified linear unit Y = max(X, 0)",
            reference="torch.nn.functional.relu", class_name="ReLU")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n, d], Max(X[n, d], 0))


@spec.torch_reference
def reference(X):
    import torch.nn.functional as F

    return F.relu(X)
