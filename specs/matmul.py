"""Matrix product: Y[m, p] = Σ_k A[m, k] B[k, p]."""

from gradtool.lang import Spec, Sum

spec = Spec("matmul", "Matrix product Y = A B", reference="torch.matmul", class_name="MatMul")
M, K, P = spec.dims("M K P")
m, k, p = spec.indices(m=M, k=K, p=P)
A = spec.input("A", M, K)
B = spec.input("B", K, P)

spec.output("Y", [m, p], Sum(A[m, k] * B[k, p], k))


@spec.torch_reference
def reference(A, B):
    import torch

    return torch.matmul(A, B)
