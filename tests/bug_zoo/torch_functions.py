"""torch.autograd.Function layers: forward(ctx, ...) arguments named after the spec."""

import torch


class Tanh(torch.autograd.Function):
    """Correct."""

    @staticmethod
    def forward(ctx, X):
        Y = torch.tanh(X)
        ctx.save_for_backward(X, Y)
        return Y

    @staticmethod
    def backward(ctx, G):
        X, Y = ctx.saved_tensors
        return G * (1 - Y ** 2)


class TanhOfX(Tanh):
    """Bug: 1 − x² instead of 1 − tanh(x)²."""

    @staticmethod
    def backward(ctx, G):
        X, Y = ctx.saved_tensors
        return G * (1 - X ** 2)


class LeakyReLU(torch.autograd.Function):
    """Correct."""

    @staticmethod
    def forward(ctx, X, slope):
        ctx.save_for_backward(X)
        ctx.slope = slope
        return torch.where(X > 0, X, slope * X)

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        return torch.where(X > 0, G, ctx.slope * G), None


class LeakyReLUWrongSide(LeakyReLU):
    """Bug: the slope applied where x > 0 and 1 where x < 0."""

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        return torch.where(X > 0, ctx.slope * G, G), None


class SoftmaxCrossEntropy(torch.autograd.Function):
    """Correct: L = −Σ T·log softmax(X) / N; rows of T sum to one."""

    @staticmethod
    def forward(ctx, X, T):
        logp = torch.log_softmax(X, dim=1)
        ctx.save_for_backward(logp.exp(), T)
        return -(T * logp).sum() / X.shape[0]

    @staticmethod
    def backward(ctx, G):
        P, T = ctx.saved_tensors
        return G * (P - T) / P.shape[0], None


class SoftmaxCrossEntropyNoMean(SoftmaxCrossEntropy):
    """Bug: returns P − T without the 1/N."""

    @staticmethod
    def backward(ctx, G):
        P, T = ctx.saved_tensors
        return G * (P - T), None
