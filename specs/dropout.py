"""Inverted dropout with a given mask: Y = X · M / (1 − p)."""

from gradtool.lang import Spec

spec = Spec("dropout", "Inverted dropout with a fixed 0/1 mask M, Y = X·M / (1 − p)",
            reference="X * M / (1 - p)")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
M = spec.input("M", N, D, grad=False, domain="binary")
p = spec.hyper("p", 0.5)

spec.output("Y", [n, d], X[n, d] * M[n, d] / (1 - p))


@spec.torch_reference
def reference(X, M, p):
    # F.dropout draws its own mask; with the mask given, inverted dropout is this formula
    return X * M / (1 - p)
