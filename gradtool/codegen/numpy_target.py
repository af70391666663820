"""The NumPy target: ``np.einsum`` for contractions, broadcasting for element-wise work."""

from __future__ import annotations

from gradtool.codegen.base import ATOM, Arr, ArrayPrinter
from gradtool.codegen.windows import WindowRead
from gradtool.spec.lang import MaxOver


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

    def window_view(self, read: WindowRead) -> str:
        """``sliding_window_view(X, (K, K), axis=(2, 3))[:, :, ::S, ::S]``: every window
        position, then every S-th (a view: no copy)."""
        self.imports.add("sliding_window_view")
        name = self.names[read.name]
        kernel = self.sizes_code([self.ranges[w.tap] for w in read.windows])
        axes = tuple(w.axis for w in read.windows)
        code = f"sliding_window_view({name}, {kernel}, axis={axes if len(axes) > 1 else axes[0]})"
        steps = [":"] * read.rank
        for w in read.windows:
            if w.stride != 1:
                steps[w.axis] = f"::{self.size_code(w.stride)}"
        while steps and steps[-1] == ":":
            steps.pop()
        return f"{code}[{', '.join(steps)}]" if steps else code

    def window_max_grad(self, grad: Arr, read: WindowRead, windows) -> Arr | None:
        """Max pooling's backward: each window's argmax (the first maximum) takes its
        gradient, scattered back by ``window_add`` (the ``window_max_grad`` helper)."""
        self.helpers.add("window_max_grad")
        view = self.lower(read.access)
        order = read.plain + read.outs
        g = grad.code if grad.axes == order else self.transpose(
            self.paren(grad.code, grad.prec, ATOM), tuple(grad.axes.index(a) for a in order))
        sizes = self.extents_code([self.ranges[w[0]] for w in windows])
        strides = self.sizes_code([w[3] for w in windows])
        return Arr(f"window_max_grad({g}, {view.code}, {sizes}, {strides})",
                   read.plain + tuple(w[0] for w in windows), ATOM)

    def window_max(self, e: MaxOver) -> Arr | None:
        """The maximum over the taps of a window read, tap by tap (``window_max``)."""
        read = self._window(e.body, tuple(e.over))
        if read is None or set(e.over) != set(read.taps):
            return None
        self.helpers.add("window_max")
        view = self.lower(e.body)
        return Arr(f"window_max({view.code}, {len(read.windows)})",
                   view.axes[:len(view.axes) - len(read.windows)], ATOM)

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        self.imports.add("np")
        return f"np.broadcast_to({code}, {_shape_tuple(shape)}).copy()"


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
    "scatter_add": '''def scatter_add(values, index, size, lead, batch=0):
    """out[..., b, index[b, j]] += values[..., b, j]: the adjoint of reading x[..., index] with
    an integer array (strided convolution, pooling). ``lead`` axes of ``values`` come before
    the index axes; the first ``batch`` axes of ``index`` are kept (one scatter per entry),
    the others are summed into a new last axis of ``size`` entries."""
    values = np.asarray(values)
    shape = values.shape[:lead] + index.shape
    kept = index.shape[:batch]
    offset = np.arange(math.prod(kept)).reshape(kept + (1,) * (index.ndim - batch)) * size
    out = np.zeros(shape[:lead] + (math.prod(kept) * size,), dtype=values.dtype)
    np.add.at(out, (Ellipsis, index + offset), np.broadcast_to(values, shape))
    return out.reshape(shape[:lead] + kept + (size,))''',
    "window_add": '''def window_add(values, sizes, taps, strides):
    """out[..., S·i + p] += values[..., i, p] over every window position i and tap p: the
    adjoint of reading x through strided windows (a convolution's or a pooling's input), as one
    strided slice-add per tap (K² for a K×K window) instead of a scatter. ``values`` has the
    window positions, then the taps, last (d of each, d = len(sizes)); ``sizes`` are the
    extents of out's window axes, ``taps`` the window's, ``strides`` its steps."""
    d = len(sizes)
    values = np.broadcast_to(values, np.shape(values)[:len(np.shape(values)) - d] + taps)
    lead, counts = values.shape[:values.ndim - 2 * d], values.shape[values.ndim - 2 * d:][:d]
    out = np.zeros(lead + sizes, dtype=values.dtype)
    for tap in np.ndindex(*taps):
        rows = tuple(slice(p, p + s * (n - 1) + 1, s)
                     for p, n, s in zip(tap, counts, strides, strict=True))
        out[(Ellipsis, *rows)] += values[(Ellipsis, *[slice(None)] * d, *tap)]
    return out''',
    "window_sum": '''def window_sum(windows, d):
    """The sum over each window of a window view (its last ``d`` axes are the taps), as one
    add per tap: a reduction over small strided axes is many times slower."""
    out = None
    for tap in np.ndindex(*windows.shape[windows.ndim - d:]):
        values = windows[(Ellipsis, *tap)]
        out = values.copy() if out is None else np.add(out, values, out=out)
    return out''',
    "window_max": '''def window_max(windows, d):
    """The maximum of each window of a window view (its last ``d`` axes are the taps), as one
    np.maximum per tap: a reduction over small strided axes is many times slower."""
    out = None
    for tap in np.ndindex(*windows.shape[windows.ndim - d:]):
        values = windows[(Ellipsis, *tap)]
        out = values.copy() if out is None else np.maximum(out, values, out=out)
    return out''',
    "window_max_grad": '''def window_max_grad(grad, windows, sizes, strides):
    """``grad`` of each strided window's maximum sent to its first maximum (row-major), summed
    where windows overlap: max pooling's backward. ``windows`` is the input's window view
    (the window positions, then the taps, last); ``sizes`` are the input's window axes."""
    d = len(sizes)
    taps = list(np.ndindex(*windows.shape[windows.ndim - d:]))
    best = windows[(Ellipsis, *taps[0])].copy()
    first = np.zeros(best.shape, dtype=np.intp)  # the tap of the first maximum so far
    for k, tap in enumerate(taps[1:], 1):
        values = windows[(Ellipsis, *tap)]
        higher = values > best
        np.copyto(best, values, where=higher)
        first[higher] = k
    counts = first.shape[first.ndim - d:]
    out = np.zeros(first.shape[:first.ndim - d] + sizes, dtype=grad.dtype)
    for k, tap in enumerate(taps):
        rows = tuple(slice(p, p + s * (n - 1) + 1, s)
                     for p, n, s in zip(tap, counts, strides, strict=True))
        out[(Ellipsis, *rows)] += np.where(first == k, grad, 0)
    return out''',
    "join_axes": '''def join_axes(values, sizes, lead):
    """out[..., B·a + b] = values[..., a, b]: the adjoint of reading x[..., a*B + b], where a
    split index reads every position once, so that its scatter-add is a reshape. ``lead`` axes
    of ``values`` come before the split axes, whose ``sizes`` are (A, B)."""
    shape = np.shape(values)[:lead] + tuple(sizes)
    return np.broadcast_to(values, shape).reshape(shape[:lead] + (-1,))''',
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
    "expit": "from scipy.special import expit",
    "sliding_window_view": "from numpy.lib.stride_tricks import sliding_window_view",
}


def _shape_tuple(shape) -> str:
    """``(N, C)``, and ``(N,)`` for one size."""
    return f"({', '.join(shape)}{',' if len(shape) == 1 else ''})"
