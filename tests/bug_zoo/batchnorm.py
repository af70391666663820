"""Batch norm in training mode with running statistics (attributes, d<name> gradients)."""

import numpy as np


class BatchNorm:
    """Correct."""

    def __init__(self, C, eps=1e-5, momentum=0.1):
        self.eps, self.momentum = eps, momentum
        self.gamma, self.beta = np.ones(C), np.zeros(C)
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)

    def forward(self, X):
        N = X.shape[0]
        mu, var = X.mean(axis=0), X.var(axis=0)
        self.rstd = 1.0 / np.sqrt(var + self.eps)
        self.xhat = (X - mu) * self.rstd
        m = self.momentum
        self.running_mean = (1 - m) * self.running_mean + m * mu
        self.running_var = (1 - m) * self.running_var + m * var * N / (N - 1)
        return self.gamma * self.xhat + self.beta

    def _means(self, g):
        return g.mean(axis=0), (g * self.xhat).mean(axis=0)

    def backward(self, grad_out):
        self.dgamma = (grad_out * self.xhat).sum(axis=0)
        self.dbeta = grad_out.sum(axis=0)
        g = grad_out * self.gamma
        mean_g, mean_gx = self._means(g)
        return self.rstd * (g - mean_g - self.xhat * mean_gx)


class BatchNormWrongN(BatchNorm):
    """Bug: the backward's batch means divide by N − 1 (the unbiased count)."""

    def _means(self, g):
        n = g.shape[0] - 1
        return g.sum(axis=0) / n, (g * self.xhat).sum(axis=0) / n
