"""RMSNorm: Y = g · X / sqrt(mean_d X² + eps)."""
from gradtool.lang import Spec, Sum, sqrt

spec = Spec("rmsnorm", "Root-mean-square normalisation over the last axis")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
g = spec.param("g", D, init="ones")
eps = spec.hyper("eps", 1e-6, domain="positive")

rrms = spec.let("rrms", [n], 1 / sqrt(Sum(X[n, d] ** 2, d) / D + eps))
spec.output("Y", [n, d], g[d] * X[n, d] * rrms[n])
