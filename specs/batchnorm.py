"""Batch normalisation: Y = gamma · (X − mean_n X) / sqrt(var_n X + eps) + beta in training;
at eval the running statistics take the place of the batch's."""

from gradtool.lang import Spec, Sum, sqrt

spec = Spec("batchnorm", "Batch normalisation over the batch axis (eval: running statistics)",
            reference="torch.nn.functional.batch_norm", class_name="BatchNorm1d")
N, C = spec.dims("N C")
n, c = spec.indices(n=N, c=C)
spec.min_size(N=2)  # the unbiased running variance divides by N − 1
X = spec.input("X", N, C)
gamma = spec.param("gamma", C, init="ones")
beta = spec.param("beta", C, init="zeros")
eps = spec.hyper("eps", 1e-5, domain="positive")
momentum = spec.hyper("momentum", 0.1, domain="unit")
# Bessel's correction of the running variance, as torch.var's `correction`: 1 keeps the
# unbiased variance (PyTorch), 0 the biased one (some course assignments)
correction = spec.hyper("correction", 1, domain="nonnegative")
running_mean = spec.state("running_mean", C, init="zeros")
running_var = spec.state("running_var", C, init="ones")

mu = spec.let("mu", [c], Sum(X[n, c], n) / N)
xc = spec.let("xc", [n, c], X[n, c] - mu[c])
var = spec.let("var", [c], Sum(xc[n, c] ** 2, n) / N)
std = spec.let("std", [c], sqrt(var[c] + eps))
xhat = spec.let("xhat", [n, c], xc[n, c] / std[c])
spec.output("Y", [n, c], gamma[c] * xhat[n, c] + beta[c])

spec.update("running_mean", [c], (1 - momentum) * running_mean[c] + momentum * mu[c])
spec.update("running_var", [c],
            (1 - momentum) * running_var[c] + momentum * var[c] * N / (N - correction))

spec.eval_output("Y", [n, c], gamma[c] * (X[n, c] - running_mean[c])
                 / sqrt(running_var[c] + eps) + beta[c])


@spec.torch_reference
def reference(X, gamma, beta, running_mean, running_var, eps, momentum, correction):
    import torch
    import torch.nn.functional as F

    # updates running_mean / running_var in place, running_var with the unbiased variance;
    # another correction divides the batch's variance by N − correction instead of N − 1
    if correction == 1:
        return F.batch_norm(X, running_mean, running_var, gamma, beta, training=True,
                            momentum=momentum, eps=eps)
    n = X.shape[0]
    Y = F.batch_norm(X, running_mean, running_var.clone(), gamma, beta, training=True,
                     momentum=momentum, eps=eps)
    with torch.no_grad():
        batch = X.var(dim=0, unbiased=False) * n / (n - correction)
        running_var.mul_(1 - momentum).add_(momentum * batch)
    return Y


@spec.eval_reference
def eval_reference(X, gamma, beta, running_mean, running_var, eps):
    import torch.nn.functional as F

    return F.batch_norm(X, running_mean, running_var, gamma, beta, training=False, eps=eps)
