"""Broadcast a vector over a new axis (x · 1ᵀ): Y[n, d] = x[n]."""

from gradtool.lang import Spec

spec = Spec("expand", "Broadcast x over a new last axis, Y = x 1ᵀ",
            reference="x[:, None].expand(N, D)")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
x = spec.input("x", N)

spec.output("Y", [n, d], x[n])
