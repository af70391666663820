"""Layer norm over the last axis, course-assignment style (params/grads dicts)."""

import numpy as np


class LayerNorm:
    """Correct."""

    def __init__(self, D, eps=1e-5):
        self.eps = eps
        self.params = {"gamma": np.ones(D), "beta": np.zeros(D)}
        self.grads = {}

    def forward(self, X):
        mu = X.mean(axis=1, keepdims=True)
        var = X.var(axis=1, keepdims=True)
        self.rstd = 1.0 / np.sqrt(var + self.eps)
        self.xhat = (X - mu) * self.rstd
        return self.params["gamma"] * self.xhat + self.params["beta"]

    def backward(self, grad_out):
        self.grads["gamma"] = (grad_out * self.xhat).sum(axis=0)
        self.grads["beta"] = grad_out.sum(axis=0)
        g = grad_out * self.params["gamma"]
        return self.rstd * (g - g.mean(axis=1, keepdims=True)
                            - self.xhat * (g * self.xhat).mean(axis=1, keepdims=True))


class LayerNormNoMeanTerm(LayerNorm):
    """Bug: forgets that the variance depends on X (drops x̂·mean(g·x̂))."""

    def backward(self, grad_out):
        self.grads["gamma"] = (grad_out * self.xhat).sum(axis=0)
        self.grads["beta"] = grad_out.sum(axis=0)
        g = grad_out * self.params["gamma"]
        return self.rstd * (g - g.mean(axis=1, keepdims=True))


class LayerNormOneEntryOff(LayerNorm):
    """Bug: one Jacobian entry J[A, B] = ∂Y[A]/∂X[B] is off by 1e-3."""

    A = (5, 7)
    B = (5, 40)

    def backward(self, grad_out):
        dX = super().backward(grad_out)
        dX[self.B] += 1e-3 * grad_out[self.A]
        return dX


class LayerNormWeightBias:
    """Correct, with PyTorch's names: check with --map gamma=weight --map beta=bias."""

    def __init__(self, D, eps=1e-5):
        self.eps = eps
        self.weight, self.bias = np.ones(D), np.zeros(D)

    def forward(self, X):
        mu = X.mean(axis=1, keepdims=True)
        self.rstd = 1.0 / np.sqrt(X.var(axis=1, keepdims=True) + self.eps)
        self.xhat = (X - mu) * self.rstd
        return self.weight * self.xhat + self.bias

    def backward(self, grad_out):
        self.dweight = (grad_out * self.xhat).sum(axis=0)
        self.dbias = grad_out.sum(axis=0)
        g = grad_out * self.weight
        return self.rstd * (g - g.mean(axis=1, keepdims=True)
                            - self.xhat * (g * self.xhat).mean(axis=1, keepdims=True))
