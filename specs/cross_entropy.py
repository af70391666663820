"""Cross-entropy on probabilities: L = −(1/N) Σ_n Σ_c T[n, c] log X[n, c]."""

from gradtool.lang import Spec, Sum, log

spec = Spec("cross_entropy", "Cross-entropy of probabilities X against targets T, "
            "L = −Σ T·log(X) / N",
            reference="torch.nn.functional.nll_loss(log(X))", class_name="CrossEntropy")
N, C = spec.dims("N C")
n, c = spec.indices(n=N, c=C)
X = spec.input("X", N, C, domain="unit")
T = spec.input("T", N, C, grad=False, domain="unit")

spec.output("L", [], -Sum(T[n, c] * log(X[n, c]), n, c) / N)


@spec.torch_reference
def reference(X, T):
    import torch

    # nll_loss takes class indices only; for soft targets (rows of T are not one-hot, and rows
    # of X need not sum to one) the reference is torch.special.xlogy, T·log X, summed and
    # averaged over the batch.
    return -torch.special.xlogy(T, X).sum() / X.shape[0]
