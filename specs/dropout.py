"""Inverted dropout: Y = X · M / (1 − p) in training, with M drawn 1 with probability 1 − p;
the identity at eval."""

from gradtool.lang import Spec

spec = Spec("dropout", "Inverted dropout Y = X·M / (1 − p), M ~ Bernoulli(1 − p); "
            "the identity at eval", reference="X * M / (1 - p)", class_name="Dropout")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
p = spec.hyper("p", 0.5, domain="unit")
M = spec.mask("M", N, D, keep=1 - p)

spec.output("Y", [n, d], X[n, d] * M[n, d] / (1 - p))
spec.eval_output("Y", [n, d], X[n, d])


@spec.torch_reference
def reference(X, M, p):
    # F.dropout draws its own mask; with the mask given, inverted dropout is this formula
    return X * M / (1 - p)


@spec.eval_reference
def eval_reference(X, p):
    import torch.nn.functional as F

    return F.dropout(X, p, training=False)
