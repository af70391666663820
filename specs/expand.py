"""Broadcast a vector over a new axis (x · 1ᵀ): Y[n, d] = x[n]."""

from gradtool.lang import Spec

spec = Spec("expand", "Broadcast x over a new last axis, Y = x 1ᵀ",
            reference="x[:, None].expand(N, D)", class_name="Expand")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
x = spec.input("x", N)

spec.output("Y", [n, d], x[n])


@spec.torch_reference
def reference(x, D):
    # D appears in no input, so the reference takes the size by the dimension's name
    return x[:, None].expand(x.shape[0], D)
