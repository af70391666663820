"""2-D max pooling, K×K window, stride S (windows overlap when S < K):
Y[n, c, i, j] = max_{p,q} X[n, c, i·S + p, j·S + q]."""

from gradtool.lang import Max, Spec

spec = Spec("maxpool2d", "2-D max pooling, K×K window, stride S",
            reference="torch.nn.functional.max_pool2d")
N, C, OH, OW, K, S = spec.dims("N C OH OW K S")
n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
X = spec.input("X", N, C, (OH - 1) * S + K, (OW - 1) * S + K)

spec.output("Y", [n, c, i, j], Max(X[n, c, i * S + p, j * S + q], p, q))


@spec.torch_reference
def reference(X, K, S):
    import torch.nn.functional as F

    return F.max_pool2d(X, K, stride=S)
