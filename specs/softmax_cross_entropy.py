"""Softmax + cross-entropy on logits: L = −(1/N) Σ_n Σ_c T[n, c] log softmax(X)[n, c]."""

from gradtool.lang import Spec, Sum, exp, log

spec = Spec("softmax_cross_entropy", "Softmax cross-entropy of logits X against soft targets T, "
            "L = −Σ T·log(softmax(X)) / N",
            reference="torch.nn.functional.cross_entropy (soft targets)",
            class_name="SoftmaxCrossEntropy")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
T = spec.input("T", N, C, grad=False, domain="positive")
spec.fact(Sum(T[n, k], k), 1)  # each row of T sums to one

e = spec.let("e", [n, c], exp(X[n, c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
P = spec.let("P", [n, c], e[n, c] / Z[n])
spec.output("L", [], -Sum(T[n, c] * log(P[n, c]), n, c) / N)


@spec.torch_reference
def reference(X, T):
    import torch.nn.functional as F

    # class probabilities as targets (torch >= 1.10): mean over the batch of −Σ_c T·log_softmax
    return F.cross_entropy(X, T)
