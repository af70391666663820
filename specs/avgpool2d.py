"""2-D average pooling, K×K window, stride S, zero padding P, dividing by K² as PyTorch's
default count_include_pad=True does: Y[n, c, i, j] = (1/K²) Σ_{p,q} Xp[n, c, i·S + p, j·S + q],
where Xp is X with P zeros before and after each spatial axis; OH = ⌊(H + 2P − K)/S⌋ + 1."""

from gradtool.lang import Spec, Sum

spec = Spec("avgpool2d", "2-D average pooling, K×K window, stride S, zero padding P",
            reference="torch.nn.functional.avg_pool2d", class_name="AvgPool2d")
N, C, H, W, K, S, P = spec.dims("N C H W K S P")
spec.min_size(P=0)  # no padding is a padding of 0
spec.require(2 * P <= K)  # PyTorch's limit, as for max pooling
OH = spec.size("OH", (H + 2 * P - K) // S + 1)
OW = spec.size("OW", (W + 2 * P - K) // S + 1)
n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
X = spec.input("X", N, C, H, W)
Xp = spec.pad("Xp", X, (0, 0, P, P))

spec.output("Y", [n, c, i, j], Sum(Xp[n, c, i * S + p, j * S + q], p, q) / K**2)


@spec.torch_reference
def reference(X, K, S, P):
    import torch.nn.functional as F

    return F.avg_pool2d(X, K, stride=S, padding=P)
