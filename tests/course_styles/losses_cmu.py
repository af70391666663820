"""A loss whose backward takes no upstream gradient (the CMU style): backward() → dL/dA."""

import numpy as np


class MSELoss:
    """Correct."""

    def forward(self, A, Y):
        self.A, self.Y = A, Y
        se = (A - Y) * (A - Y)
        return np.sum(se) / A.size

    def backward(self):
        return 2 * (self.A - self.Y) / self.A.size


class MSELossSum(MSELoss):
    """Bug: the gradient of the sum, not of the mean."""

    def backward(self):
        return 2 * (self.A - self.Y)
