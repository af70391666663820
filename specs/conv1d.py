"""1-D convolution as PyTorch computes it (a cross-correlation), stride S, zero padding P:
Y[n, o, i] = Σ_{c,p} weight[o, c, p] · Xp[n, c, i·S + p] + bias[o], where Xp is X with P
zeros before and after; OL = ⌊(L + 2P − K)/S⌋ + 1."""

from gradtool.lang import Spec, Sum

spec = Spec("conv1d", "1-D convolution, kernel K, stride S, zero padding P",
            reference="torch.nn.functional.conv1d", class_name="Conv1d")
N, C, O, L, K, S, P = spec.dims("N C O L K S P")
spec.min_size(P=0)  # no padding is a padding of 0
OL = spec.size("OL", (L + 2 * P - K) // S + 1)
n, c, o, i, p = spec.indices(n=N, c=C, o=O, i=OL, p=K)
X = spec.input("X", N, C, L)
weight = spec.param("weight", O, C, K, init="kaiming_uniform")
bias = spec.param("bias", O, init="zeros")
Xp = spec.pad("Xp", X, (0, 0, P))

spec.output("Y", [n, o, i], Sum(weight[o, c, p] * Xp[n, c, i * S + p], c, p) + bias[o])


@spec.torch_reference
def reference(X, weight, bias, S, P):
    import torch.nn.functional as F

    return F.conv1d(X, weight, bias, stride=S, padding=P)
