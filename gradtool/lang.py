"""What a spec file imports: ``from gradtool.lang import Spec, Sum, exp, sqrt``.

Element-wise functions are SymPy's own; ``Sum`` and ``Max`` over indices are gradtool's, so the
engine (not ``Sum.doit()``) carries the index algebra.
"""

from sympy import (  # noqa: F401 - re-exported for spec files
    Abs,
    Heaviside,
    KroneckerDelta,
    Piecewise,
    Rational,
    atan,
    cos,
    cosh,
    erf,
    exp,
    log,
    oo,
    pi,
    sin,
    sinh,
    sqrt,
    tanh,
)

from gradtool.spec.lang import Max, Min, Spec, Sum, sigmoid  # noqa: F401

__all__ = [
    "Spec", "Sum", "Max", "Min", "sigmoid", "exp", "log", "sqrt", "tanh", "sinh", "cosh",
    "sin", "cos", "atan", "erf", "Abs", "Piecewise", "Heaviside", "Rational", "pi",
    "KroneckerDelta", "oo",
]
