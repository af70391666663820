"""2-D convolution as PyTorch computes it (a cross-correlation), stride S, no padding:
Y[n, o, i, j] = Σ_{c,p,q} W[o, c, p, q] · X[n, c, i·S + p, j·S + q] + b[o]."""

from gradtool.lang import Spec, Sum

spec = Spec("conv2d", "2-D convolution, K×K kernel, stride S, no padding",
            reference="torch.nn.functional.conv2d")
N, C, O, OH, OW, K, S = spec.dims("N C O OH OW K S")
n, c, o, i, j, p, q = spec.indices(n=N, c=C, o=O, i=OH, j=OW, p=K, q=K)
X = spec.input("X", N, C, (OH - 1) * S + K, (OW - 1) * S + K)
W = spec.param("W", O, C, K, K, init="kaiming_uniform")
b = spec.param("b", O, init="zeros")

spec.output("Y", [n, o, i, j],
            Sum(W[o, c, p, q] * X[n, c, i * S + p, j * S + q], c, p, q) + b[o])


@spec.torch_reference
def reference(X, W, b, S):
    import torch.nn.functional as F

    return F.conv2d(X, W, b, stride=S)
