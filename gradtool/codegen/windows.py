"""Reads through strided windows, ``X[n, c, S·i + p, S·j + q]``: the index pattern of
convolution and pooling, recognised so that the code generators can lower it to strided views
and the frameworks' convolution instead of integer-array gathers and scatter-adds.

A position of a read is a *window axis* when its index is ``S·i + p``: two distinct indices, the
window position ``i`` (coefficient S, a positive size or number) and the tap ``p`` (coefficient
1), no constant. With the tensor's extent E along that axis, ``T`` values of i and ``K`` of p,
the read is a view of X (``unfold`` in torch, ``sliding_window_view`` in NumPy) exactly when
E − K − S·(T − 1) is 0 or E mod S is what is left over (the windows then number
⌊(E − K)/S⌋ + 1 = T, the size relation of an unpadded convolution). Nothing here looks at a
spec's name: only at indices, ranges and extents.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp


@dataclass(frozen=True)
class Window:
    """One window axis of a read: X's position ``axis`` is indexed by ``stride·out + tap``."""
    axis: int
    out: sp.Symbol
    tap: sp.Symbol
    stride: sp.Expr


@dataclass(frozen=True)
class WindowRead:
    """A read ``X[...]`` with at least one window axis; every other position is a plain index.

    ``plain`` lists the plain indices in X's order; ``windows`` the window axes in X's order.
    The read as a view has the axes ``view_axes``: X's positions in order (a window axis
    stands for its window position ``out``), then the taps, as ``unfold`` and
    ``sliding_window_view`` lay them out."""
    access: sp.Indexed
    name: str
    plain: tuple
    windows: tuple
    rank: int

    @property
    def view_axes(self) -> tuple:
        by_axis = {w.axis: w.out for w in self.windows}
        plain = iter(self.plain)
        return tuple(by_axis[k] if k in by_axis else next(plain) for k in range(self.rank)) \
            + tuple(w.tap for w in self.windows)

    @property
    def outs(self) -> tuple:
        return tuple(w.out for w in self.windows)

    @property
    def taps(self) -> tuple:
        return tuple(w.tap for w in self.windows)

    @property
    def trailing(self) -> bool:
        """Are the window axes X's last positions (the layout pooling ops take)?"""
        d = len(self.windows)
        return tuple(w.axis for w in self.windows) == tuple(range(self.rank - d, self.rank))


def split_window(index, is_index, hint=()) -> tuple | None:
    """(out, tap, stride) if ``index`` is stride·out + tap, else None. With stride one
    (``i + p``) either index could be the tap: the one in ``hint`` (a sum's indices) is."""
    expr = sp.expand(index)
    syms = [s for s in expr.free_symbols if is_index(s)]
    if len(syms) != 2:
        return None
    coeffs = {s: expr.coeff(s) for s in syms}
    if sp.expand(expr - sum(c * s for s, c in coeffs.items())) != 0:
        return None  # a constant offset, or an index inside a coefficient
    if any(c.free_symbols & set(syms) or not (c.is_positive or c.is_Integer and c > 0)
           for c in coeffs.values()):
        return None
    taps = sorted((s for s in syms if coeffs[s] == 1), key=str)
    if not taps:
        return None  # dilated: neither index steps by one
    tap = next((s for s in taps if s in hint), taps[-1])
    out = next(s for s in syms if s != tap)
    return out, tap, coeffs[out]


def window_read(e: sp.Indexed, is_index, ranges: dict, extents: dict, hint=(),
                derived=None) -> WindowRead | None:
    """The :class:`WindowRead` that ``e`` is, or None: not every position is a plain index or a
    window axis, an index is used twice, a range or extent is unknown, or the windows of
    the view would not number exactly the out index's range. ``derived`` maps a derived
    size (OH) to its formula (⌊(H + 2P − K)/S⌋ + 1)."""
    name = e.base.label.name
    shape = extents.get(name)
    if shape is None or len(shape) != len(e.indices):
        return None
    plain, windows, seen = [], [], set()
    for k, index in enumerate(e.indices):
        if is_index(index):
            plain.append(index)
            seen.add(index)
            continue
        split = split_window(index, is_index, hint)
        if split is None:
            return None
        out, tap, stride = split
        if out not in ranges or tap not in ranges or \
                not fits(shape[k], ranges[tap], stride, ranges[out], derived):
            return None
        windows.append(Window(k, out, tap, stride))
        seen |= {out, tap}
    used = plain + [s for w in windows for s in (w.out, w.tap)]
    if not windows or len(set(used)) != len(used):
        return None
    return WindowRead(e, name, tuple(plain), tuple(windows), len(e.indices))


def fits(extent, taps, stride, count, derived=None) -> bool:
    """Do the windows of ``taps`` entries, ``stride`` apart, along an axis of ``extent``
    number exactly ``count``: ⌊(extent − taps)/stride⌋ + 1 = count? ``derived`` maps derived
    sizes to their formulas (OH = ⌊(H + 2P − K)/S⌋ + 1)."""
    extent, taps, stride, count = (sp.sympify(x).xreplace(derived or {})
                                   for x in (extent, taps, stride, count))
    rest = sp.expand(leftover(extent, taps, stride, count))
    if rest == 0:
        return True
    span = sp.expand(extent - taps)
    return rest == sp.expand(span - stride * sp.floor(span / stride)) or \
        (isinstance(rest, sp.Mod) and sp.expand(rest.args[0] - span) == 0 and
         rest.args[1] == stride)


def leftover(extent, taps, stride, count):
    """The entries at the end of an axis that no window reaches (0 when the stride tiles it):
    the ``output_padding`` of a transposed convolution."""
    return sp.expand(sp.sympify(extent) - taps - stride * (count - 1))
