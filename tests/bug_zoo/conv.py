"""Convolution and max pooling, stride S, padding P, written with loops over output positions
the way course assignments do (attributes weight, bias; gradients dweight, dbias)."""

import numpy as np


def _pad(X, P, fill=0.0):
    return np.pad(X, ((0, 0), (0, 0), (P, P), (P, P)), constant_values=fill)


def _unpad(dXp, P):
    return dXp[:, :, P:dXp.shape[2] - P, P:dXp.shape[3] - P]


class Conv2d:
    """Correct."""

    def __init__(self, S, P, weight=None, bias=None):
        self.S, self.P, self.weight, self.bias = S, P, weight, bias

    def forward(self, X):
        self.Xp = Xp = _pad(X, self.P)
        S, K = self.S, self.weight.shape[2]
        OH, OW = (Xp.shape[2] - K) // S + 1, (Xp.shape[3] - K) // S + 1
        Y = np.zeros((X.shape[0], self.weight.shape[0], OH, OW))
        for i in range(OH):
            for j in range(OW):
                patch = Xp[:, :, i * S:i * S + K, j * S:j * S + K]
                Y[:, :, i, j] = np.tensordot(patch, self.weight, axes=([1, 2, 3], [1, 2, 3])) \
                    + self.bias
        return Y

    def backward(self, grad_out):
        Xp, S, K = self.Xp, self.S, self.weight.shape[2]
        dXp = np.zeros_like(Xp)
        self.dweight = np.zeros_like(self.weight)
        self.dbias = grad_out.sum(axis=(0, 2, 3))
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                g = grad_out[:, :, i, j]
                window = (slice(None), slice(None), slice(i * S, i * S + K),
                          slice(j * S, j * S + K))
                self.dweight += np.tensordot(g, Xp[window], axes=([0], [0]))
                self.put(dXp, window, np.tensordot(g, self.weight, axes=([1], [0])))
        return _unpad(dXp, self.P)

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
    """Correct: each window's gradient goes to its first maximum in row-major order, as
    F.max_pool2d's does (padding reads −∞)."""

    def __init__(self, K, S, P):
        self.K, self.S, self.P = K, S, P

    def forward(self, X):
        self.Xp = Xp = _pad(X, self.P, -np.inf)
        K, S = self.K, self.S
        OH, OW = (Xp.shape[2] - K) // S + 1, (Xp.shape[3] - K) // S + 1
        Y = np.zeros(X.shape[:2] + (OH, OW))
        for i in range(OH):
            for j in range(OW):
                Y[:, :, i, j] = Xp[:, :, i * S:i * S + K, j * S:j * S + K].max(axis=(2, 3))
        self.Y = Y
        return Y

    def backward(self, grad_out):
        Xp, K, S = self.Xp, self.K, self.S
        dXp = np.zeros_like(Xp)
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                window = Xp[:, :, i * S:i * S + K, j * S:j * S + K]
                first = window.reshape(window.shape[:2] + (-1,)).argmax(axis=2)
                mask = np.zeros(window.shape[:2] + (K * K,))
                np.put_along_axis(mask, first[:, :, None], 1.0, axis=2)
                dXp[:, :, i * S:i * S + K, j * S:j * S + K] += \
                    mask.reshape(window.shape) * grad_out[:, :, i, j][:, :, None, None]
        return _unpad(dXp, self.P)


class MaxPool2dAllTies(MaxPool2d):
    """Bug: at tied maxima (an all-zero window after a ReLU) every tie gets the window's
    gradient, k·G in all for k ties; right wherever the maximum is unique."""

    def backward(self, grad_out):
        Xp, K, S = self.Xp, self.K, self.S
        dXp = np.zeros_like(Xp)
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                window = Xp[:, :, i * S:i * S + K, j * S:j * S + K]
                mask = window == self.Y[:, :, i, j][:, :, None, None]
                dXp[:, :, i * S:i * S + K, j * S:j * S + K] += \
                    mask * grad_out[:, :, i, j][:, :, None, None]
        return _unpad(dXp, self.P)


class MaxPool2dEveryElement(MaxPool2d):
    """Bug: the window's gradient goes to every element, as if the pooling were a sum."""

    def backward(self, grad_out):
        Xp, K, S = self.Xp, self.K, self.S
        dXp = np.zeros_like(Xp)
        for i in range(grad_out.shape[2]):
            for j in range(grad_out.shape[3]):
                dXp[:, :, i * S:i * S + K, j * S:j * S + K] += \
                    grad_out[:, :, i, j][:, :, None, None]
        return _unpad(dXp, self.P)
