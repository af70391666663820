"""Layers that cannot be checked at all, for the ``--impl`` error messages (spec: layernorm)."""

import numpy as np


class LayerNorm:
    """Correct; the classes below each break one thing gradtool needs."""

    def __init__(self, D, eps=1e-5):
        self.eps = eps
        self.params = {"gamma": np.ones(D), "beta": np.zeros(D)}
        self.grads = {}

    def forward(self, X):
        self.rstd = 1.0 / np.sqrt(X.var(axis=1, keepdims=True) + self.eps)
        self.xhat = (X - X.mean(axis=1, keepdims=True)) * self.rstd
        return self.params["gamma"] * self.xhat + self.params["beta"]

    def backward(self, grad_out):
        self.grads["gamma"] = (grad_out * self.xhat).sum(axis=0)
        self.grads["beta"] = grad_out.sum(axis=0)
        g = grad_out * self.params["gamma"]
        return self.rstd * (g - g.mean(axis=1, keepdims=True)
                            - self.xhat * (g * self.xhat).mean(axis=1, keepdims=True))


class NeedsHiddenSize(LayerNorm):
    """__init__ needs an argument the spec does not have."""

    def __init__(self, D, hidden_size, eps=1e-5):
        super().__init__(D, eps)


class TransposedOutput(LayerNorm):
    """forward returns (D, N) instead of (N, D)."""

    def forward(self, X):
        return super().forward(X).T


class NaNBackward(LayerNorm):
    """backward returns NaN."""

    def backward(self, grad_out):
        return super().backward(grad_out) * np.nan


class ForwardRaises(LayerNorm):
    def forward(self, X):
        raise ValueError("operands could not be broadcast together")


class BackwardWrongSignature(LayerNorm):
    """backward expects the cache as a second argument."""

    def backward(self, grad_out, cache):
        return super().backward(grad_out)


class NoBackward:
    """Not a layer: forward only."""

    def forward(self, X):
        return X
