"""Softmax cross-entropy of logits against integer class labels, as ``F.cross_entropy(X, y)``:
L = −(1/N) Σ_n log softmax(X)[n, y[n]] = −(1/N) Σ_n Σ_c δ(c, y[n]) log softmax(X)[n, c]."""

from gradtool.lang import Spec, Sum, exp, log

spec = Spec("softmax_cross_entropy_labels", "Softmax cross-entropy of logits X against integer "
            "labels y, L = −Σ log(softmax(X)[n, y[n]]) / N",
            reference="torch.nn.functional.cross_entropy(X, y)",
            class_name="SoftmaxCrossEntropyLabels")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
y = spec.labels("y", N, classes=C)  # integers in 0 .. C-1
T = spec.onehot(y)                  # T[n, c] = δ(c, y[n]); each row sums to one

e = spec.let("e", [n, c], exp(X[n, c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
P = spec.let("P", [n, c], e[n, c] / Z[n])
spec.output("L", [], -Sum(T[n, c] * log(P[n, c]), n, c) / N)


@spec.torch_reference
def reference(X, y):
    import torch.nn.functional as F

    return F.cross_entropy(X, y)
