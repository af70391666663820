"""The NumPy target: ``np.einsum`` for contractions, broadcasting for element-wise work."""

from __future__ import annotations

from gradtool.codegen.base import Arr, ArrayPrinter


class NumpyPrinter(ArrayPrinter):
    module = "np"
    FUNCS = {
        "exp": "np.exp", "log": "np.log", "sqrt": "np.sqrt", "tanh": "np.tanh",
        "sinh": "np.sinh", "cosh": "np.cosh", "sin": "np.sin", "cos": "np.cos",
        "atan": "np.arctan", "Abs": "np.abs", "sign": "np.sign", "erf": "erf",
        "Sigmoid": "expit",
    }
    SUM = "{x}.sum({axes})"
    MAX = "{x}.max({axes})"

    def _call(self, fname, arg, expr):
        out = super()._call(fname, arg, expr)
        if fname in ("erf", "Sigmoid") and not out.code.startswith("math."):
            self.imports.add(self.FUNCS[fname])
        return out

    def einsum(self, spec: str, args: str) -> str:
        return f'np.einsum("{spec}", {args}, optimize=True)'

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        self.imports.add("np")
        return f"np.broadcast_to({code}, ({', '.join(shape)},)).copy()"


HELPERS = {
    "need_flags": '''def need_flags(need, names):
    """One flag per gradient in ``names``: all true when ``need`` is None, else whether the name
    is in ``need``. Raises ValueError for a name that has no gradient here."""
    if need is None:
        return (True,) * len(names)
    unknown = set(need) - set(names)
    if unknown:
        raise ValueError(f"no gradient for {sorted(unknown)}; this layer has {list(names)}")
    return tuple(name in need for name in names)''',
    "scatter_add": '''def scatter_add(values, index, size, lead):
    """out[..., index[j]] += values[..., j]: the adjoint of reading x[..., index] with an integer
    array (strided convolution, pooling). ``lead`` axes of ``values`` come before the index
    axes; the new last axis has ``size`` entries."""
    values = np.asarray(values)
    shape = values.shape[:lead] + index.shape
    out = np.zeros(shape[:lead] + (size,), dtype=values.dtype)
    np.add.at(out, (Ellipsis, index), np.broadcast_to(values, shape))
    return out''',
}

IMPORTS = {
    "np": "import numpy as np",
    "math": "import math",
    "erf": "from scipy.special import erf",
    "expit": "from scipy.special import expit",
}
