"""The NumPy target: ``np.einsum`` for contractions, broadcasting for element-wise work."""

from __future__ import annotations

from gradtool.codegen.base import Arr, ArrayPrinter


class NumpyPrinter(ArrayPrinter):
    module = "np"
    FUNCS = {
        "exp": "np.exp", "log": "np.log", "sqrt": "np.sqrt", "tanh": "np.tanh",
        "sinh": "np.sinh", "cosh": "np.cosh", "sin": "np.sin", "cos": "np.cos",
        "atan": "np.arctan", "Abs": "np.abs", "sign": "np.sign", "erf": "erf",
    }
    SUM = "{x}.sum({axes})"
    MAX = "{x}.max({axes})"

    def _call(self, fname, arg, expr):
        out = super()._call(fname, arg, expr)
        if fname == "erf" and not out.code.startswith("math."):
            self.imports.add("erf")
        return out

    def einsum(self, spec: str, args: str) -> str:
        return f'np.einsum("{spec}", {args}, optimize=True)'

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        self.imports.add("np")
        return f"np.broadcast_to({code}, ({', '.join(shape)},)).copy()"


HELPERS = {
    "scatter_add": '''def scatter_add(values, index, size, lead):
    """out[..., index[j]] += values[..., j]: the adjoint of reading x[..., index] with an integer
    array (strided convolution, pooling). ``lead`` axes of ``values`` come before the index
    axes; the new last axis has ``size`` entries."""
    values = np.asarray(values)
    shape = values.shape[:lead] + index.shape
    out = np.zeros(shape[:lead] + (size,), dtype=values.dtype)
    np.add.at(out, (Ellipsis, index), np.broadcast_to(values, shape))
    return out''',
    "first_hit": '''def first_hit(hit, axes):
    """``hit`` kept only at its first True over ``axes`` (row-major): ties at a maximum send
    the gradient to one element, the first, as torch.nn.functional.max_pool2d does."""
    k = len(axes)
    moved = np.moveaxis(hit, axes, range(-k, 0))
    flat = moved.reshape(moved.shape[:moved.ndim - k] + (-1,))
    first = flat & (np.cumsum(flat, axis=-1) == 1)
    return np.moveaxis(first.reshape(moved.shape), range(-k, 0), axes)''',
}

IMPORTS = {
    "np": "import numpy as np",
    "math": "import math",
    "erf": "from scipy.special import erf",
}
