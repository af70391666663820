"""Batch normalisation over channels (BatchNorm2d): each channel c is normalised with the
mean and variance of its N·H·W values, then scaled and shifted,
Y[n, c, h, w] = gamma[c] · (X[n, c, h, w] − mean) / sqrt(var + eps) + beta[c] in training;
at eval the running statistics take the place of the batch's (Ioffe and Szegedy 2015)."""

from gradtool.lang import Spec, Sum, sqrt

spec = Spec("batchnorm2d", "Batch normalisation over channels of (N, C, H, W) images "
            "(eval: running statistics)", reference="torch.nn.functional.batch_norm",
            class_name="BatchNorm2d")
N, C, H, W = spec.dims("N C H W")
n, c, h, w = spec.indices(n=N, c=C, h=H, w=W)
X = spec.input("X", N, C, H, W)
gamma = spec.param("gamma", C, init="ones")
beta = spec.param("beta", C, init="zeros")
eps = spec.hyper("eps", 1e-5, domain="positive")
momentum = spec.hyper("momentum", 0.1, domain="unit")
# Bessel's correction of the running variance (see batchnorm.py): 1 is PyTorch's
correction = spec.hyper("correction", 1, domain="nonnegative")
running_mean = spec.state("running_mean", C, init="zeros")
running_var = spec.state("running_var", C, init="ones")
M = N * H * W  # values per channel
# the unbiased running variance divides by M − 1: training needs two values per channel
# (one image of 2×2 is enough, as for nn.BatchNorm2d)
spec.require(M >= 2, training=True)

mu = spec.let("mu", [c], Sum(X[n, c, h, w], n, h, w) / M)
xc = spec.let("xc", [n, c, h, w], X[n, c, h, w] - mu[c])
var = spec.let("var", [c], Sum(xc[n, c, h, w] ** 2, n, h, w) / M)
std = spec.let("std", [c], sqrt(var[c] + eps))
xhat = spec.let("xhat", [n, c, h, w], xc[n, c, h, w] / std[c])
spec.output("Y", [n, c, h, w], gamma[c] * xhat[n, c, h, w] + beta[c])

spec.update("running_mean", [c], (1 - momentum) * running_mean[c] + momentum * mu[c])
spec.update("running_var", [c],
            (1 - momentum) * running_var[c] + momentum * var[c] * M / (M - correction))

spec.eval_output("Y", [n, c, h, w], gamma[c] * (X[n, c, h, w] - running_mean[c])
                 / sqrt(running_var[c] + eps) + beta[c])


@spec.torch_reference
def reference(X, gamma, beta, running_mean, running_var, eps, momentum, correction):
    import torch
    import torch.nn.functional as F

    # updates running_mean / running_var in place, running_var with the unbiased variance
    if correction == 1:
        return F.batch_norm(X, running_mean, running_var, gamma, beta, training=True,
                            momentum=momentum, eps=eps)
    m = X.numel() // X.shape[1]
    Y = F.batch_norm(X, running_mean, running_var.clone(), gamma, beta, training=True,
                     momentum=momentum, eps=eps)
    with torch.no_grad():
        batch = X.var(dim=(0, 2, 3), unbiased=False) * m / (m - correction)
        running_var.mul_(1 - momentum).add_(momentum * batch)
    return Y


@spec.eval_reference
def eval_reference(X, gamma, beta, running_mean, running_var, eps):
    import torch.nn.functional as F

    return F.batch_norm(X, running_mean, running_var, gamma, beta, training=False, eps=eps)
