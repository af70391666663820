"""2-D max pooling, K×K window, stride S, padding P with −∞ as PyTorch pads
(windows overlap when S < K): Y[n, c, i, j] = max_{p,q} Xm[n, c, i·S + p, j·S + q], where
Xm is X with P entries −∞ before and after each spatial axis; OH = ⌊(H + 2P − K)/S⌋ + 1.
The gradient of a window goes to its first maximum (row-major), as F.max_pool2d's does."""

from gradtool.lang import Max, Spec, oo

spec = Spec("maxpool2d", "2-D max pooling, K×K window, stride S, padding P",
            reference="torch.nn.functional.max_pool2d", class_name="MaxPool2d")
N, C, H, W, K, S, P = spec.dims("N C H W K S P")
spec.min_size(P=0)  # no padding is a padding of 0
spec.require(2 * P <= K)  # PyTorch's limit: no window may hold padding only
OH = spec.size("OH", (H + 2 * P - K) // S + 1)
OW = spec.size("OW", (W + 2 * P - K) // S + 1)
n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
X = spec.input("X", N, C, H, W)
Xm = spec.pad("Xm", X, (0, 0, P, P), fill=-oo)

spec.output("Y", [n, c, i, j], Max(Xm[n, c, i * S + p, j * S + q], p, q))


@spec.torch_reference
def reference(X, K, S, P):
    import torch.nn.functional as F

    return F.max_pool2d(X, K, stride=S, padding=P)
