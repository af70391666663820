"""Softmax and log-softmax over the last axis."""

import numpy as np


class Softmax:
    """Correct."""

    def forward(self, X):
        e = np.exp(X - X.max(axis=1, keepdims=True))
        self.S = e / e.sum(axis=1, keepdims=True)
        return self.S

    def backward(self, grad_out):
        S = self.S
        return S * (grad_out - (grad_out * S).sum(axis=1, keepdims=True))


class SoftmaxDiagonal(Softmax):
    """Bug: uses only the diagonal of the Jacobian, S·(1 − S)."""

    def backward(self, grad_out):
        return grad_out * self.S * (1 - self.S)


class LogSoftmax:
    """Correct, one row at a time."""

    def forward(self, X):
        shifted = X - X.max(axis=1, keepdims=True)
        self.Y = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return self.Y

    def backward(self, grad_out):
        dX = np.zeros_like(grad_out)
        for n in range(grad_out.shape[0]):
            dX[n] = grad_out[n] - np.exp(self.Y[n]) * grad_out[n].sum()
        return dX


class LogSoftmaxSkipsFirstRow(LogSoftmax):
    """Bug: the loop starts at row 1, so row 0 of the gradient stays zero."""

    def backward(self, grad_out):
        dX = np.zeros_like(grad_out)
        for n in range(1, grad_out.shape[0]):
            dX[n] = grad_out[n] - np.exp(self.Y[n]) * grad_out[n].sum()
        return dX
