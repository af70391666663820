"""Convolution and max pooling, stride S, no padding, written with loops over output positions
the way course assignments do (attributes W, b; gradients dW, db)."""

import numpy as np


class Conv2d:
    """Correct."""

    def __init__(self, S, W=None, b=None):
        self.S, self.W, self.b = S, W, b

    def forward(self, X):
        self.X = X
        S, K = self.S, self.W.shape[2]
        OH, OW = (X.shape[2] - K) // S + 1, (X.shape[3] - K) // S + 1
        Y = np.zeros((X.shape[0], self.W.shape[0], OH, OW))
        for i in range(OH):
            for j in range(OW):
                patch = X[:, :, i * S:i * S + K, j * S:j * S + K]
                Y[:, :, i, j] = np.tensordot(patch, self.W, axes=([1, 2, 3], [1, 2, 3])) + self.b
        return Y

    def backward(self, grad_out):
        X, S, K = self.X, self.S, self.W.shape[2]
        dX = np.zeros_like(X)
        self.dW = np.zeros_like(self.W)
        self.db = grad_out.sum(axis=(0, 2, 3))
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                g = grad_out[:, :, i, j]
                window = (slice(None), slice(None), slice(i * S, i * S + K),
                          slice(j * S, j * S + K))
                self.dW += np.tensordot(g, X[window], axes=([0], [0]))
                self.put(dX, window, np.tensordot(g, self.W, axes=([1], [0])))
        return dX

    @staticmethod
    def put(dX, window, value):
        dX[window] += value


class Conv2dOverwritesOverlap(Conv2d):
    """Bug: dX[window] = … instead of +=: where windows overlap (S < K), only the last
    window's contribution survives."""

    @staticmethod
    def put(dX, window, value):
        dX[window] = value


class MaxPool2d:
    """Correct: each window's gradient goes to its maximum."""

    def __init__(self, K, S):
        self.K, self.S = K, S

    def forward(self, X):
        self.X = X
        K, S = self.K, self.S
        OH, OW = (X.shape[2] - K) // S + 1, (X.shape[3] - K) // S + 1
        Y = np.zeros(X.shape[:2] + (OH, OW))
        for i in range(OH):
            for j in range(OW):
                Y[:, :, i, j] = X[:, :, i * S:i * S + K, j * S:j * S + K].max(axis=(2, 3))
        self.Y = Y
        return Y

    def backward(self, grad_out):
        X, K, S = self.X, self.K, self.S
        dX = np.zeros_like(X)
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                window = X[:, :, i * S:i * S + K, j * S:j * S + K]
                mask = window == self.Y[:, :, i, j][:, :, None, None]
                dX[:, :, i * S:i * S + K, j * S:j * S + K] += \
                    mask * grad_out[:, :, i, j][:, :, None, None]
        return dX


class MaxPool2dEveryElement(MaxPool2d):
    """Bug: the window's gradient goes to every element, as if the pooling were a sum."""

    def backward(self, grad_out):
        X, K, S = self.X, self.K, self.S
        dX = np.zeros_like(X)
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                dX[:, :, i * S:i * S + K, j * S:j * S + K] += \
                    grad_out[:, :, i, j][:, :, None, None]
        return dX
