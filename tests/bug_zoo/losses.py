"""Losses: forward returns a scalar, backward(grad_out=1.0) returns dX."""

import numpy as np


class MSE:
    """Correct: L = mean((X − T)²)."""

    def forward(self, X, T):
        self.diff = X - T
        return float(np.mean(self.diff ** 2))

    def backward(self, grad_out=1.0):
        return grad_out * 2 * self.diff / self.diff.size


class MSESum(MSE):
    """Bug: the gradient of the sum, not the mean."""

    def backward(self, grad_out=1.0):
        return grad_out * 2 * self.diff


class MSENoTwo(MSE):
    """Bug: forgets the 2 from the square."""

    def backward(self, grad_out=1.0):
        return grad_out * self.diff / self.diff.size


class MSEWrongSign(MSE):
    """Bug: (T − X) instead of (X − T)."""

    def backward(self, grad_out=1.0):
        return grad_out * 2 * -self.diff / self.diff.size


class CrossEntropy:
    """Correct: L = −Σ T·log(X) / N on probabilities X."""

    def forward(self, X, T):
        self.X, self.T = X, T
        return float(-(T * np.log(X)).sum() / X.shape[0])

    def backward(self, grad_out=1.0):
        return -grad_out * self.T / self.X / self.X.shape[0]


class CrossEntropyNoMean(CrossEntropy):
    """Bug: forgets the 1/N of the batch mean."""

    def backward(self, grad_out=1.0):
        return -grad_out * self.T / self.X


class MSEIgnoresUpstream(MSE):
    """Bug: drops grad_out (right only when the loss is the last node, with grad_out = 1)."""

    def backward(self, grad_out=1.0):
        return 2 * self.diff / self.diff.size
