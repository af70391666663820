"""Group normalisation: the C = G·Cg channels split into G groups of Cg; each group is
normalised over its channels and the length axis, then scaled and shifted per channel:
Y[n, g, q, l] = gamma[c] · (X[n, c, l] − mean) / sqrt(var + eps) + beta[c] with c = g·Cg + q.
The output keeps the split channel axis (N, G, Cg, L); reshape it to (N, C, L)."""

from gradtool.lang import Spec, Sum, sqrt

spec = Spec("groupnorm", "Group normalisation, C = G·Cg channels in G groups",
            reference="torch.nn.functional.group_norm", class_name="GroupNorm")
N, G, Cg, L = spec.dims("N G Cg L")
n, g, q, l = spec.indices(n=N, g=G, q=Cg, l=L)
c = spec.indices(c=G * Cg)  # names the channel axis in the gradients: dX[n, c, l], dgamma[c]
X = spec.input("X", N, G * Cg, L)
gamma = spec.param("gamma", G * Cg, init="ones")
beta = spec.param("beta", G * Cg, init="zeros")
eps = spec.hyper("eps", 1e-5, domain="positive")

mu = spec.let("mu", [n, g], Sum(X[n, g * Cg + q, l], q, l) / (Cg * L))
xc = spec.let("xc", [n, g, q, l], X[n, g * Cg + q, l] - mu[n, g])
var = spec.let("var", [n, g], Sum(xc[n, g, q, l] ** 2, q, l) / (Cg * L))
rstd = spec.let("rstd", [n, g], 1 / sqrt(var[n, g] + eps))
xhat = spec.let("xhat", [n, g, q, l], xc[n, g, q, l] * rstd[n, g])
spec.output("Y", [n, g, q, l], gamma[g * Cg + q] * xhat[n, g, q, l] + beta[g * Cg + q])


@spec.torch_reference
def reference(X, gamma, beta, eps, G, Cg):
    import torch.nn.functional as F

    N, _, L = X.shape
    return F.group_norm(X, G, gamma, beta, eps).reshape(N, G, Cg, L)
