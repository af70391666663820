"""Exponential linear unit: Y = X if X > 0 else alpha · (e^X − 1)."""

from gradtool.lang import Piecewise, Spec, exp

spec = Spec("elu", "Exponential linear unit Y = X if X > 0 else alpha·(exp(X) − 1)",
            reference="torch.nn.functional.elu", class_name="ELU")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
alpha = spec.hyper("alpha", 1.0)

spec.output("Y", [n, d], Piecewise((X[n, d], X[n, d] > 0), (alpha * (exp(X[n, d]) - 1), True)))


@spec.torch_reference
def reference(X, alpha):
    import torch.nn.functional as F

    return F.elu(X, alpha=alpha)
