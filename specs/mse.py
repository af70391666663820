"""Mean squared error: L = Σ_n Σ_d (X[n, d] − T[n, d])² / (N D)."""

from gradtool.lang import Spec, Sum

spec = Spec("mse", "Mean squared error L = mean((X − T)²)",
            reference="torch.nn.functional.mse_loss", class_name="MSELoss")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
T = spec.input("T", N, D, grad=False)

spec.output("L", [], Sum((X[n, d] - T[n, d]) ** 2, n, d) / (N * D))


@spec.torch_reference
def reference(X, T):
    import torch.nn.functional as F

    return F.mse_loss(X, T)
