"""2-D convolution as PyTorch computes it (a cross-correlation), stride S, zero padding P:
Y[n, o, i, j] = Σ_{c,p,q} weight[o, c, p, q] · Xp[n, c, i·S + p, j·S + q] + bias[o], where Xp
is X with P zeros before and after each spatial axis. The output size follows from the
input's, with PyTorch's floor: OH = ⌊(H + 2P − K)/S⌋ + 1."""

from gradtool.lang import Spec, Sum

spec = Spec("conv2d", "2-D convolution, K×K kernel, stride S, zero padding P",
            reference="torch.nn.functional.conv2d", class_name="Conv2d")
N, C, O, H, W, K, S, P = spec.dims("N C O H W K S P")
spec.min_size(P=0)  # no padding is a padding of 0
OH = spec.size("OH", (H + 2 * P - K) // S + 1)
OW = spec.size("OW", (W + 2 * P - K) // S + 1)
n, c, o, i, j, p, q = spec.indices(n=N, c=C, o=O, i=OH, j=OW, p=K, q=K)
X = spec.input("X", N, C, H, W)
weight = spec.param("weight", O, C, K, K, init="kaiming_uniform")
bias = spec.param("bias", O, init="zeros")
Xp = spec.pad("Xp", X, (0, 0, P, P))

spec.output("Y", [n, o, i, j],
            Sum(weight[o, c, p, q] * Xp[n, c, i * S + p, j * S + q], c, p, q) + bias[o])


@spec.torch_reference
def reference(X, weight, bias, S, P):
    import torch.nn.functional as F

    return F.conv2d(X, weight, bias, stride=S, padding=P)
