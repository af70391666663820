"""A layer file written as a script: it parses the command line at import, imports a file from
its own folder, and prints while it runs."""

import argparse

import numpy as np
from activation_helpers import sigmoid

parser = argparse.ArgumentParser(description="train a small network")
parser.add_argument("--lr", type=float, default=0.1)
ARGS = parser.parse_args()
print(f"learning rate {ARGS.lr}")


class Sigmoid:
    """Correct."""

    def forward(self, X):
        self.Y = sigmoid(X)
        print("forward", X.shape)
        return self.Y

    def backward(self, grad_out):
        print("backward", grad_out.shape)
        return grad_out * self.Y * (1 - self.Y)


class SigmoidOfInput(Sigmoid):
    """Bug: σ'(x) written as x (1 − x)."""

    def forward(self, X):
        self.X = X
        return super().forward(X)

    def backward(self, grad_out):
        return grad_out * self.X * (1 - self.X)


class SigmoidFloat32(Sigmoid):
    """Correct math, computed in float32: differences at float32's rounding level."""

    def forward(self, X):
        self.Y = sigmoid(X.astype(np.float32))
        return self.Y

    def backward(self, grad_out):
        return grad_out.astype(np.float32) * self.Y * (1 - self.Y)
