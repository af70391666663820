"""Global average pooling: each channel of an (N, C, H, W) image becomes its mean,
Y[n, c] = (1 / (H·W)) Σ_{h,w} X[n, c, h, w] (Lin, Chen and Yan 2014, "Network in Network")."""

from gradtool.lang import Spec, Sum

spec = Spec("global_avgpool", "Global average pooling: the mean of each channel over H, W",
            reference="torch.Tensor.mean", class_name="GlobalAvgPool2d")
N, C, H, W = spec.dims("N C H W")
n, c, h, w = spec.indices(n=N, c=C, h=H, w=W)
X = spec.input("X", N, C, H, W)

spec.output("Y", [n, c], Sum(X[n, c, h, w], h, w) / (H * W))


@spec.torch_reference
def reference(X):
    return X.mean((2, 3))
