"""torch.autograd.Functions as people write them: an optional eps argument, and an in-place
ReLU that marks its input dirty."""

import torch


class BatchNormFunction(torch.autograd.Function):
    """Correct: eps is optional; backward unpacks needs_input_grad into three names."""

    @staticmethod
    def forward(ctx, X, gamma, beta, eps=1e-3):
        mu = X.mean(dim=0)
        var = X.var(dim=0, unbiased=False)
        rstd = 1.0 / torch.sqrt(var + eps)
        xhat = (X - mu) * rstd
        ctx.save_for_backward(xhat, gamma, rstd)
        return gamma * xhat + beta

    @staticmethod
    def backward(ctx, G):
        xhat, gamma, rstd = ctx.saved_tensors
        need_x, need_gamma, need_beta = ctx.needs_input_grad
        g = G * gamma
        dX = rstd * (g - g.mean(dim=0) - xhat * (g * xhat).mean(dim=0)) if need_x else None
        dgamma = (G * xhat).sum(dim=0) if need_gamma else None
        dbeta = G.sum(dim=0) if need_beta else None
        return dX, dgamma, dbeta


class BatchNormFunctionSwapped(BatchNormFunction):
    """Bug: dγ and dβ exchanged."""

    @staticmethod
    def backward(ctx, G):
        dX, dgamma, dbeta = BatchNormFunction.backward(ctx, G)
        return dX, dbeta, dgamma


class ReLUInPlace(torch.autograd.Function):
    """Correct: changes X in place and says so with mark_dirty."""

    @staticmethod
    def forward(ctx, X):
        ctx.mark_dirty(X)
        X.clamp_(min=0)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, G):
        (Y,) = ctx.saved_tensors
        return G * (Y > 0)


class ReLUInPlaceUnmarked(torch.autograd.Function):
    """Bug: changes X in place without mark_dirty."""

    @staticmethod
    def forward(ctx, X):
        X.clamp_(min=0)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, G):
        (Y,) = ctx.saved_tensors
        return G * (Y > 0)
