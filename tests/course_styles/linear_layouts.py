"""Fully connected layers in the layouts courses use: W as (in, out) with a (1, out) bias in a
``params``/``grads`` dict, and the CMU style with W as (out, in), b as (out, 1), dLdW, dLdb."""

import numpy as np


class LinearModule:
    """Correct: Y = X W + b with W of shape (in, out)."""

    def __init__(self, in_features, out_features):
        rng = np.random.default_rng(0)
        self.params = {"weight": rng.standard_normal((in_features, out_features)) * 0.1,
                       "bias": np.zeros((1, out_features))}
        self.grads = {"weight": None, "bias": None}

    def forward(self, x):
        self.x = x
        return x @ self.params["weight"] + self.params["bias"]

    def backward(self, dout):
        self.grads["weight"] = self.x.T @ dout
        self.grads["bias"] = dout.sum(axis=0, keepdims=True)
        return dout @ self.params["weight"].T


class LinearModuleMeanBias(LinearModule):
    """Bug: the bias gradient averages over the batch."""

    def backward(self, dout):
        dx = super().backward(dout)
        self.grads["bias"] = dout.mean(axis=0, keepdims=True)
        return dx


class Linear:
    """Correct, CMU style: Z = A Wᵀ + bᵀ with b of shape (out, 1)."""

    def __init__(self, in_features, out_features):
        self.W = np.zeros((out_features, in_features))
        self.b = np.zeros((out_features, 1))

    def forward(self, A):
        self.A = A
        self.Ones = np.ones((A.shape[0], 1))
        return A @ self.W.T + self.Ones @ self.b.T

    def backward(self, dLdZ):
        self.dLdW = dLdZ.T @ self.A
        self.dLdb = dLdZ.T @ self.Ones
        return dLdZ @ self.W


class LinearWrongSign(Linear):
    """Bug: dLdA with the wrong sign."""

    def backward(self, dLdZ):
        return -super().backward(dLdZ)
