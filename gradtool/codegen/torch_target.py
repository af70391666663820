"""The PyTorch target: ``torch.einsum``, broadcasting, and tensors of the inputs' dtype."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp

from gradtool.codegen.base import ATOM, MUL, Arr, ArrayPrinter, MatMul, Mean
from gradtool.codegen.windows import WindowRead
from gradtool.spec.lang import MaxOver


@dataclass(frozen=True)
class Conv(Arr):
    """A ``torch.conv*d`` call split where a bias goes: ``call`` + ``, b`` + ``tail``, then
    ``squeeze`` (axes the call added); ``channel`` is the output-channel index."""
    call: str = ""
    tail: str = ""
    channel: object = None
    squeeze: str = ""


@dataclass(frozen=True)
class Fold:
    """A padded copy (``spec.pad``) that torch's convolution may pad itself: the source's
    variable, the (before, after) widths per axis, the fill."""
    source: str
    widths: tuple
    fill: object


@dataclass(frozen=True)
class ConvGrad:
    """A convolution's gradient call as lowered (``call``, a substring of the line that
    reads it): ``role`` "input" (``conv*d_input``; ``other`` is the weight's code) or
    "weight" (``conv*d_weight``; ``other`` is the input's code), the upstream gradient's
    code, the strides' code and the input's sizes (batch, channels, spatial…). Two of one
    convolution become one ``convolution_backward`` (:func:`pair_conv_grads`)."""
    role: str
    call: str
    grad: str
    strides: str
    sizes: list
    other: str
    padding: str = ""


class TorchPrinter(ArrayPrinter):
    module = "torch"
    FUNCS = {
        "exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "tanh": "torch.tanh",
        "sinh": "torch.sinh", "cosh": "torch.cosh", "sin": "torch.sin", "cos": "torch.cos",
        "atan": "torch.atan", "Abs": "torch.abs", "sign": "torch.sign", "erf": "torch.erf",
        "Sigmoid": "torch.sigmoid",
    }
    SUM = "{x}.sum({axes})"
    MEAN_KEEP = "{x}.mean({axes}, keepdim=True)"
    MAX = "{x}.amax({axes})"
    SOFTMAX = "torch.softmax({x}, {dim})"          # a normalised exponential along dim
    LOG_SOFTMAX = "torch.log_softmax({x}, {dim})"  # its log
    ARANGE = "torch.arange({n}, device={ref}.device)"
    ARANGE_VALUE = "torch.arange({n}, device={ref}.device, dtype={dtype})"
    INDICATOR = "({cmp}).to({dtype})"
    FLOAT = "torch.get_default_dtype()"
    HELPER_IMPORTS = {"window_add": ("itertools",), "window_sum": ("itertools",)}

    def align(self, arr: Arr, axes: tuple) -> str:
        """A vector broadcast over trailing axes as ``v.view(-1, 1, 1)``, not ``v[:, None,
        None]``: the same view, but torch's indexing costs about twice a view call (measured
        1.8 against 0.9 µs a call, torch 2.13 CPU; batch norm broadcasts seven per-channel
        vectors a step). Any 1-D tensor, strided or not, has this view."""
        if len(arr.axes) == 1 and not isinstance(arr, Mean) and arr.axes[0] in axes:
            after = len(axes) - 1 - axes.index(arr.axes[0])
            if after:
                ones = ", ".join(["1"] * after)
                return f"{self.paren(arr.code, arr.prec, ATOM)}.view(-1, {ones})"
        return super().align(arr, axes)

    def pad(self, source: str, widths: list[tuple[str, str]], fill) -> str:
        """``torch.nn.functional.pad`` lists (before, after) from the last axis backwards,
        and only as far as the first padded axis."""
        pairs = list(widths)
        while pairs and pairs[0] == ("0", "0"):
            pairs.pop(0)
        flat = ", ".join(f"{a}, {b}" for a, b in reversed(pairs))
        value = self._fill_code(fill)
        return self.unless_unpadded(f"torch.nn.functional.pad({source}, ({flat})" + (
            f", value={value})" if value != "0" else ")"), source, widths)

    def _print_Pow(self, e) -> Arr:
        """1/x of a tensor as ``torch.reciprocal(x)``: ``1 / x`` is Python's ``__rdiv__``,
        which computes ``x.reciprocal() * 1`` (the same values) at four times the cost of the
        one call at small sizes; x² of a named tensor as ``x * x`` (torch's pow computes
        x·x for the exponent 2, after wrapping the 2 in a tensor: 3.6 against 1.9 µs)."""
        if e.exp == 2 and not self._plain_number(e.base) and not self._is_mask(e.base):
            base = self.lower(e.base)
            if re.fullmatch(r"[A-Za-z_]\w*", base.code):  # x ** 2 wraps 2 in a tensor first
                return Arr(f"{base.code} * {base.code}", base.axes, MUL)
        if e.exp in (-1, sp.Rational(-1, 2)) and not self._plain_number(e.base):
            inner = self.lower(e.base) if e.exp == -1 else \
                self._call("sqrt", self.lower(e.base), e.base)
            return Arr(f"torch.reciprocal({inner.code})", inner.axes, ATOM)
        return super()._print_Pow(e)

    def _quotient(self, num: list, den: list, axes=None) -> Arr:
        """``1 / (a * b)`` of tensors as ``torch.reciprocal(a * b)`` (see :meth:`_print_Pow`)."""
        if num or not any(a.axes for a in den):
            return super()._quotient(num, den, axes)
        inner = super()._quotient(den, [], axes)
        return Arr(f"torch.reciprocal({inner.code})", inner.axes, ATOM)

    # trailing extents up to which Σ over (0, 2, 3) runs faster as Σ over 0 first
    SHORT_TRAIL = 16

    def _reduce(self, x: Arr, over, template) -> Arr:
        """Σ (or the mean) over the first axis and all axes after the second, batch norm's
        statistics over (0, 2, 3), as ``x.sum(0).sum((1, 2))`` when the trailing extent
        H·W is at most ``SHORT_TRAIL``: torch's CPU reduction over (0, 2, 3) runs an inner
        loop of H·W elements per (n, c), and summing the batch first is 1.5–4× faster there
        (measured at 32×64×4×4: 12.1 → 8.1 µs, 32×128×2×2: 22 → 5.8 µs), while at 8×8 and
        above the one call is (28×28: 236 against 442 µs)."""
        out = super()._reduce(x, over, template)
        rank = len(x.axes)
        positions = sorted(x.axes.index(s) for s in over if s in x.axes)
        op = {self.SUM: "sum", self.MEAN: "mean"}.get(template)
        trail = x.axes[2:]
        code = self.paren(x.code, x.prec, ATOM)
        if op is None or rank < 3 or positions != [0, *range(2, rank)] or len(code) > 24 or \
                any(a not in self.ranges for a in trail):
            return out
        inner = "1" if rank == 3 else str(tuple(range(1, rank - 1)))
        extent = " * ".join(self.size_code(self.ranges[a]) for a in trail)
        return Arr(f"({code}.{op}(0).{op}({inner}) if {extent} <= {self.SHORT_TRAIL} else "
                   f"{out.code})", out.axes, ATOM)

    def transpose(self, code: str, perm: tuple) -> str:
        if perm == (1, 0):
            return f"{code}.T"
        return f"{code}.permute{perm}"

    def where(self, cond: str, a: Arr, b: Arr, axes, numbers: bool = True) -> str:
        # (``numbers``: is branch a a Python number rather than a tensor?)
        # a Python-number branch would make torch.where return float32: give it the
        # condition's dtype through a tensor that is already there
        ref = next((v for v in self.names.values() if re.search(rf"\b{re.escape(v)}\b", cond)),
                   None)
        av, bv = self.align(a, axes), self.align(b, axes)
        if ref is not None and not a.axes and not b.axes:
            if numbers:
                av = f"{ref}.new_tensor({av})"
            else:  # a is a 0-d tensor already; b is the number
                bv = f"{ref}.new_tensor({bv})"
        return f"torch.where({cond}, {av}, {bv})"

    def _extremum(self, e, fname):
        """``torch.maximum`` takes two tensors: numbers (literals, sizes, hyper-parameters)
        become a bound of ``torch.clamp``, and a maximum of numbers only is Python's."""
        numbers = [a for a in e.args if self._plain_number(a)]
        tensors = [a for a in e.args if not self._plain_number(a)]
        pick = "max" if fname == "maximum" else "min"
        if not tensors:
            return Arr(f"{pick}({', '.join(self.lower(a).code for a in numbers)})", (), ATOM)
        out = super()._extremum(type(e)(*tensors, evaluate=False), fname) \
            if len(tensors) > 1 else self.lower(tensors[0])
        if not numbers:
            return out
        bound = self.lower(numbers[0]) if len(numbers) == 1 else \
            Arr(f"{pick}({', '.join(self.lower(a).code for a in numbers)})", (), ATOM)
        side = "min" if fname == "maximum" else "max"
        return Arr(f"torch.clamp({out.code}, {side}={bound.code})", out.axes, ATOM)

    # -- windows: torch's own convolution and pooling (codegen/windows.py) -----------------
    def window_view(self, read: WindowRead) -> str:
        """``X.unfold(2, K, S).unfold(3, K, S)``: the window positions in place, the taps
        appended (a view: no copy)."""
        code = self.names[read.name]
        for w in read.windows:
            code += f".unfold({w.axis}, {self.size_code(self.ranges[w.tap])}, " \
                    f"{self.size_code(w.stride)})"
        return code

    def _strides(self, strides) -> str:
        """``, stride=S`` (nothing for stride one; a tuple when the axes differ)."""
        if all(s == 1 for s in strides):
            return ""
        if len(set(strides)) == 1:
            return f", stride={self.size_code(strides[0])}"
        return f", stride={self.sizes_code(strides)}"

    def _padding(self, pads) -> str:
        """``, padding=P`` (nothing for none; a tuple when the axes differ)."""
        if all(p == 0 for p in pads):
            return ""
        if len(set(pads)) == 1:
            return f", padding={self.size_code(pads[0])}"
        return f", padding={self.sizes_code(pads)}"

    def _layout(self, code: str, axes: tuple, groups: list) -> str:
        """``code`` (axes ``axes``) permuted to ``groups`` (each one axis, or none: a new
        axis of one entry there), the layout (batch, channels, spatial…) convolutions take."""
        order = tuple(g[0] for g in groups if g)
        if order != axes:
            code = self.transpose(code, tuple(axes.index(a) for a in order))
        for k, g in enumerate(groups):
            if not g:
                code += f".unsqueeze({k})"
        return code

    @staticmethod
    def _unlayout(code: str, groups: list) -> str:
        """Drop the axes :meth:`_layout` added (the last first)."""
        for k in reversed(range(len(groups))):
            if not groups[k]:
                code += f".squeeze({k})"
        return code

    def window_contraction(self, operands, over) -> Arr | None:
        """Σ_{c,p} W[o,c,p]·X[n,c,S·i + p] as ``torch.conv1d/2d/3d`` (the taps p are summed),
        and Σ_{n,i} G[n,o,i]·X[n,c,S·i + p] as ``torch.nn.grad.conv*d_weight`` (the window
        positions i are summed: the weight's gradient), whatever the axes' order. One axis
        at most per role (batch, input channel, output channel); anything else (depthwise or
        grouped channels, two batch axes) keeps the einsum over the view."""
        for x, other in (operands, operands[::-1]):
            read = self._window(x, over)
            if read is None or not 1 <= len(read.windows) <= 3 or self._bool_only(other) \
                    or other.has(sp.KroneckerDelta):
                continue
            out = self._conv(read, self.lower(other), set(over))
            if out is not None:
                return out
        return None

    def _conv(self, read: WindowRead, w: Arr, over: set) -> Arr | None:
        d = len(read.windows)
        outs, taps = set(read.outs), set(read.taps)
        x_axes = read.view_axes[:read.rank]
        x = self.names[read.name]
        strides = self._strides([win.stride for win in read.windows])
        pads = self._zero_fold(read)
        if pads is not None:  # X padded by the convolution itself: no copy of X
            x = self.fold[read.name].source
            strides += self._padding(pads)
        summed = [a for a in read.plain if a in over]
        free = [a for a in read.plain if a not in over]
        others = [a for a in w.axes if a not in set(read.plain) | outs | taps]
        if len(summed) > 1 or len(free) > 1 or len(others) > 1 or \
                any(a in over for a in others) or set(w.axes) & set(free):
            return None
        if taps <= over and not outs & over:   # the forward: Σ over channels and taps
            if set(w.axes) != taps | set(summed) | set(others) or over != taps | set(summed):
                return None
            xg = [free, summed] + [[o] for o in read.outs]
            wg = [others, summed] + [[t] for t in read.taps]
            call = f"torch.conv{d}d({self._layout(x, x_axes, xg)}, " \
                   f"{self._layout(self.paren(w.code, w.prec, ATOM), w.axes, wg)}"
            groups = [free, others] + [[o] for o in read.outs]
            axes = tuple(a for g in groups for a in g)
            return Conv(self._unlayout(call + strides + ")", groups), axes, ATOM,
                        call, strides + ")", others[0] if others else None,
                        self._unlayout("", groups))
        elif outs <= over and not taps & over:  # the weight's gradient: Σ over batch, positions
            if set(w.axes) != outs | set(summed) | set(others) or over != outs | set(summed):
                return None
            xg = [summed, free] + [[o] for o in read.outs]
            gg = [summed, others] + [[o] for o in read.outs]
            sizes = [self.ranges[a] if a in self.ranges else None for a in others + free]
            if None in sizes or any(t not in self.ranges for t in read.taps):
                return None
            size = self.sizes_code(([sizes[0]] if others else [1]) +
                                   ([sizes[-1]] if free else [1]) +
                                   [self.ranges[t] for t in read.taps])
            x_code = self._layout(x, x_axes, xg)
            g_code = self._layout(self.paren(w.code, w.prec, ATOM), w.axes, gg)
            code = f"torch.nn.grad.conv{d}d_weight({x_code}, {size}, {g_code}{strides})"
            extent = self.extents[read.name]
            pads = pads or [0] * d
            self.conv_grads.append(ConvGrad(
                "weight", code, g_code, self.sizes_code([win.stride for win in read.windows]),
                ([self.ranges[summed[0]]] if summed else [1]) +
                ([self.ranges[free[0]]] if free else [1]) +
                [extent[win.axis] - 2 * pad for win, pad in zip(read.windows, pads, strict=True)],
                x_code, self.sizes_code(pads)))
            groups = [others, free] + [[t] for t in read.taps]
        else:
            return None
        axes = tuple(a for g in groups for a in g)
        return Arr(self._unlayout(code, groups), axes, ATOM)

    def _zero_fold(self, read: WindowRead) -> list | None:
        """The paddings (P per window axis) when ``read`` reads a zero-padded copy of X
        padded on its window axes only, as much before as after: torch's convolution then
        pads X itself (``padding=P``) and no padded copy is read."""
        fold = self.fold.get(read.name)
        if fold is None or fold.fill != 0:
            return None
        axes = {w.axis for w in read.windows}
        for k, (lo, hi) in enumerate(fold.widths):
            if (k in axes and sp.expand(lo - hi) != 0) or (k not in axes and (lo, hi) != (0, 0)):
                return None
        self.folded.add(read.name)
        return [fold.widths[w.axis][0] for w in read.windows]

    def _unpad_fold(self, windows) -> list | None:
        """The paddings P when the window scatter being lowered is the body of an ``Unpad``
        (the slice [P:P + H] of a padded copy's adjoint) along exactly its window axes, as
        much before as after: a transposed convolution with ``padding=P`` takes the slice
        itself. The Unpad is then consumed (:meth:`_print_Unpad` drops its slice)."""
        e = self._unpad
        if e is None:
            return None
        shifts = {hp: (h, before) for hp, h, before in e.shifts}
        if set(shifts) != {win[0] for win in windows}:
            return None
        pads = []
        for win in windows:
            h, before = shifts[win[0]]
            after = sp.expand(self.ranges[win[0]] - before - self.ranges[h])
            if sp.expand(after - before) != 0:
                return None
            pads.append(before)
        self._unpad, self._unpadded = None, True
        return pads

    @property
    def conv_grads(self) -> list:
        """The convolution gradient calls lowered so far (:class:`ConvGrad`)."""
        return self.__dict__.setdefault("_conv_grads", [])

    def window_transpose(self, values, windows) -> Arr | None:
        """The adjoint of a window read as torch's own backward: Σ_o G[n,o,i]·W[o,c,p]
        scattered to S·i + p is ``torch.nn.grad.conv*d_input`` (a transposed convolution
        into the input's full size: measured faster than ``torch.conv_transpose2d``, by 2× at
        1→32 channels, and exact where the stride leaves entries over)."""
        over, body = set(), values
        if isinstance(body, sp.Sum):
            over, body = {lim[0] for lim in body.limits}, body.function
        operands = [f for f in sp.Mul.make_args(body) if self._indices_of(f)]
        if len(operands) != 2 or len(operands) != len(sp.Mul.make_args(body)) or \
                not 1 <= len(windows) <= 3 or any(self._bool_only(f) for f in operands) or \
                any(f.has(sp.KroneckerDelta) for f in operands):
            return None
        outs = tuple(w[1] for w in windows)
        taps = tuple(w[2] for w in windows)
        g, w = (self.lower(f) for f in operands)
        if not set(outs) <= set(g.axes):
            g, w = w, g
        if not set(outs) <= set(g.axes) or set(taps) & set(g.axes) or \
                not set(taps) <= set(w.axes) or set(outs) & set(w.axes):
            return None
        shared = [a for a in g.axes if a in w.axes]
        batch = [a for a in g.axes if a not in shared and a not in outs]
        chans = [a for a in w.axes if a not in shared and a not in taps]
        if set(shared) != over or len(shared) > 1 or len(batch) > 1 or len(chans) > 1:
            return None
        gg = [batch, shared] + [[o] for o in outs]
        wg = [shared, chans] + [[t] for t in taps]
        if any(a not in self.ranges for a in batch + chans):
            return None
        # the input's size given in full: the entries a stride leaves over come out as zeros;
        # inside the slice of a padded copy's adjoint, the source's size and padding=P
        pads = self._unpad_fold(windows) or [0] * len(windows)
        sizes = ([self.ranges[batch[0]]] if batch else [1]) + \
            ([self.ranges[chans[0]]] if chans else [1]) + \
            [sp.expand(self.ranges[win[0]] - 2 * p) for win, p in zip(windows, pads, strict=True)]
        size = self.sizes_code(sizes)
        size = self.bind("input_size", size) if len(size) > 24 else size
        w_code = self._layout(self.paren(w.code, w.prec, ATOM), w.axes, wg)
        g_code = self._layout(self.paren(g.code, g.prec, ATOM), g.axes, gg)
        code = f"torch.nn.grad.conv{len(windows)}d_input({size}, {w_code}, {g_code}" \
               f"{self._strides([win[3] for win in windows])}{self._padding(pads)})"
        self.conv_grads.append(ConvGrad("input", code, g_code,
                                        self.sizes_code([win[3] for win in windows]), sizes,
                                        w_code, self.sizes_code(pads)))
        groups = [batch, chans] + [[win[0]] for win in windows]
        return Arr(self._unlayout(code, groups), tuple(a for gr in groups for a in gr), ATOM)

    def window_max_grad(self, grad: Arr, read: WindowRead, windows) -> Arr | None:
        """Max pooling's backward, torch's own kernel: 2-D or 3-D windows, last in X, after
        one or two other axes. It reads the argmax the forward's ``max_pool*d_with_indices``
        kept (a kernel-owned saved temporary, :meth:`window_max`) when there is one, and
        otherwise the ``window_max_grad`` helper recomputes it."""
        if len(windows) not in (2, 3) or len(read.plain) not in (1, 2):
            return None
        g = self._layout(self.paren(grad.code, grad.prec, ATOM), grad.axes,
                         [[a] for a in read.plain + read.outs])
        kernel = self.sizes_code([self.ranges[t] for t in read.taps])
        strides = self.sizes_code([w.stride for w in read.windows])
        first = self.owned.get(self._pool_key(read, kernel, strides))
        self.helpers.add("window_max_grad")
        code = f"window_max_grad({g}, {self.names[read.name]}, {kernel}, {strides}" + \
            (f", {first})" if first is not None else ")")
        return Arr(code, read.plain + tuple(w[0] for w in windows), ATOM)

    @staticmethod
    def _pool_key(read: WindowRead, kernel: str, strides: str) -> tuple:
        """What identifies a max pooling's argmax between forward and backward: the tensor
        read, the window and the strides."""
        return ("max_pool", read.name, kernel, strides)

    def window_max(self, e: MaxOver) -> Arr | None:
        """max over the taps of X[n, c, S·i + p, S·j + q] as ``torch.max_pool2d`` (1-3
        window axes, last in X, after one or two other axes). In a forward whose backward
        may need it (``keep_owned``), 2-D and 3-D pooling run ``max_pool*d_with_indices``,
        as autograd does for ``F.max_pool2d``, and keep the argmax (the first maximum of each
        window, row-major) as a kernel-owned temporary, so that the backward does not
        recompute it."""
        read = self._window(e.body, tuple(e.over))
        if read is None or set(e.over) != set(read.taps) or not read.trailing or \
                len(read.plain) not in (1, 2):
            return None
        d = len(read.windows)
        kernel = self.sizes_code([self.ranges[t] for t in read.taps])
        strides = self.sizes_code([w.stride for w in read.windows])
        x = self.names[read.name]
        if self.keep_owned and d in (2, 3):
            pool = self.bind("pool", f"torch.ops.aten.max_pool{d}d_with_indices({x}, "
                                     f"{kernel}, {strides})")
            self.owned[self._pool_key(read, kernel, strides)] = \
                self.bind("argmax", f"{pool}[1]")
            return Arr(f"{pool}[0]", read.plain + read.outs, ATOM)
        code = f"torch.max_pool{d}d({x}, {kernel}, {strides})"
        return Arr(code, read.plain + read.outs, ATOM)

    # -- fewer full-size passes: addcmul, and low-rank factors distributed into sums -------
    def _print_Add(self, e) -> Arr:
        """``a + s·x`` as ``torch.addcmul(a, s, x)`` (``torch.add(a, x, alpha=s)`` for a
        number s): one pass over the data instead of two."""
        if self.ref is not None:
            # torch neither adds nor subtracts a boolean mask: [A = max A] − c takes the
            # mask as a float tensor first
            e = self._masks_as_numbers(e, always=True)
            if not isinstance(e, sp.Add):
                return self.lower(e)
        terms = list(e.as_ordered_terms())
        fused = self._addmm(terms) or self._conv_bias(terms) or self._lerp(terms)
        if fused is not None:
            return fused
        best = None
        for t in terms:
            split = self._split_product(t)
            if split is not None and (best is None or len(split[1].axes) > len(best[1][1].axes)):
                best = (t, split)
        if best is None or len(terms) < 2:
            return self._add_in_place(terms) or super()._print_Add(e)
        term, (small_expr, big) = best
        rest_expr = sp.Add(*[t for t in terms if t is not term])
        if not self._is_array(rest_expr):  # addcmul's input must be a tensor
            return self._add_in_place(terms) or super()._print_Add(e)
        rest = self.lower(rest_expr)
        if not self._is_array(small_expr):  # a + s·x with s a number: add's alpha=s
            return self._add_scaled(rest_expr, rest, small_expr, big)
        small, value = self._number_factor(small_expr)
        value = f", value={_bare(value)}" if value else ""
        axes = self._union([rest, small, big])
        if self._fresh(rest_expr, rest, axes):  # a temporary of its own: update it in place
            return Arr(f"{self.paren(rest.code, rest.prec, ATOM)}.addcmul_("
                       f"{self.align(small, axes)}, {self.align(big, axes)}{value})", axes, ATOM)
        if any(self._column(a, axes) for a in (rest, small, big)):
            # measured at 256×1024: addcmul over a column-broadcast operand (x[:, None]) is
            # slower than the multiply and subtract it replaces
            return self._add_in_place(terms) or super()._print_Add(e)
        first, second = self.align(rest, axes), self.align(big, axes)
        return Arr(f"torch.addcmul({first}, {self.align(small, axes)}, {second}{value})", axes,
                   ATOM)

    def _add_scaled(self, rest_expr, rest: Arr, number, big: Arr) -> Arr:
        """``a + c·x`` (c a number: sizes, hyper-parameters) as ``torch.add(a, x, alpha=c)``
        or ``torch.sub(a, x, alpha=−c)``, ``a.add_``/``a.sub_`` when a is a fresh temporary:
        one call, where ``c * x`` wraps c in a tensor and costs a call of its own (measured
        2.5–5 µs a call at small sizes, never slower at 256×1024, broadcast x included)."""
        negative = number.could_extract_minus_sign()
        alpha = self.lower(-number if negative else number)
        axes = self._union([rest, big])
        second = self.align(big, axes)
        op = "sub" if negative else "add"
        if self._fresh(rest_expr, rest, axes):
            return Arr(f"{self.paren(rest.code, rest.prec, ATOM)}.{op}_({second}, "
                       f"alpha={_bare(alpha.code)})", axes, ATOM)
        return Arr(f"torch.{op}({self.align(rest, axes)}, {second}, "
                   f"alpha={_bare(alpha.code)})", axes, ATOM)

    def _number_factor(self, small) -> tuple[Arr, str | None]:
        """``small`` = c·s with c a number (sizes, hyper-parameters) and s an array: (s
        lowered, c's code), so that addcmul takes c as its ``value=`` instead of a call that
        multiplies s by it; (small lowered, None) when there is no such c, or s is a mask."""
        factors = sp.Mul.make_args(small)
        numbers = [f for f in factors if not self._is_array(f)]
        arrays = [f for f in factors if self._is_array(f)]
        if not numbers or not arrays or any(self._is_mask(f) for f in arrays):
            return self.lower(small), None
        return self.lower(sp.Mul(*arrays)), self.lower(sp.Mul(*numbers)).code

    def _lerp(self, terms) -> Arr | None:
        """``w·b + (1 − w)·a`` (w a number, a and b float arrays: a running average) as
        ``torch.lerp(a, b, w)`` = a + w·(b − a): one call instead of a multiply and an
        add (measured 2.1 against 4.4 µs at 32–128 values with the end's dtype cast, torch
        2.13 CPU)."""
        if len(terms) != 2:
            return None
        parts = []
        for t in terms:
            factors = sp.Mul.make_args(t)
            arrays = [f for f in factors if self._is_array(f)]
            if not arrays or any(self._is_mask(f) for f in arrays) or self._bool_only(t):
                return None
            parts.append((sp.Mul(*[f for f in factors if not self._is_array(f)]),
                          sp.Mul(*arrays)))
        (w, b), (v, a) = parts
        if sp.expand(w + v) != 1 or not w.free_symbols:  # 2·a − b stays a subtraction
            return None
        if self._is_number_like(v) and not self._is_number_like(w):
            (w, b), (v, a) = (v, a), (w, b)  # the weight is the simpler of w and 1 − w
        start, end = self.lower(a), self.lower(b)
        axes = self._union([start, end])
        if not axes or not self._VIEW.fullmatch(start.code):
            return None  # (a named start: its name is read twice below)
        # lerp refuses a float32 start with a float64 end where the multiply and add
        # promoted; the start's dtype is what the in-place add it replaces gave
        end_code = f"{self.paren(end.code, end.prec, ATOM)}.type_as({start.code})"
        return Arr(f"torch.lerp({self.align(start, axes)}, "
                   f"{self.align(Arr(end_code, end.axes, ATOM), axes)}, "
                   f"{_bare(self.lower(w).code)})", axes, ATOM)

    @staticmethod
    def _is_number_like(x) -> bool:
        """A single symbol or number (``momentum``), not a sum (``1 − momentum``)."""
        return not isinstance(x, sp.Add)

    def _conv_bias(self, terms) -> Arr | None:
        """``b[o] + Σ W·X[window]`` as ``torch.conv2d(X, W, b)``: the convolution adds the
        bias itself instead of a pass of its own over the output."""
        if len(terms) != 2:
            return None
        for t, rest in (terms, terms[::-1]):
            if not isinstance(t, sp.Sum) or rest.could_extract_minus_sign() or \
                    not self._is_array(rest) or self._bool_only(rest):
                continue
            conv = self.lower(t)
            if not isinstance(conv, Conv) or conv.channel is None:
                continue
            bias = self.lower(rest)
            if bias.axes == (conv.channel,):
                return Arr(f"{conv.call}, {bias.code}{conv.tail}{conv.squeeze}", conv.axes,
                           ATOM)
        return None

    def _addmm(self, terms) -> Arr | None:
        """``c + A @ B`` (c broadcast over the product's rows or columns) as
        ``torch.addmm(c, A, B)``: BLAS starts from c instead of zeros, so the sum costs no pass
        and no temporary of its own (what ``torch.nn.functional.linear`` does with a bias)."""
        for t in terms:
            if not isinstance(t, sp.Sum):
                continue
            mm = self.lower(t)
            if not isinstance(mm, MatMul) or mm.batch:
                continue
            rest_expr = sp.Add(*[u for u in terms if u is not t])
            if not self._is_array(rest_expr) or self._bool_only(rest_expr):
                return None
            rest = self.lower(rest_expr)
            if set(rest.axes) <= set(mm.axes):
                return Arr(f"torch.addmm({self.align(rest, mm.axes)}, {mm.left}, {mm.right})",
                           mm.axes, ATOM)
        return None

    # -- in-place updates of temporaries the kernel owns --------------------------------------
    _VIEW = re.compile(r"[A-Za-z_][\w.]*(\[[^\]]*\])?(\.T)?")

    def _fresh(self, expr, arr: Arr, axes) -> bool:
        """Is ``arr`` a full-size float tensor that this expression has just allocated (not
        a name, a view or a boolean mask), so that updating it in place is safe?

        Only sums, products and matrix products: autograd keeps the outputs of exp, tanh,
        sqrt or 1/x for their backward (an in-place update would break autograd through the
        forward, and the double backward), while add, mul, addcmul and mm keep only their
        inputs; so ``torch.reciprocal(a * b)``, a product's lowering of 1/(a·b), is not fresh."""
        made = isinstance(expr, (sp.Add, sp.Mul)) or (
            isinstance(expr, sp.Sum) and isinstance(arr, MatMul))
        return bool(axes) and tuple(arr.axes) == tuple(axes) and made \
            and not self._VIEW.fullmatch(arr.code) and self._is_array(expr) \
            and not arr.code.startswith("torch.reciprocal(") \
            and not self._bool_only(expr)  # −1·mask is an integer tensor: no float fits in it

    def _scale_in_place(self, high: list, high_den: list, low: Arr | None,
                        axes) -> Arr | None:
        k = next((k for k, (f, a) in enumerate(high) if self._fresh(f, a, axes)), None)
        if k is None:
            return None
        code = self.paren(high[k][1].code, high[k][1].prec, ATOM)
        for j, (_, a) in enumerate(high):
            if j != k:
                code += f".mul_({self.align(a, axes)})"
        for a in high_den:
            code += f".div_({self.align(a, axes)})"
        if low is not None:
            code += f".mul_({self.align(low, axes) if low.axes else low.code})"
        return Arr(code, axes, ATOM)

    def _add_in_place(self, terms) -> Arr | None:
        """``a + b − c`` as ``a.add_(b).sub_(c)`` when ``a`` is a fresh full-size temporary."""
        negative = [t.could_extract_minus_sign() for t in terms]
        arrs = [self.lower(-t if neg else t) for t, neg in zip(terms, negative, strict=True)]
        axes = self._union(arrs)
        k = next((j for j, (t, a, neg) in enumerate(zip(terms, arrs, negative, strict=True))
                  if not neg and self._fresh(t, a, axes)), None)
        if k is None:
            return None
        code = self.paren(arrs[k].code, arrs[k].prec, ATOM)
        for j, (t, b, neg) in enumerate(zip(terms, arrs, negative, strict=True)):
            if j == k:
                continue
            alpha = ""
            # c·x: alpha=c, not a call for c * x (a mean keeps its own one call)
            if b.axes and isinstance(t, sp.Mul) and not isinstance(b, Mean):
                scaled, c = self._number_factor(-t if neg else t)
                if c is not None and scaled.axes == b.axes:
                    b, alpha = scaled, f", alpha={_bare(c)}"
            code += f".{'sub_' if neg else 'add_'}" \
                    f"({self.align(b, axes) if b.axes else b.code}{alpha})"
        return Arr(code, axes, ATOM)

    def _split_product(self, t):
        """(small factor, full-size factor lowered) for a product worth fusing."""
        if isinstance(t, sp.Mul) and self._needs_guard(t):
            return None  # lowered as a where() of its own
        factors = list(sp.Mul.make_args(t))
        arrays = [f for f in factors if self._is_array(f)
                  and not (isinstance(f, sp.Pow) and f.exp.is_negative)]
        if not arrays or len(factors) < 2:
            return None
        big = max(arrays, key=lambda f: len(self._axes_of(f)))
        rest = [f for f in factors if f is not big]
        for f in rest:  # a named common term (G_gamma) covering big and one more factor
            pair = self._reuse(big * f)
            if pair is not None and len(rest) > 1:
                others = [g for g in rest if g is not f]
                return sp.Mul(*others), pair
        small = sp.Mul(*rest)
        if small in (1, -1):  # X − mu needs no fusing
            return None
        return small, self.lower(big)

    def _column(self, a: Arr, axes) -> bool:
        """Does broadcasting ``a`` against ``axes`` need a trailing new axis (``x[:, None]``)?"""
        return bool(a.axes) and tuple(axes[len(axes) - len(a.axes):]) != tuple(
            s for s in axes if s in a.axes)

    def _axes_of(self, f) -> set:
        """The index symbols ``f`` varies over (bound indices of inner sums excluded)."""
        return {s for s in self._indices_of(f) if s.is_integer and not s.is_positive}

    def _print_Sum(self, e) -> Arr:
        picked = self._nll_sum(e)
        return picked if picked is not None else super()._print_Sum(e)

    def _nll_sum(self, e) -> Arr | None:
        """Σ_n c·A[n, y[n]] over every axis of the labels y (A's class axis second, as
        ``F.nll_loss`` takes it: A[n, y[n, t], t] too) as ``c`` times minus
        ``torch.nn.functional.nll_loss(A, y, reduction="sum")``: one call where the gather
        is four (index view, gather, its view, sum), ~8 µs a step at 32×10 (cross-entropy's
        −Σ_n log P[n, y[n]]). None for any other sum."""
        over = [lim[0] for lim in e.limits]
        for var, lo, hi in e.limits:
            self.ranges.setdefault(var, sp.expand((hi - lo + 1).xreplace(self.scalars)))
        reads = [f for f in sp.Mul.make_args(e.function) if self._indices_of(f) & set(over)]
        parts = self._gather_parts(reads[0]) if len(reads) == 1 else None
        if parts is None or parts[0] != 1 or e.function.has(sp.KroneckerDelta):
            return None
        _, label, rest = parts
        y = self.lower(label)
        if tuple(label.indices) != rest or set(over) != set(rest) or y.axes != rest or \
                any(lo != 0 or hi != self.ranges[v] - 1 for v, lo, hi in e.limits):
            return None
        loss = sp.Dummy("nll")
        x = self.names[reads[0].base.label.name]
        self.temps[loss] = Arr(f'torch.nn.functional.nll_loss({x}, {y.code}, reduction="sum")',
                               (), ATOM)
        self.imports.add(self.module)
        return self.lower(-e.function.xreplace({reads[0]: loss}))

    def _print_Mul(self, e) -> Arr:
        masked = self._threshold(e)
        if masked is not None:
            return masked
        return self._spread_low_rank(e)

    def _threshold(self, e) -> Arr | None:
        """``[x > 0]·R`` as ``threshold_backward(R, x, 0)``: ReLU's own backward, one pass
        that keeps R where x > 0. A boolean mask times a float tensor is a type-promoting
        multiply, measured 5-10× slower at 128×256."""
        steps = [f for f in e.args if isinstance(f, sp.Heaviside)]
        rest = sp.Mul(*[f for f in e.args if not isinstance(f, sp.Heaviside)])
        if len(steps) != 1 or not self._is_array(rest) or self._bool_only(rest):
            return None
        r, x = self.lower(rest), self.lower(steps[0].args[0])
        axes = self._union([r, x])
        return Arr(f"torch.ops.aten.threshold_backward({self.align(r, axes)}, "
                   f"{self.align(x, axes)}, 0)", axes, ATOM)

    def _spread_low_rank(self, e) -> Arr:
        """``L·(A − a·x̂ − b)`` with L low-rank is ``L·A − (L·a)·x̂ − L·b``: every full-size
        term then folds into one addcmul instead of costing a pass of its own."""
        coeff, factors = e.as_coeff_mul()
        sums = [f for f in factors if isinstance(f, sp.Add)]
        if len(sums) == 1 and coeff.is_Number:
            full = self._axes_of(e)
            inner = sums[0]
            others = sp.Mul(*[f for f in factors if f is not inner])
            order = [x for x in self.order if x in full] + sorted(
                full - set(self.order), key=str)
            low = [x for x in order if x in self._axes_of(others)]
            row = tuple(order[len(order) - len(low):]) == tuple(low)
            if row and self._axes_of(inner) == full and self._axes_of(others) != full \
                    and self._is_array(others) and any(
                        self._split_product(t) is not None or len(sp.Mul.make_args(t)) == 1
                        for t in inner.args):
                spread = sp.Add(*[coeff * others * t for t in inner.args])
                return self._print_Add(spread) if isinstance(spread, sp.Add) \
                    else super()._print_Mul(e)
        return super()._print_Mul(e)

    def _typed(self, num: list, den: list) -> list:
        """``alpha * (A == m)`` would be float32 whatever A is (a bool tensor times a Python
        number takes the default dtype): a product of masks and numbers converts its first
        mask to the dtype of a tensor the kernel has."""
        arrs = [a for _, a in num]
        masks = [k for k, (f, _) in enumerate(num) if self._bool_only(f)]
        if not masks or self.ref is None or any(
                self._is_array(f) and k not in masks for k, (f, _) in enumerate(num)) or any(
                self._is_array(f) for f in den):
            return arrs
        k = masks[0]
        a = arrs[k]
        arrs[k] = Arr(f"{self.paren(a.code, a.prec, ATOM)}.to({self.ref}.dtype)", a.axes, ATOM)
        return arrs

    def _numeric(self, f, arr: Arr) -> Arr:
        """torch.einsum refuses a bool or int64 operand next to a float one."""
        if self.ref is None or not self._bool_only(f):
            return arr
        return Arr(f"{self.paren(arr.code, arr.prec, ATOM)}.to({self.ref}.dtype)", arr.axes,
                   ATOM)

    def cast_like(self, code: str, ref: str) -> str:
        return f"{code}.to({ref}.dtype)"

    def dtype_of(self, ref: str) -> str:
        return f"{ref}.dtype"  # a 0-d upstream gradient is a tensor here (torch.autograd)

    def add_at_labels(self, positions, coef, axes: tuple, target: str) -> str:
        """``.scatter_add_(1, y.unsqueeze(1), (-scale).to(dX.dtype).expand(N, 1))``: one
        scatter along the class axis. ``index_put_(…, accumulate=True)`` sorts its indices
        on a GPU (0.4–0.5 ms of host time a step measured on an H200, a tenth of the whole
        step of a small CNN), and ``[…] -= v`` reads, subtracts and writes back (three ops);
        on the CPU scatter_add_ is also the fastest of the three (7 µs against 9 and 10 at
        32×10). One label per position, so nothing adds twice; under
        ``torch.use_deterministic_algorithms`` torch computes it deterministically. The
        values take the target's dtype (a float64 upstream gradient of float32 logits), and
        a number (no tensor to scatter) takes the ``-=`` form."""
        if not self._is_array(coef):
            return super().add_at_labels(positions, coef, axes, target)
        dim = positions.axes.index(positions.c)
        index = _atom(self.align(self.lower(positions.label), axes))
        value = self.lower(coef)
        code = _atom(self.align(value, positions.axes) if value.axes else value.code)
        sizes = ", ".join("1" if a == positions.c else
                          self.lower(sp.sympify(self.ranges[a])).code for a in positions.axes)
        return (f".scatter_add_({dim}, {index}.unsqueeze({dim}), "
                f"{code}.to({target}.dtype).expand({sizes}))")

    def gather(self, x: str, index: str, axis: int, positions: str | None) -> str:
        """``x.gather(axis, index)`` with the axis dropped; ``torch.take_along_dim`` where
        the index broadcasts (``positions`` None: gather would read only the first entries
        of the axes the index lacks)."""
        drop = ", ".join([":"] * axis + ["0"])
        if positions is not None:
            return f"{x}.gather({axis}, {index})[{drop}]"
        return f"torch.take_along_dim({x}, {index}, dim={axis})[{drop}]"

    def scatter_scalar(self, code: str, expr) -> str:
        """A number scattered over positions becomes a 0-d tensor of the kernel's dtype."""
        if self._is_array(expr) or self.ref is None:
            return code
        return f"{self.ref}.new_tensor({code})"

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        if not arr.axes:  # a number or a 0-d tensor, repeated over the whole shape
            return f"{self.ref}.new_ones(({', '.join(shape)},)) * {self.paren(code, arr.prec, 2)}"
        return f"{self.paren(code, arr.prec, 4)}.expand({', '.join(shape)}).contiguous()"


def _atom(code: str) -> str:
    """``code`` as an operand of an attribute access: in parentheses unless it is a name, an
    attribute, a subscript or a call."""
    import ast

    body = ast.parse(code, mode="eval").body
    return code if isinstance(body, (ast.Name, ast.Attribute, ast.Subscript, ast.Call)) \
        else f"({code})"


def _bare(code: str) -> str:
    """``code`` without parentheses around the whole of it (a keyword argument's value)."""
    while code.startswith("(") and code.endswith(")"):
        depth = 0
        for k, ch in enumerate(code):
            depth += (ch == "(") - (ch == ")")
            if depth == 0 and k < len(code) - 1:
                return code  # (a) * (b): the first parenthesis closes early
        code = code[1:-1]
    return code


def pair_conv_grads(stmts: list, grads, printer: TorchPrinter, names_read, fresh,
                    keep: set):
    """``stmts`` (name, code) with each convolution's input and weight gradients (a
    ``conv*d_input`` and a ``conv*d_weight`` call on the same upstream gradient, strides and
    input sizes) computed by one ``conv_backward`` call, torch's own
    ``convolution_backward`` as autograd runs it for F.conv*d (measured ~10 % faster than
    the two calls at 32→64 channels, and one call's overhead at small sizes instead of
    two). Its output mask is the ``need`` flags of the gradients that read each half:
    ``grads`` gives, per statement name, the flags' condition (None: always). ``fresh``
    makes a new variable name; ``keep`` holds the names that must stay (the gradients)."""
    calls = printer.conv_grads
    for a in [c for c in calls if c.role == "input"]:
        b = next((c for c in calls if c.role == "weight" and c.grad == a.grad and
                  c.strides == a.strides and c.padding == a.padding and
                  len(c.sizes) == len(a.sizes) and
                  all(sp.expand(sp.sympify(x) - y) == 0 for x, y in zip(a.sizes, c.sizes,
                                                                        strict=True))),
                 None)
        where = [next((k for k, (_, code) in enumerate(stmts) if c.call in code), None)
                 for c in (a, b)] if b is not None else [None]
        if None in where:
            continue
        bias = _bias_grad(stmts, a.grad, len(a.sizes))
        if bias is not None and (not grads(stmts[bias][0]) or bias < min(where) and names_read(
                f"{a.grad} {b.other} {a.other}") & {n for n, _ in stmts[bias:]}):
            bias = None  # needed by no gradient, or before the convolution's arguments
        first = min(where + ([bias] if bias is not None else []))
        name = fresh("conv_grads")
        mask = ", ".join(grads(stmts[k][0]) for k in where + ([bias] if bias is not None else []))
        code = f"conv_backward({a.grad}, {b.other}, {a.other}, {a.strides}, " \
               f"{a.padding}, ({mask}))"
        later = {n for n, _ in stmts[first:]}
        if names_read(code) & later:
            continue  # an argument is computed after the first of the two
        calls.remove(b)
        for part, (k, c) in enumerate(zip(where, (a, b), strict=True)):
            line = stmts[k][1]  # its type (an in-place update) stays
            stmts[k] = (stmts[k][0], type(line)(line.replace(c.call, f"{name}[{part}]")))
        if bias is not None:
            stmts[bias] = (stmts[bias][0], f"{name}[2]")
        stmts.insert(first, (name, code))
        printer.helpers.add("conv_backward")
    return _inline_aliases(stmts, keep, names_read)


def _bias_grad(stmts: list, grad: str, rank: int) -> int | None:
    """The position of the statement that sums a convolution's upstream gradient ``grad``
    (``rank`` axes, in the layout batch, channels, spatial…) over every axis but the
    channels, ``G.sum((0, 2, 3))``: the gradient of a per-channel bias added to the
    convolution, which torch's convolution backward computes as its third output (as
    autograd does for F.conv2d with a bias). None when there is none."""
    want = set(range(rank)) - {1}
    pattern = re.compile(rf"{re.escape(grad)}\.sum\(\((\d+(?:, \d+)*)\)\)")
    for k, (_, code) in enumerate(stmts):
        branches = re.fullmatch(r"\((.+) if (.+) else (.+)\)", code)  # TorchPrinter._reduce
        m = pattern.fullmatch(branches.group(3) if branches else code)
        if m and {int(x) for x in m.group(1).split(", ")} == want:
            return k
    return None


def _inline_aliases(stmts: list, keep: set, names_read) -> list:
    """``window_grad = conv_grads[0]`` read by later lines as ``conv_grads[0]`` itself
    (a temporary named only for a long call that is now short); ``keep``: names that stay."""
    out = []
    for k, (name, code) in enumerate(stmts):
        if name not in keep and re.fullmatch(r"[A-Za-z_]\w*\[\d\]", code) and \
                not any(name in names_read(c) for n, c in out):
            stmts[k + 1:] = [(n, type(c)(re.sub(rf"(?<![.\w]){re.escape(name)}\b", code, c))
                              if name in names_read(c) else c) for n, c in stmts[k + 1:]]
            continue
        out.append((name, code))
    return out


HELPERS = {
    "conv_backward": '''def conv_backward(grad, x, weight, strides, padding, need):
    """(∂L/∂x, ∂L/∂weight) of a convolution y = conv*d(x, weight, stride, padding) from
    grad = ∂L/∂y in one call of torch's own convolution backward (the one autograd runs for
    F.conv*d), and with three flags in ``need`` also ∂L/∂b of a per-channel bias added to y
    (grad summed over all axes but the channels); ``need`` says which to compute (the
    others are None)."""
    d = len(strides)
    zeros, ones = (0,) * d, (1,) * d
    bias = [weight.shape[0]] if len(need) > 2 else None
    return torch.ops.aten.convolution_backward(grad, x, weight, bias, strides, padding, ones,
                                               False, zeros, 1, (*need, False)[:3])[:len(need)]''',
    "scatter_add": '''def scatter_add(values, index, size, lead, batch=0):
    """out[..., b, index[b, j]] += values[..., b, j]: the adjoint of reading x[..., index] with
    an integer tensor (strided convolution, pooling). ``lead`` axes of ``values`` come before
    the index axes; the first ``batch`` axes of ``index`` are kept (one scatter per entry),
    the others are summed into a new last axis of ``size`` entries."""
    shape = tuple(values.shape[:lead]) + tuple(index.shape)
    kept = tuple(index.shape[:batch])
    offset = torch.arange(math.prod(kept), device=index.device).reshape(
        kept + (1,) * (index.dim() - batch)) * size
    out = values.new_zeros(shape[:lead] + (math.prod(kept) * size,))
    flat = values.expand(shape).reshape(shape[:lead] + (-1,))
    out.index_add_(lead, (index + offset).reshape(-1), flat)
    return out.reshape(shape[:lead] + kept + (size,))''',
    "window_add": '''def window_add(values, sizes, taps, strides):
    """out[..., S·i + p] += values[..., i, p] over every window position i and tap p: the
    adjoint of reading x through strided windows (a convolution's or a pooling's input), as one
    strided slice-add per tap (K² for a K×K window) instead of a scatter. ``values`` has the
    window positions, then the taps, last (d of each, d = len(sizes)); ``sizes`` are the
    extents of out's window axes, ``taps`` the window's, ``strides`` its steps."""
    d = len(sizes)
    values = values.expand(*values.shape[:values.dim() - d], *taps)
    lead = tuple(values.shape[:values.dim() - 2 * d])
    counts = tuple(values.shape[values.dim() - 2 * d:])[:d]
    out = values.new_zeros(lead + tuple(sizes))
    for tap in itertools.product(*map(range, taps)):
        rows = tuple(slice(p, p + s * (n - 1) + 1, s)
                     for p, n, s in zip(tap, counts, strides, strict=True))
        out[(Ellipsis, *rows)] += values[(Ellipsis, *[slice(None)] * d, *tap)]
    return out''',
    "window_sum": '''def window_sum(windows, d):
    """The sum over each window of a window view (its last ``d`` axes are the taps), as one
    add per tap: a reduction over small strided axes is many times slower."""
    out = None
    for tap in itertools.product(*map(range, windows.shape[windows.dim() - d:])):
        values = windows[(Ellipsis, *tap)]
        out = values.clone() if out is None else out.add_(values)
    return out''',
    "window_max_grad": '''def window_max_grad(grad, x, taps, strides, first=None):
    """``grad`` of each strided window's maximum sent to its first maximum in x (row-major),
    summed where windows overlap: max pooling's backward, torch's own kernel (2-D or 3-D).
    ``first`` holds each window's argmax as ``max_pool*d_with_indices`` returns it (the
    forward keeps it); without it the argmax is recomputed from x."""
    d = len(taps)
    if first is None:
        _, first = getattr(torch.ops.aten, f"max_pool{d}d_with_indices")(x, taps, strides)
    pool_backward = getattr(torch.ops.aten, f"max_pool{d}d_with_indices_backward")
    return pool_backward(grad, x, taps, strides, (0,) * d, (1,) * d, False, first)''',
    "join_axes": '''def join_axes(values, sizes, lead):
    """out[..., B·a + b] = values[..., a, b]: the adjoint of reading x[..., a*B + b], where a
    split index reads every position once, so that its scatter-add is a reshape. ``lead`` axes
    of ``values`` come before the split axes, whose ``sizes`` are (A, B)."""
    shape = tuple(values.shape[:lead]) + tuple(sizes)
    return values.expand(shape).reshape(shape[:lead] + (-1,))''',
    "first_hit": '''def first_hit(hit, axes):
    """``hit`` kept only at its first True over ``axes`` (row-major): ties at a maximum send
    the gradient to one element, the first, as torch.nn.functional.max_pool2d does."""
    k = len(axes)
    last = tuple(range(-k, 0))
    moved = torch.movedim(hit, axes, last)
    flat = moved.reshape(tuple(moved.shape[:moved.dim() - k]) + (-1,))
    first = flat & (flat.cumsum(-1) == 1)
    return torch.movedim(first.reshape(moved.shape), last, axes)''',
}

# torch.nn.Module's own attributes: a layer's parameter or hyper-parameter attribute must not
# replace one (a parameter called `eval` or `training`)
MODULE_ATTRIBUTES = frozenset({
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init",
    "children", "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr",
    "float", "forward", "get_buffer", "get_extra_state", "get_parameter", "get_submodule",
    "half", "ipu", "load_state_dict", "modules", "mtia", "named_buffers", "named_children",
    "named_modules", "named_parameters", "parameters", "register_backward_hook",
    "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook",
    "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
    "register_module", "register_parameter", "register_state_dict_post_hook",
    "register_state_dict_pre_hook", "requires_grad_", "set_extra_state", "set_submodule",
    "share_memory", "state_dict", "to", "to_empty", "train", "training", "type", "xpu",
    "zero_grad",
})

IMPORTS = {
    "torch": "import torch",
    "math": "import math",
    "itertools": "import itertools",
}
