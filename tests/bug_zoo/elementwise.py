"""Element-wise layers: sigmoid, relu, leaky relu, elu, dropout, division."""

import numpy as np


class Sigmoid:
    """Correct."""

    def forward(self, X):
        self.X = X
        self.s = 1.0 / (1.0 + np.exp(-X))
        return self.s

    def backward(self, grad_out):
        return grad_out * self.s * (1 - self.s)


class SigmoidOfX(Sigmoid):
    """Bug: σ'(x) written with x instead of σ(x)."""

    def backward(self, grad_out):
        return grad_out * self.X * (1 - self.X)


class ReLU:
    """Correct."""

    def forward(self, X):
        self.mask = X > 0
        return X * self.mask

    def backward(self, grad_out):
        return grad_out * self.mask


class ReLUWrongMask(ReLU):
    """Bug: the comparison is flipped, so the gradient flows where x < 0."""

    def backward(self, grad_out):
        return grad_out * ~self.mask


class ReLUInPlace(ReLU):
    """Bug (contract): the right numbers, but it zeroes grad_out in place."""

    def backward(self, grad_out):
        grad_out[~self.mask] = 0
        return grad_out


class ELU:
    """Correct."""

    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def forward(self, X):
        self.X = X
        return np.where(X > 0, X, self.alpha * (np.exp(X) - 1))

    def backward(self, grad_out):
        return grad_out * np.where(self.X > 0, 1.0, self.alpha * np.exp(self.X))


class ELUAlphaX(ELU):
    """Bug: the negative side's slope written as alpha·x instead of alpha·e^x."""

    def backward(self, grad_out):
        return grad_out * np.where(self.X > 0, 1.0, self.alpha * self.X)


class Dropout:
    """Correct (inverted dropout with a given mask)."""

    def __init__(self, p=0.5):
        self.p = p

    def forward(self, X, M):
        self.M = M
        return X * M / (1 - self.p)

    def backward(self, grad_out):
        return grad_out * self.M / (1 - self.p)


class DropoutNoRescale(Dropout):
    """Bug: forgets the 1/(1 − p) in the backward."""

    def backward(self, grad_out):
        return grad_out * self.M


class Div:
    """Correct: Z = X / Y, backward returns (dX, dY)."""

    def forward(self, X, Y):
        self.X, self.Y = X, Y
        return X / Y

    def backward(self, grad_out):
        return grad_out / self.Y, -grad_out * self.X / self.Y ** 2


class DivNoSquare(Div):
    """Bug: dY = −G·X/Y, the 1/Y² became 1/Y."""

    def backward(self, grad_out):
        return grad_out / self.Y, -grad_out * self.X / self.Y
