"""GELU, exact form (Hendrycks & Gimpel 2016): Y = X·Φ(X) = ½·X·(1 + erf(X/√2))."""

from gradtool.lang import Rational, Spec, erf, sqrt

spec = Spec("gelu", "Gaussian error linear unit, exact erf form Y = X·Φ(X)",
            reference="torch.nn.functional.gelu (approximate='none')", class_name="GELU")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n, d], Rational(1, 2) * X[n, d] * (1 + erf(X[n, d] / sqrt(2))))


@spec.torch_reference
def reference(X):
    import torch.nn.functional as F

    return F.gelu(X)
