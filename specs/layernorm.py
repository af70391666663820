"""Layer norm over the last axis: Y = gamma · (X − mean_d X) / sqrt(var_d X + eps) + beta."""

from gradtool.lang import Spec, Sum, sqrt

spec = Spec("layernorm", "Layer normalisation over the last axis",
            reference="torch.nn.functional.layer_norm", class_name="LayerNorm")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
gamma = spec.param("gamma", D, init="ones")
beta = spec.param("beta", D, init="zeros")
eps = spec.hyper("eps", 1e-5, domain="positive")

mu = spec.let("mu", [n], Sum(X[n, d], d) / D)
xc = spec.let("xc", [n, d], X[n, d] - mu[n])
var = spec.let("var", [n], Sum(xc[n, d] ** 2, d) / D)
rstd = spec.let("rstd", [n], 1 / sqrt(var[n] + eps))
xhat = spec.let("xhat", [n, d], xc[n, d] * rstd[n])
spec.output("Y", [n, d], gamma[d] * xhat[n, d] + beta[d])


@spec.torch_reference
def reference(X, gamma, beta, eps):
    import torch.nn.functional as F

    return F.layer_norm(X, X.shape[-1:], gamma, beta, eps)
