"""Fully connected layer Y = X Wᵀ + b (attributes W, b; gradients dW, db)."""

import numpy as np


class Linear:
    """Correct."""

    def __init__(self, I, O):
        self.W = np.random.default_rng(0).standard_normal((O, I)) / np.sqrt(I)
        self.b = np.zeros(O)

    def forward(self, X):
        self.X = X
        return X @ self.W.T + self.b

    def backward(self, grad_out):
        self.dW = grad_out.T @ self.X
        self.db = grad_out.sum(axis=0)
        return grad_out @ self.W


class LinearTransposedDW(Linear):
    """Bug: dW = Xᵀ G, the transpose of the right one (same shape only when I = O)."""

    def backward(self, grad_out):
        self.dW = self.X.T @ grad_out
        self.db = grad_out.sum(axis=0)
        return grad_out @ self.W


class LinearAccumulating(Linear):
    """Bug (contract): adds into the stored gradients instead of overwriting them."""

    def __init__(self, I, O):
        super().__init__(I, O)
        self.dW, self.db = np.zeros((O, I)), np.zeros(O)

    def backward(self, grad_out):
        self.dW += grad_out.T @ self.X
        self.db += grad_out.sum(axis=0)
        return grad_out @ self.W
