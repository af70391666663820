"""Batch norm the CMU way: γ and β as BW, Bb of shape (1, C), eps = 1e-8 as an attribute,
alpha = 0.9 (PyTorch's momentum 0.1), gradients dLdBW and dLdBb, running_M and running_V."""

import numpy as np


class BatchNorm1d:
    """Correct."""

    def __init__(self, num_features, alpha=0.9):
        self.alpha = alpha
        self.eps = 1e-8
        self.BW = np.ones((1, num_features))
        self.Bb = np.zeros((1, num_features))
        self.running_M = np.zeros((1, num_features))
        self.running_V = np.ones((1, num_features))

    def forward(self, Z):
        self.Z = Z
        self.N = Z.shape[0]
        self.M = np.mean(Z, axis=0, keepdims=True)
        self.V = np.var(Z, axis=0, keepdims=True)
        self.NZ = (Z - self.M) / np.sqrt(self.V + self.eps)
        self.running_M = self.alpha * self.running_M + (1 - self.alpha) * self.M
        self.running_V = self.alpha * self.running_V + (1 - self.alpha) * self._running_variance()
        return self.BW * self.NZ + self.Bb

    def _running_variance(self):
        return self.V * self.N / (self.N - 1)  # unbiased, as PyTorch

    def backward(self, dLdBZ):
        self.dLdBW = np.sum(dLdBZ * self.NZ, axis=0, keepdims=True)
        self.dLdBb = np.sum(dLdBZ, axis=0, keepdims=True)
        dLdNZ = dLdBZ * self.BW
        inv = 1.0 / np.sqrt(self.V + self.eps)
        mean_g = np.mean(dLdNZ, axis=0, keepdims=True)
        mean_gx = np.mean(dLdNZ * self.NZ, axis=0, keepdims=True)
        return inv * (dLdNZ - mean_g - self.NZ * mean_gx)


class BatchNorm1dSwapped(BatchNorm1d):
    """Bug: dγ and dβ exchanged."""

    def backward(self, dLdBZ):
        dLdZ = super().backward(dLdBZ)
        self.dLdBW, self.dLdBb = self.dLdBb, self.dLdBW
        return dLdZ


class BatchNorm1dNoEpsInBackward(BatchNorm1d):
    """Bug: eps dropped from the backward's 1/σ (eps = 1e-5 here, so that it matters)."""

    def __init__(self, num_features, alpha=0.9):
        super().__init__(num_features, alpha)
        self.eps = 1e-5

    def backward(self, dLdBZ):
        self.dLdBW = np.sum(dLdBZ * self.NZ, axis=0, keepdims=True)
        self.dLdBb = np.sum(dLdBZ, axis=0, keepdims=True)
        dLdNZ = dLdBZ * self.BW
        inv = 1.0 / np.sqrt(self.V)
        mean_g = np.mean(dLdNZ, axis=0, keepdims=True)
        mean_gx = np.mean(dLdNZ * self.NZ, axis=0, keepdims=True)
        return inv * (dLdNZ - mean_g - self.NZ * mean_gx)



class BatchNorm1dBiased(BatchNorm1d):
    """Correct for a course that keeps the biased variance in running_V
    (checked with --set correction=0)."""

    def _running_variance(self):
        return self.V
