"""Cross-entropy modules written the way course assignments write them: ``backward(x, y)``
takes the inputs again and no upstream gradient; probabilities, not logits."""

import numpy as np


class CrossEntropyModule:
    """Correct: soft or one-hot targets, an epsilon stabiliser in the log and the division."""

    def forward(self, x, y):
        return -np.sum(y * np.log(x + 1e-10)) / x.shape[0]

    def backward(self, x, y):
        return -y / (x + 1e-10) / x.shape[0]


class CrossEntropyModuleNoMean(CrossEntropyModule):
    """Bug: the backward forgets the batch mean."""

    def backward(self, x, y):
        return -y / (x + 1e-10)


class OneHotCrossEntropy:
    """Correct for one-hot targets only: −log Σ_c x·y picks the probability of the class."""

    def forward(self, x, y):
        return -np.mean(np.log(np.sum(x * y, axis=1) + 1e-9))

    def backward(self, x, y):
        picked = np.sum(x * y, axis=1, keepdims=True)
        return -y / picked / x.shape[0]


class OneHotCrossEntropyWrongSign(OneHotCrossEntropy):
    """Bug: the sign of the gradient."""

    def backward(self, x, y):
        picked = np.sum(x * y, axis=1, keepdims=True)
        return y / picked / x.shape[0]
