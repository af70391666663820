"""Sum over the last axis: Y[n] = Σ_d X[n, d]."""

from gradtool.lang import Spec, Sum

spec = Spec("sum", "Sum over the last axis Y = Σ_d X", reference="X.sum(-1)", class_name="Sum")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)

spec.output("Y", [n], Sum(X[n, d], d))


@spec.torch_reference
def reference(X):
    return X.sum(-1)
