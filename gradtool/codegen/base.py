"""Lowering index-notation expressions to array code: broadcasting, einsum and sums.

Every lowered value is an :class:`Arr`: a code string and the index symbols its axes stand for.
Combining two values aligns their axes by a preferred order (the result's own indices first), so
``rstd[n]·G[n,d]`` lowers to ``rstd[:, None] * G``. A sum of a product is an ``einsum``; a sum of
one operand is ``.sum(axis)``. Targets (NumPy, PyTorch) subclass :class:`ArrayPrinter` and fill
in their function tables; anything a target cannot print raises :class:`CodegenError`.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass

import sympy as sp

from gradtool.codegen.windows import WindowRead, fits, split_window, window_read
from gradtool.errors import GradtoolError
from gradtool.spec.lang import MaxOver
from gradtool.symbolic.ir import ArgMaxMask

ADD, MUL, UNARY, POW, ATOM = range(5)


class CodegenError(GradtoolError):
    """Something the code generator cannot lower (yet)."""


# functions Python's math module has: a constant argument needs no array call
MATH = frozenset({"sqrt", "exp", "log", "tanh", "sinh", "cosh", "sin", "cos", "atan", "erf"})


@dataclass(frozen=True)
class Arr:
    code: str
    axes: tuple = ()
    prec: int = ATOM


@dataclass(frozen=True)
class LabelSites:
    """Where a label scatter adds (:meth:`Printer.label_scatter`): ``code`` is the fancy
    index ``arange(N), y`` over the gradient's ``axes``, ``c`` the class axis among them and
    ``label`` the labels' indexed read (``y[n]``)."""
    code: str
    axes: tuple
    c: sp.Symbol
    label: sp.Expr

    def __str__(self) -> str:
        return self.code


@dataclass(frozen=True)
class MatMul(Arr):
    """A matrix product ``left @ right`` (the operands' code, already transposed where needed);
    ``batch`` counts the leading axes it broadcasts over. A target may fuse it further
    (torch's ``addmm`` adds a bias in the same BLAS call)."""
    left: str = ""
    right: str = ""
    batch: int = 0


@dataclass(frozen=True)
class Mean(Arr):
    """A mean ``x.mean(axes)``: ``x`` (parenthesised) had the axes ``full``, and ``reduced``
    holds the positions averaged over. Broadcast back against its operand's layout it is
    written with the reduced axes kept (``X.mean(1, keepdims=True)``) instead of ``[:, None]``."""
    x: str = ""
    full: tuple = ()
    reduced: tuple = ()


# Names the generated modules use for themselves: modules, helpers, the two kernels and the
# locals of the layer classes. A declared name equal to one of them is renamed in the kernels
# (``np`` → ``np_``); the math keeps the spec's names.
RESERVED = frozenset(keyword.kwlist) | {
    "np", "torch", "math", "erf", "expit", "scatter_add", "join_axes", "need_flags", "first_hit",
    "max", "min", "need", "keep", "window_add", "window_max", "window_max_grad", "window_sum",
    "sliding_window_view", "itertools",
    "forward", "backward", "use_torch_compile", "self", "ctx", "out", "saved", "new_state",
    "rng", "dtype", "super", "params", "state", "grads",
}


def py_name(name: str) -> str:
    """A Python identifier that shadows neither a keyword nor a module the code imports
    (kernels name things through :func:`kernel_names`, which also avoids other names)."""
    while keyword.iskeyword(name) or name in RESERVED:
        name = name + "_"
    return name


def kernel_names(declared: list[str], reserved=frozenset()) -> dict[str, str]:
    """Declared name -> its variable in the kernels: itself, or with ``_`` appended until
    it is neither reserved (``RESERVED`` and ``reserved``) nor another declared name."""
    taken = set(RESERVED) | set(reserved)
    names: dict[str, str] = {}
    for name in declared:
        var = name
        while var in taken or (var != name and var in declared):
            var += "_"
        names[name] = var
        taken.add(var)
    return names


class ArrayPrinter:
    module = "np"                      # prefix of array functions
    FUNCS: dict[str, str] = {}         # SymPy function name -> target function
    SUM = "{x}.sum({axes})"
    MEAN = "{x}.mean({axes})"
    MEAN_KEEP = "{x}.mean({axes}, keepdims=True)"
    MAX = "{x}.max({axes})"
    # a target's softmax along one axis and its log (None: the emitter keeps e = exp(f − max f),
    # Z = Σ e and e/Z, as NumPy, which has no softmax of its own)
    SOFTMAX: str | None = None
    LOG_SOFTMAX: str | None = None
    ref: str | None = None             # a tensor to take dtype and device from
    labels: frozenset = frozenset()    # names of integer-label tensors (spec.labels)

    def __init__(self, names: dict[str, str], temps: dict | None = None,
                 order: list | None = None):
        self.names = names                    # tensor / scalar name -> variable name
        self.temps = temps or {}              # CSE symbol -> Arr
        self.order = list(order or [])        # preferred axis order
        self.imports: set[str] = set()        # what the emitted code used
        self.helpers: set[str] = set()        # module-level helper functions it calls
        self.scalars: dict = {}               # inlined CSE symbol -> its (scalar) value
        self.ranges: dict = {}                # index symbol -> its size expression
        self._full: dict = {}                 # CSE symbol -> its definition, fully expanded
        self.extents: dict = {}               # tensor name -> the sizes of its axes
        self.derived: dict = {}               # derived size (OH) -> its formula
        self.taken: set = set()               # names a bound temporary must not take
        self.setup: list = []                 # (name, code) lines the next statement reads
        self._bound: dict = {}                # code -> the temporary it is bound to
        # kernel-owned saved temporaries: a forward lowering that computes something its
        # backward would otherwise recompute (max pooling's argmax) binds it and records it
        # here by a key of its own; the backward printer gets the same map and marks what it
        # reads. The emitter saves these next to the spec's tensors.
        self.owned: dict = {}                 # key -> the temporary's name
        self.keep_owned = False               # may this lowering bind owned temporaries?
        # padded copies a target's convolution may pad itself (name -> Fold), those it did
        self.fold: dict = {}
        self.folded: set = set()
        self._unpad = None                    # the Unpad whose body is being lowered
        self._unpadded = False                # did that body's lowering take the slice?

    def bind(self, stem: str, code: str) -> str:
        """A named temporary ``stem = code`` (a window view, pooling indices) that the emitter
        writes before the statement being lowered; the same code is bound once."""
        if code in self._bound:
            return self._bound[code]
        name = stem
        while name in self.taken or name in self.names.values():
            name += "_"
        self.taken.add(name)
        self._bound[code] = name
        self.setup.append((name, code))
        return name

    def take_setup(self) -> list:
        """The temporaries bound since the last call, as (name, code), oldest first."""
        out, self.setup = self.setup, []
        return out

    # -- axes ---------------------------------------------------------------------------------
    def _rank(self, sym) -> int:
        if sym not in self.order:
            # a primed copy (d') takes the place of its index (d): G[n,d'] keeps G's layout
            base = sp.Symbol(sym.name.rstrip("'"), integer=True)
            if base != sym and base in self.order:
                pos = self.order.index(base) + 1
                while pos < len(self.order) and self.order[pos].name.rstrip("'") == base.name:
                    pos += 1
                self.order.insert(pos, sym)
            else:
                self.order.append(sym)
        return self.order.index(sym)

    def _union(self, arrs) -> tuple:
        axes = []
        for a in arrs:
            for s in a.axes:
                if s not in axes:
                    axes.append(s)
        return tuple(sorted(axes, key=self._rank))

    def align(self, arr: Arr, axes: tuple) -> str:
        """Code for ``arr`` broadcastable against an array with ``axes``."""
        code, prec = arr.code, arr.prec
        present = tuple(s for s in axes if s in arr.axes)
        if present != arr.axes:
            perm = tuple(arr.axes.index(s) for s in present)
            code, prec = self.transpose(self.paren(arr.code, arr.prec, ATOM), perm), ATOM
        slots = [":" if s in arr.axes else "None" for s in axes]
        while slots and slots[0] == "None":   # broadcasting aligns from the right
            slots.pop(0)
        while slots and slots[-1] == ":":
            slots.pop()
        if slots and present == arr.axes and self._keeps_dims(arr, axes):
            pos = arr.reduced[0] if len(arr.reduced) == 1 else arr.reduced
            return self.MEAN_KEEP.format(x=arr.x, axes=pos)
        if slots:
            code, prec = f"{self.paren(code, prec, ATOM)}[{', '.join(slots)}]", ATOM
        return self.paren(code, prec, MUL) if prec < MUL else code

    @staticmethod
    def _keeps_dims(arr: Arr, axes: tuple) -> bool:
        """Does ``arr``, a mean with its reduced axes kept (size 1), broadcast against an
        array with ``axes`` to what aligning it would give: every kept axis of the mean at
        the same place from the right in ``axes``?"""
        if not isinstance(arr, Mean) or len(arr.full) > len(axes):
            return False
        tail = axes[len(axes) - len(arr.full):]
        return all(k in arr.reduced or tail[k] == s for k, s in enumerate(arr.full))

    def transpose(self, code: str, perm: tuple) -> str:
        if perm == (1, 0):
            return f"{code}.T"
        return f"{self.module}.transpose({code}, {perm})"

    @staticmethod
    def paren(code: str, prec: int, need: int) -> str:
        return f"({code})" if prec < need else code

    # -- the recursion ------------------------------------------------------------------------
    def lower(self, e) -> Arr:
        reused = self._reuse(e)
        if reused is not None:
            return reused
        if isinstance(e, sp.Mul) and self._needs_guard(e):
            return self._guarded(e)
        if isinstance(e, sp.Mul):
            mean = self._mean(e)
            if mean is not None:
                return mean
        method = getattr(self, f"_print_{type(e).__name__}", None)
        if method is not None:
            return method(e)
        if isinstance(e, sp.Function) and type(e).__name__ in self.FUNCS:
            return self._function(e)
        if e.is_number:
            return self._number(e)
        raise CodegenError(f"the {self.module} code generator cannot print "
                           f"{type(e).__name__}: {e}",
                           hint="rewrite the spec with supported functions, or report this")

    definitions: dict = {}  # CSE symbol -> the expression it names

    def _reuse(self, e) -> Arr | None:
        """A named common term that equals ``e`` up to renaming its indices: ``G_gamma``
        computed over (n, d') serves ``G[n,d]·γ[d]`` too."""
        if e.is_Atom or isinstance(e, sp.Indexed) or not self.definitions:
            return None
        from itertools import permutations

        from gradtool.symbolic.ir import rename

        mine = sorted(self._indices_of(e) & set(self.order) | (e.free_symbols - set(
            self.temps) - set(self.definitions) - {s for s in e.free_symbols
                                                    if not s.is_integer or s.is_positive}),
                      key=str)
        target = None
        for sym, value in self.definitions.items():
            if sym not in self.temps or type(value) is not type(e) or \
                    len(value.args) != len(e.args):
                continue
            theirs = list(self.temps[sym].axes)
            if len(theirs) != len(mine):
                continue
            target = self._expanded(e) if target is None else target
            full = self._full.get(sym)  # named terms inside carry no indices: expand them
            if full is None:
                full = self._full[sym] = self._expanded(value)
            for perm in permutations(mine):
                mapping = dict(zip(theirs, perm, strict=True))
                if rename(full, mapping) == target:
                    arr = self.temps[sym]
                    return Arr(arr.code, tuple(mapping[a] for a in arr.axes), arr.prec)
        return None

    def _expanded(self, e):
        """``e`` with every named common term replaced by its definition, recursively."""
        named = e.free_symbols & self.definitions.keys()
        while named:
            e = e.xreplace({k: self.definitions[k] for k in named})
            named = e.free_symbols & self.definitions.keys()
        return e

    def _number(self, e) -> Arr:
        if e.is_Integer:
            return Arr(str(int(e)), (), ATOM if e >= 0 else UNARY)
        if e.is_Rational:
            return Arr(f"{e.p} / {e.q}", (), MUL)
        if e.is_Float:
            return Arr(repr(float(e)), (), ATOM if e >= 0 else UNARY)
        self.imports.add("math")
        return Arr(self._scalar_code(e), (), ATOM)

    def _scalar_code(self, e) -> str:
        """Python for a scalar constant such as pi or sqrt(2)."""
        from sympy.printing.pycode import PythonCodePrinter

        return PythonCodePrinter({"fully_qualified_modules": True}).doprint(e)

    def _is_index(self, s) -> bool:
        return isinstance(s, sp.Symbol) and s not in self.temps and bool(s.is_integer) \
            and not s.is_positive

    def _print_Indexed(self, e) -> Arr:
        idx = tuple(e.indices)
        name = self.names[e.base.label.name]
        if all(self._is_index(i) for i in idx) and len(set(idx)) == len(idx):
            return Arr(name, idx)
        gathered = self._label_gather(e)
        if gathered is not None:
            return gathered
        read = self._window(e)
        if read is not None:  # X[n, c, S·i + p]: a strided view, no gather
            return Arr(self.bind(f"{name}_windows", self.window_view(read)), read.view_axes)
        # X[n, c, S·t + k]: index the affine positions with integer arrays, one position at a
        # time from the right (a single array index keeps its place: (N, C, T, K))
        parts, axes, seen = [], [], set()
        for i in idx:
            if self._is_index(i) and i not in seen:
                parts.append(None)
                axes.append(i)
                seen.add(i)
            elif i.is_Integer:
                parts.append(str(int(i)))
            else:
                arr = self._positions(i)
                if not arr.axes or set(arr.axes) & seen or \
                        not all(self._is_index(a) for a in arr.axes):
                    raise CodegenError(
                        f"the code generator cannot read {e} yet: an index is used twice "
                        f"(a diagonal), so there are no kernels to check",
                        hint="`gradtool derive` prints its gradient; for kernels, read the "
                             "diagonal through a separate input")
                parts.append(arr.code)
                axes.extend(arr.axes)
                seen |= set(arr.axes)
        code = name
        for p in reversed(range(len(parts))):
            if parts[p] is not None:
                code = f"{code}[{', '.join([':'] * p + [parts[p]])}]"
        return Arr(code, tuple(axes))

    # -- reads through strided windows: convolution and pooling (codegen/windows.py) -------
    def _window(self, e, hint=()) -> WindowRead | None:
        if not isinstance(e, sp.Indexed):
            return None
        return window_read(e, self._is_index, self.ranges, self.extents, hint, self.derived)

    def size_code(self, size) -> str:
        arr = self.lower(sp.sympify(size))
        return self.paren(arr.code, arr.prec, ADD + 1)

    def sizes_code(self, sizes) -> str:
        """``(K, K)`` for a tuple of sizes (``(K,)`` for one)."""
        codes = [self.lower(sp.sympify(s)).code for s in sizes]
        return f"({', '.join(codes)}{',' if len(codes) == 1 else ''})"

    def extents_code(self, sizes) -> str:
        """The sizes of the axes a window gradient is scattered into; a long tuple is bound
        to a name (``window_sizes``) so that the call reads on one line."""
        code = self.sizes_code(sizes)
        return self.bind("window_sizes", code) if len(code) > 36 else code

    def window_view(self, read: WindowRead) -> str:
        """Code for the read as a view with axes ``read.view_axes`` (no copy)."""
        raise NotImplementedError

    def window_contraction(self, operands, over) -> Arr | None:
        """Σ_over of the product of two operands, one read through windows, lowered to the
        target's convolution; None to lower it the general way (an einsum over the view)."""
        return None

    def window_transpose(self, values, windows) -> Arr | None:
        """Σ values·Π δ(h, S·i + p) over the window positions and taps ``windows`` (h, i, p,
        S), lowered to the target's transposed convolution or pooling backward; None to
        lower it as strided slice-adds (:meth:`_window_scatter`)."""
        return None

    def window_max_grad(self, grad: Arr, read: WindowRead, windows) -> Arr | None:
        """``grad`` (axes: read's plain indices, then its window positions) sent to the
        first maximum of each window of ``read`` and scattered back: the adjoint of a max
        over a window; None to lower the mask and its scatter the general way. ``windows``
        (h, i, p, S) hold the same window axes as ``read``, maybe in another order."""
        return None

    def _flat_sum(self, e):
        """Σ_a f·Σ_b g as Σ_{a,b} f·g, all the way down, where no index of an inner sum is
        free in the factors around it: the deltas of a scatter nested in sums (the derived
        form of a convolution's input gradient puts W and Σ_o between them) meet in one."""
        limits, factors = list(e.limits), []
        todo = list(sp.Mul.make_args(e.function))
        while todo:
            f = todo.pop(0)
            if isinstance(f, sp.Sum):
                inner = {lim[0] for lim in f.limits}
                around = factors + todo
                if not (inner & {lim[0] for lim in limits} or
                        any(inner & self._indices_of(g) for g in around)):
                    limits += list(f.limits)
                    todo += list(sp.Mul.make_args(f.function))
                    continue
            factors.append(f)
        return sp.Sum(sp.Mul(*factors), *limits)

    def _window_argmax(self, values, windows) -> tuple | None:
        """(G, read, windows in read's order) if ``values`` is G·[X[window] = max] at the
        first maximum over the taps, X read through exactly ``windows`` (window axes last in
        X) and G free of taps."""
        factors = sp.Mul.make_args(values)
        masks = [f for f in factors if isinstance(f, ArgMaxMask)]
        rest = sp.Mul(*[f for f in factors if not isinstance(f, ArgMaxMask)])
        if len(masks) != 1 or self._bool_only(rest) or not self._is_array(rest):
            return None
        taps = tuple(w[2] for w in windows)
        read = self._window(masks[0].args[0], taps)
        if read is None or set(masks[0].over) != set(taps) or not read.trailing or \
                {(w.out, w.tap, w.stride) for w in read.windows} != \
                {(i, p, s) for _, i, p, s in windows}:
            return None
        grad = self.lower(rest)
        if set(grad.axes) != set(read.plain) | set(read.outs):
            return None
        return grad, read, [next(w for w in windows if w[1] == r.out) for r in read.windows]

    def window_max(self, e: MaxOver) -> Arr | None:
        """A maximum over the taps of a window read as the target's max pooling, or None."""
        return None

    def _window_sum(self, e, over) -> Arr | None:
        """Σ over the taps of a window read (average pooling) as the ``window_sum`` helper,
        one add per tap: a reduction over a view's small strided tap axes is ~10× slower
        (measured at 128×32×28×28, both NumPy and torch)."""
        read = self._window(e, tuple(over))
        if read is None or set(over) != set(read.taps):
            return None
        self.helpers.add("window_sum")
        self.imports.update(self.HELPER_IMPORTS.get("window_sum", ()))
        view = self.lower(e)
        return Arr(f"window_sum({view.code}, {len(read.windows)})",
                   view.axes[:len(view.axes) - len(read.windows)], ATOM)

    WINDOW_ADD = "window_add"
    HELPER_IMPORTS: dict = {}  # helper -> the imports its source needs

    def _window_scatter(self, e) -> Arr | None:
        """Σ values·Π_k δ(h_k, S_k·i_k + p_k), i_k and p_k summed: the adjoint of a read through
        strided windows, as the target's transposed convolution (:meth:`window_transpose`)
        or as one strided slice-add per tap (the ``window_add`` helper) instead of a
        scatter-add. None when the sum has another delta, a window fits no view, or every
        position is written once (a reshape, :meth:`_dense_split`, does that)."""
        e = self._flat_sum(e)
        over = [lim[0] for lim in e.limits]
        rest, windows = [], []
        for f in sp.Mul.make_args(e.function):
            split = self._scatter_target(f, over)
            if split is None:
                if isinstance(f, sp.KroneckerDelta):
                    return None
                rest.append(f)
                continue
            h, target = split
            window = split_window(target, self._is_index, over)
            if window is None or h not in self.ranges:
                return None
            out, tap, stride = window
            if out not in over or tap not in over or out not in self.ranges or \
                    tap not in self.ranges or not fits(self.ranges[h], self.ranges[tap],
                                                       stride, self.ranges[out],
                                                       self.derived) or \
                    self._dense_split(target, [out, tap], h) is not None:
                return None
            windows.append((h, out, tap, stride))
        used = [s for w in windows for s in w[:3]]
        if not windows or len(set(used)) != len(used):
            return None
        windows.sort(key=lambda w: self._rank(w[0]))  # the result's axis order (h, w, …)
        outs = tuple(w[1] for w in windows)
        taps = tuple(w[2] for w in windows)
        kept = [lim for lim in e.limits if lim[0] not in outs + taps]
        body = sp.Mul(*rest)
        values = sp.Sum(body, *kept) if kept else body
        argmax = self._window_argmax(values, windows)
        lowered = self.window_max_grad(*argmax) if argmax is not None else None
        if lowered is None:
            lowered = self.window_transpose(values, windows)
        if lowered is not None:
            return self._named_grad(lowered)
        arr = self.lower(values)
        if any(o not in arr.axes for o in outs) or set(arr.axes) & (set(over) - set(used)):
            return None
        lead = tuple(a for a in arr.axes if a not in outs + taps)
        code = self.align(arr, lead + outs + taps)
        if self._bool_only(body) and self.ref is not None:  # a mask counts windows
            prec = arr.prec if code == arr.code else ATOM
            code = self.cast_like(self.paren(code, prec, ATOM), self.ref)
        if not code.isidentifier():  # the values per window and tap, named for reading
            code = self.bind("window_values", code)
        self.helpers.add(self.WINDOW_ADD)
        self.imports.update(self.HELPER_IMPORTS.get(self.WINDOW_ADD, ()))
        sizes = self.extents_code([self.ranges[w[0]] for w in windows])
        kernel = self.sizes_code([self.ranges[t] for t in taps])
        strides = self.sizes_code([w[3] for w in windows])
        return self._named_grad(Arr(f"{self.WINDOW_ADD}({code}, {sizes}, {kernel}, {strides})",
                                    lead + tuple(w[0] for w in windows), ATOM))

    def _named_grad(self, arr: Arr) -> Arr:
        """A long scatter of window gradients as a named temporary, for lines that read."""
        if len(arr.code) <= 48:
            return arr
        return Arr(self.bind("window_grad", arr.code), arr.axes, ATOM)

    ARANGE = "np.arange({n})"

    def _arange(self, sym) -> Arr:
        """An index symbol as an array of its values: the positions of an affine index."""
        if sym not in self.ranges:
            raise CodegenError(f"no range known for index {sym}")
        size = self.lower(sp.sympify(self.ranges[sym]))
        self.imports.add(self.module)
        return Arr(self.ARANGE.format(n=size.code, ref=self.ref), (sym,), ATOM)

    ARANGE_VALUE = "np.arange({n}, dtype={dtype})"
    _subscript = False  # lowering positions (integer arrays), not values

    def _index_value(self, sym) -> Arr:
        """An index used as a value (``d`` in ``Max(X[n, d], 0, d)``) as the array of its
        values, in the kernel's float dtype where the target gives one: an array like any
        float operand, so that sums, products and in-place updates of it keep that dtype
        (torch's integer ``arange`` would make ``0.5 * arange(D)`` float32 and refuse a
        float added into it in place). Positions (:meth:`_positions`) stay integers."""
        arr = self._arange(sym)
        if self._subscript or self.ref is None:
            return arr
        size = self.lower(sp.sympify(self.ranges[sym]))
        return Arr(self.ARANGE_VALUE.format(n=size.code, ref=self.ref,
                                            dtype=self.dtype_of(self.ref)), arr.axes, ATOM)

    def _positions(self, expr) -> Arr:
        """An affine index expression (``S·t + k``) as an integer array of positions: a
        subscript of a gather, or where a scatter-add writes."""
        outer, self._subscript = self._subscript, True
        try:
            return self.lower(expr)
        finally:
            self._subscript = outer

    def _print_Symbol(self, e) -> Arr:
        if e in self.temps:
            return self.temps[e]
        if e.name in self.names:
            return Arr(self.names[e.name], ())
        if self._is_index(e):
            return self._index_value(e)
        raise CodegenError(f"no value for `{e}` in generated code")

    _print_Dummy = _print_Symbol

    def _masks_as_numbers(self, e, always: bool = False):
        """``e`` (a sum) with its boolean-mask terms replaced by names of their values as
        numbers of the kernel's dtype, where a sum of them would not count: NumPy adds two
        boolean arrays as a logical or and refuses to negate one, so [a = max a] + [b = max b]
        would count one hit where there are two (docs/fuzzing.md, finding 24). Converted when
        two or more terms are masks or one is negated; with ``always`` (torch, which adds no
        boolean tensor to a float one in place), every mask term."""
        masks = [t for t in e.args if self._bool_only(t) and self._is_array(t)]
        if not masks or not (always or len(masks) > 1 or
                             any(t.could_extract_minus_sign() for t in masks)):
            return e
        dtype_of = self.ref
        names = {}
        for t in masks:
            arr = self.lower(t)
            code = self.paren(arr.code, arr.prec, ATOM)
            names[t] = sp.Dummy("mask")
            self.temps[names[t]] = Arr(self.cast_like(code, dtype_of) if dtype_of is not None
                                       else f"{code}.astype({self.FLOAT})", arr.axes, ATOM)
        return e.xreplace(names)

    def _print_Add(self, e) -> Arr:
        """Terms as people write them: numbers first (``1 + exp(-X)``), then the others by
        falling rank (``X @ W.T + b``, ``gamma * xhat + beta``, ``var + eps``), subtracted
        terms last."""
        e = self._masks_as_numbers(e)
        if not isinstance(e, sp.Add):
            return self.lower(e)
        args = list(e.as_ordered_terms())
        negative = [t.could_extract_minus_sign() for t in args]
        terms = [self.lower(-t if neg else t) for t, neg in zip(args, negative, strict=True)]
        order = sorted(range(len(args)), key=lambda k: (
            negative[k], not args[k].is_number, -len(terms[k].axes)))
        args, negative, terms = ([x[k] for k in order] for x in (args, negative, terms))
        axes = self._union(terms)
        parts = []
        for k, (t, neg) in enumerate(zip(terms, negative, strict=True)):
            code = self.align(t, axes) if t.axes != axes else t.code
            prec = ATOM if t.axes != axes else t.prec
            if neg:
                code = self.paren(code, prec, MUL)
                parts.append(f"- {code}" if k else f"-{code}")
            else:
                code = self.paren(code, prec, ADD + 1) if k else code
                parts.append(f"+ {code}" if k else code)
        return Arr(" ".join(parts), axes, ADD)

    def _print_Mul(self, e) -> Arr:
        coeff, factors = e.as_coeff_mul()
        num = [f for f in factors if not (isinstance(f, sp.Pow) and f.exp.is_negative)]
        den = [1 / f for f in factors if isinstance(f, sp.Pow) and f.exp.is_negative]
        sign = ""
        if coeff < 0:
            sign, coeff = "-", -coeff
        if coeff != 1:
            num.insert(0, coeff)
        num_arrs = self._typed([(f, self.lower(f)) for f in num], den)
        pairs = sorted(zip(num, num_arrs, strict=True), key=lambda p: len(p[1].axes))
        num_arrs = [a for _, a in pairs]
        den_arrs = [self.lower(f) for f in den]
        axes = self._union(num_arrs + den_arrs)
        full = set(axes)
        high_pairs = [(f, a) for f, a in pairs if set(a.axes) == full]
        if high_pairs and len(num_arrs) + len(den_arrs) > 1 and full:
            lows = [a for a in num_arrs if set(a.axes) != full]
            low_den = [a for a in den_arrs if set(a.axes) != full]
            low = self._quotient(lows, low_den) if lows or low_den else None
            if sign:
                low = Arr("-1", (), UNARY) if low is None else \
                    Arr(f"-{self.paren(low.code, low.prec, MUL + 1)}", low.axes, UNARY)
            scaled = self._scale_in_place(high_pairs, [a for a in den_arrs
                                                       if set(a.axes) == full], low, axes)
            if scaled is not None:
                return scaled
        # scalars and vectors combine first (cheap), full-size factors last: γ/σ is one
        # vector division instead of a division of the whole (G − …) by σ
        low_num = [a for a in num_arrs if set(a.axes) != full]
        low_den = [a for a in den_arrs if set(a.axes) != full]
        high_num = [a for a in num_arrs if set(a.axes) == full]
        high_den = [a for a in den_arrs if set(a.axes) == full]
        parts = []
        if low_num or low_den:
            low = self._quotient(low_num, low_den)
            parts.append(low if not high_num and not high_den else
                         Arr(self.align(low, axes) if low.axes else
                             self.paren(low.code, low.prec, MUL + 1), axes, ATOM))
        parts += high_num
        out = self._quotient(parts, high_den, axes)
        if sign and self._is_mask(e):  # neither NumPy nor torch negates a boolean array
            return Arr(f"-1 * {self.paren(out.code, out.prec, MUL)}", out.axes, MUL)
        if sign and out.code.startswith("-"):  # −(−a·b) is a·b: no two negations
            return Arr(out.code[1:], out.axes, MUL)
        return Arr(sign + out.code, out.axes, UNARY if sign else out.prec)

    # -- a switch in front of a term that is 0/0 or inf where the switch is off ---------------
    def _switch(self, f) -> bool:
        """Is ``f`` a 0/1 switch (an arg-max mask or a step), seen through named terms?"""
        return isinstance(self._expanded(f) if self.definitions else f,
                          (ArgMaxMask, sp.Heaviside))

    def _may_blow_up(self, f) -> bool:
        """Can ``f`` be inf or NaN on finite data: a division, a root or a log?"""
        f = self._expanded(f) if self.definitions else f
        return any(isinstance(n, sp.log) or (isinstance(n, sp.Pow) and not (
            n.exp.is_integer and n.exp.is_nonnegative)) for n in sp.preorder_traversal(f))

    def _needs_guard(self, e) -> bool:
        factors = sp.Mul.make_args(e)
        return any(self._switch(f) for f in factors) and any(
            self._may_blow_up(f) for f in factors if not self._switch(f))

    def _guarded(self, e) -> Arr:
        """``[c]·t`` as ``where(c, t, 0)``: where the switch is off the term may be 0/0
        (L2 normalisation at a zero row: the ‖x‖ < ε branch multiplies x·Σx·g/‖x‖), and
        0·NaN would be NaN; the switch's meaning is that the term is absent there."""
        factors = sp.Mul.make_args(e)
        conds = [self.lower(f) for f in factors if self._switch(f)]
        rest = sp.Mul(*[f for f in factors if not self._switch(f)])
        value = self.lower(rest)
        axes = self._union(conds + [value])
        cond = " & ".join(self.align(c, axes) if c.axes else c.code for c in conds)
        return Arr(self.where(cond, value, Arr("0.0", (), ATOM), axes,
                              numbers=not self._is_array(rest)), axes, ATOM)

    def _scale_in_place(self, high: list, high_den: list, low: Arr | None,
                        axes) -> Arr | None:
        """A product of full-size factors ``high`` (expression, array pairs), full-size
        divisors and a low-rank factor, written as in-place updates of one of the ``high``
        arrays where the target can and that array is a temporary nobody else holds; None to
        print it the ordinary way."""
        return None

    def _typed(self, num: list, den: list) -> list:
        """The lowered factors of a product; a target whose booleans times a Python number
        lose precision converts them here."""
        return [a for _, a in num]

    def _numeric(self, f, arr: Arr) -> Arr:
        """An operand of an einsum; a target whose einsum refuses boolean or integer operands
        (masks, counts of masks) next to float ones converts them here."""
        return arr

    def _is_array(self, f) -> bool:
        """A tensor value (not a Python number): reads a tensor or a tensor-valued term, a
        named 0-d one (``sum_B_G = (B * G).sum(0)``) included, or scatters (Σ_t,k δ(h, S·t + k)
        counts windows: an array over h); inlined scalars such as ``1 / D`` are numbers, and
        so is a named term whose value is one (``t = 2 * (1 / E)``: finding 20). A free index
        used as a value (``Max(X[n, d], 0, d)``, ``d·X[n, d]``) is the array ``arange(D)``."""
        if self._reads_index(f):
            return True
        return any(isinstance(n, (sp.Indexed, sp.KroneckerDelta))
                   or (n in self.temps and (self.temps[n].axes or (
                       n not in self.scalars and n not in self.definitions)))
                   or (isinstance(n, sp.Symbol) and n.name in self.scalar_tensors)
                   or (n in self.definitions and self._is_array(self.definitions[n]))
                   or (n in self.scalars and self._is_array(self.scalars[n]))
                   for n in sp.preorder_traversal(f))

    def _reads_index(self, e, bound: frozenset = frozenset()) -> bool:
        """Does ``e`` use a free index as a value, not only as a subscript of a tensor read
        (``d`` in ``Max(X[n, d], 0, d)``, not in ``X[n, d]``)? An index a sum inside ``e``
        runs over is bound there."""
        if self._is_index(e):
            return e not in bound
        if isinstance(e, (sp.Indexed, sp.IndexedBase)) or not e.args:
            return False
        if isinstance(e, sp.Sum):
            return self._reads_index(e.function, bound | {lim[0] for lim in e.limits})
        return any(self._reads_index(a, bound) for a in e.args)

    def _bool_only(self, e) -> bool:
        """Does ``e`` lower to a boolean (or integer) array: masks and numbers only?"""
        if isinstance(e, (ArgMaxMask, sp.Heaviside, sp.Rel, sp.And, sp.Or, sp.Not)):
            return True
        if isinstance(e, sp.Sum):  # a count of masks: an integer array
            return self._bool_only(e.function)
        if e in self.definitions:
            return self._bool_only(self.definitions[e])
        if isinstance(e, (sp.Mul, sp.Add)):
            return any(self._bool_only(a) for a in e.args) and all(
                self._bool_only(a) or not self._is_array(a) for a in e.args)
        return False

    def _is_mask(self, e) -> bool:
        """Does ``e`` contain a comparison that lowers to a boolean array?"""
        marks = (ArgMaxMask, sp.Heaviside)
        return e.has(*marks) or any(
            sym in self.definitions and self.definitions[sym].has(*marks)
            for sym in e.free_symbols)

    def _quotient(self, num: list, den: list, axes=None) -> Arr:
        """``a * b / (c * d)`` with every factor aligned to the joint axes."""
        axes = axes if axes is not None else self._union(num + den)

        def part(a):
            code = self.align(a, axes) if a.axes != axes and a.axes else a.code
            return self.paren(code, a.prec if a.axes == axes or not a.axes else ATOM, MUL)

        code = " * ".join(part(a) for a in num) or "1"
        if den:
            den_code = " * ".join(part(a) for a in den)
            single = len(den) == 1 and (den[0].prec > MUL or den_code.startswith("("))
            code += f" / {den_code}" if single else f" / ({den_code})"
        prec = MUL if len(num) + len(den) > 1 or den else (num[0].prec if num else ATOM)
        if code.startswith("(") and code.endswith(")") and code.count("(") == 1:
            prec = ATOM
        return Arr(code, axes, prec)

    def _print_Pow(self, e) -> Arr:
        base = self.lower(e.base)
        b = self.paren(base.code, base.prec, ATOM)
        if e.exp == sp.Rational(1, 2):
            return self._call("sqrt", base, e.base)
        if e.exp == -1:
            return Arr(f"1 / {b}", base.axes, MUL)
        if e.exp == sp.Rational(-1, 2):
            s = self._call("sqrt", base, e.base)
            return Arr(f"1 / {s.code}", base.axes, MUL)
        exp = self.lower(e.exp)
        return Arr(f"{b} ** {self.paren(exp.code, exp.prec, ATOM)}", base.axes, POW)

    def _call(self, fname: str, arg: Arr, expr) -> Arr:
        if fname in MATH | {"Abs"} and self._plain_number(expr):
            # |a| of a real hyper-parameter is a Python float (torch.abs takes tensors only)
            self.imports.add("math")
            return Arr(f"math.{'fabs' if fname == 'Abs' else fname}({arg.code})", (), ATOM)
        self.imports.add(self.module)
        return Arr(f"{self.FUNCS[fname]}({arg.code})", arg.axes, ATOM)

    def _plain_number(self, expr) -> bool:
        """Built from sizes, hyper-parameters and numbers only: Python's math applies (an
        inlined common term such as E² counts by its value). An index used as a value
        (``Max(X[n, d], 0, d)``) is not one: it lowers to the array ``arange(D)``."""
        return not any(isinstance(n, sp.Indexed) or (n in self.temps and not (
                           n in self.scalars and self._plain_number(self.scalars[n]))) or
                       (isinstance(n, sp.Symbol) and n.name in self.scalar_tensors)
                       for n in sp.preorder_traversal(expr)) and not self._reads_index(expr)

    scalar_tensors: frozenset = frozenset()

    def _function(self, e) -> Arr:
        return self._call(type(e).__name__, self.lower(e.args[0]), e.args[0])

    def _print_Heaviside(self, e) -> Arr:
        x = self.lower(e.args[0])
        return Arr(f"({x.code} > 0)", x.axes, ATOM)

    INDICATOR = "({cmp}).astype({dtype})"
    FLOAT = "float"  # the dtype of an indicator when no tensor gives one

    def _print_KroneckerDelta(self, e) -> Arr:
        """δ(a, b) outside a scatter-add (:meth:`_scatter`), e.g. δ(c, y[n]), the one-hot
        indicator of integer labels: the integer comparison ``y[:, None] == np.arange(C)`` as
        a 0/1 array of the kernel's float dtype (a boolean would not subtract, and a Python
        float would set the dtype in torch)."""
        a, b = self.lower(e.args[0]), self.lower(e.args[1])
        axes = self._union([a, b])
        cmp = f"{self.align(b, axes)} == {self.align(a, axes)}"
        dtype = self.dtype_of(self.ref) if self.ref is not None else self.FLOAT
        return Arr(self.INDICATOR.format(cmp=cmp, dtype=dtype), axes, ATOM)

    FIRST_HIT = "first_hit"

    def _print_ArgMaxMask(self, e: ArgMaxMask) -> Arr:
        a, b = self.lower(e.args[0]), self.lower(e.args[1])
        axes = self._union([a, b])
        hit = f"({self.align(a, axes)} == {self.align(b, axes)})"
        if not e.over:
            return Arr(hit, axes, ATOM)
        if any(i not in axes for i in e.over):
            raise CodegenError(f"the maximum over {', '.join(map(str, e.over))} of a body "
                               "that does not depend on them has no kernel yet",
                               hint="reduce only over indices the body uses")
        # ties: only the first maximum (row-major over the window) gets the gradient
        self.helpers.add(self.FIRST_HIT)
        positions = tuple(axes.index(i) for i in e.over)
        return Arr(f"{self.FIRST_HIT}({hit}, {positions})", axes, ATOM)

    def _relational(self, e) -> Arr:
        a, b = self.lower(e.lhs), self.lower(e.rhs)
        axes = self._union([a, b])
        return Arr(f"({self.align(a, axes)} {e.rel_op} {self.align(b, axes)})", axes, ATOM)

    _print_StrictGreaterThan = _print_StrictLessThan = _relational
    _print_GreaterThan = _print_LessThan = _relational

    def _print_And(self, e) -> Arr:
        parts = [self.lower(a) for a in e.args]
        axes = self._union(parts)
        return Arr("(" + " & ".join(self.align(p, axes) for p in parts) + ")", axes, ATOM)

    def _print_Or(self, e) -> Arr:
        parts = [self.lower(a) for a in e.args]
        axes = self._union(parts)
        return Arr("(" + " | ".join(self.align(p, axes) for p in parts) + ")", axes, ATOM)

    def _print_Piecewise(self, e) -> Arr:
        (value, cond), rest = e.args[0], e.args[1:]
        if cond == sp.true or not rest:
            return self.lower(value)
        a, c = self.lower(value), self.lower(cond)
        b = self._print_Piecewise(sp.Piecewise(*rest)) if len(rest) > 1 or \
            rest[0][1] != sp.true else self.lower(rest[0][0])
        axes = self._union([a, b, c])
        return Arr(self.where(self.align(c, axes), a, b, axes), axes, ATOM)

    def where(self, cond: str, a: Arr, b: Arr, axes, numbers: bool = True) -> str:
        self.imports.add(self.module)
        return f"{self.module}.where({cond}, {self.align(a, axes)}, {self.align(b, axes)})"

    def _print_Max(self, e) -> Arr:
        return self._extremum(e, "maximum")

    def _print_Min(self, e) -> Arr:
        return self._extremum(e, "minimum")

    def _extremum(self, e, fname) -> Arr:
        args = [self.lower(a) for a in sorted(e.args, key=lambda a: a.is_number)]
        out = args[0]
        for a in args[1:]:
            axes = self._union([out, a])
            self.imports.add(self.module)
            out = Arr(f"{self.module}.{fname}({self.align(out, axes)}, {self.align(a, axes)})",
                      axes, ATOM)
        return out

    # -- reductions -------------------------------------------------------------------------
    def _mean(self, e) -> Arr | None:
        """A sum divided by the number of terms it adds, ``c·Σ_d f`` with ``c·D = q`` free of
        the sum's sizes, as ``q * f.mean(axis)`` (``X.mean(1)``, as people write a mean) when
        the sum is a plain reduction, else as ``q * (Σ) / D`` (a matrix product, a window sum:
        ``(G @ gamma) / D``); None when ``e`` is not one."""
        sums = [f for f in e.args if isinstance(f, sp.Sum)]
        if len(sums) != 1:
            return None
        total = sums[0]
        count = sp.Mul(*[hi - lo + 1 for _, lo, hi in total.limits])
        rest = sp.cancel(e / total * count)
        sizes = count.free_symbols
        num, den = sp.fraction(rest)
        if not sizes or (num.free_symbols | den.free_symbols) & sizes or rest.has(sp.Sum):
            return None
        mean = self._plain_mean(total)
        if mean is None:
            if not self._is_array(total):
                return None
            # a matrix product or a window sum over its count: (G @ gamma) / D
            inner, size = self.lower(total), self.lower(count)
            mean = Arr(f"{self.paren(inner.code, inner.prec, MUL)} / "
                       f"{self.paren(size.code, size.prec, MUL + 1)}", inner.axes, MUL)
        if rest == 1:
            return mean
        # the other factors as the target multiplies them, the mean as one of them
        name = sp.Dummy("mean")
        self.temps[name] = mean
        return self.lower(rest * name)

    def _plain_mean(self, e) -> Mean | None:
        """Σ_over of one operand or of an element-wise product, every factor varying over a
        summed index, as a mean over those axes; None for any other sum."""
        over = [lim[0] for lim in e.limits]
        for var, lo, hi in e.limits:
            self.ranges.setdefault(var, sp.expand((hi - lo + 1).xreplace(self.scalars)))
        factors = sp.Mul.make_args(e.function)
        if any(isinstance(f, (sp.Sum, sp.KroneckerDelta)) or not (self._indices_of(f) & set(over))
               for f in factors) or self._bool_only(e.function) or \
                self._needs_guard(e.function) or \
                any(self._window(f, tuple(over)) is not None for f in factors):
            return None
        arrs = [self.lower(f) for f in factors]
        union = set(self._union(arrs))
        if not set(over) <= union:
            return None
        if len(arrs) == 1:
            x = arrs[0]
        elif not any(set(a.axes) == union for a in arrs) or \
                self._matvec(factors, arrs, over) is not None or \
                self._matmul(factors, arrs, over) is not None:
            return None
        else:
            x = self._product(arrs)
        red = self._reduce(x, over, self.MEAN)
        code = self.paren(x.code, x.prec, ATOM)
        return Mean(red.code, red.axes, ATOM, code, tuple(x.axes),
                    tuple(x.axes.index(s) for s in over))

    def _print_Sum(self, e) -> Arr:
        over = [lim[0] for lim in e.limits]
        body = e.function
        for var, lo, hi in e.limits:  # bound indices renamed by the emitter keep their range
            self.ranges.setdefault(var, sp.expand((hi - lo + 1).xreplace(self.scalars)))
        picked = self._pick_label(e)
        if picked is not None:
            return self.lower(picked)
        merged = self._merge_window(e)
        if merged is not None:
            return self.lower(merged)
        spread = self._spread_scatters(e)
        if spread is not None:
            return self.lower(spread)
        windowed = self._window_scatter(e)
        if windowed is not None:
            return windowed
        for f in sp.Mul.make_args(body):
            split = self._scatter_target(f, over)
            if split is not None:
                return self._scatter(e, f, *split)
        if isinstance(body, sp.Mul) and self._needs_guard(body):  # Σ where(c, t, 0)
            arr = self.lower(body)
            counts = [lim[2] - lim[1] + 1 for lim in e.limits if lim[0] not in arr.axes]
            inner = self._reduce(arr, over, self.SUM) if set(over) & set(arr.axes) else arr
            return self._times(self.lower(sp.Mul(*counts)), inner) if counts else inner
        scalars, operands = [], []
        for f in sp.Mul.make_args(body):
            (operands if (self._indices_of(f) & set(over)) else scalars).append(f)
        counts = [lim[2] - lim[1] + 1 for lim in e.limits
                  if not any(lim[0] in self._indices_of(f) for f in operands)]
        outside = sp.Mul(*scalars) * sp.Mul(*counts)
        conv = self.window_contraction(operands, over) if len(operands) == 2 else None
        if conv is not None:
            inner = conv
        elif len(operands) >= 2:
            arrs = [self.lower(f) for f in operands]
            union = set(self._union(arrs))
            product = self._matvec(operands, arrs, over)
            if product is None:
                product = self._matmul(operands, arrs, over)
            if product is not None:
                inner = product
            elif any(set(a.axes) == union for a in arrs):
                # Σ_d G[n,d]·x̂[n,d]: no operand grows, so multiply then sum (a BLAS-free
                # einsum is several times slower on CPU for this)
                inner = self._reduce(self._product(arrs), over, self.SUM)
            else:  # a genuine contraction (matrix product)
                inner = self._contraction(operands, arrs, over)
        elif operands:
            inner = self._window_sum(operands[0], over) or \
                self._reduce(self.lower(operands[0]), over, self.SUM)
        else:
            inner = Arr("1", (), ATOM)
        if outside == 1:
            return inner
        return self._times(self.lower(outside), inner)

    # -- Σ_{t,k} f(t,k)·δ(h, S·t + k): the adjoint of an affine index, a scatter-add ---------
    def _scatter_target(self, f, over):
        """(h, S·t + k) if ``f`` is a Kronecker delta tying a free index h to an expression
        of summed indices."""
        if not isinstance(f, sp.KroneckerDelta):
            return None
        for h, target in (f.args, f.args[::-1]):
            if self._is_index(h) and h not in over and h not in target.free_symbols and \
                    set(over) & self._indices_of(target):
                return h, target
        return None

    def _merge_window(self, e):
        """Σ_k W[k]·Σ_t δ(h, S·t + k)·G[n,t] as one sum Σ_{k,t} W[k]·δ(h, S·t + k)·G[n,t].

        The window index k of the inner scatter is summed outside it: every factor that
        depends on k (the weight W[k] of a strided or depthwise convolution) has to be
        scattered with the values at k, so the two sums become one scatter-add over (t, k).
        None when ``e`` has no such inner sum."""
        over = {lim[0] for lim in e.limits}
        factors = list(sp.Mul.make_args(e.function))
        for f in factors:
            if not isinstance(f, sp.Sum):
                continue
            inner_over = {lim[0] for lim in f.limits}
            rest = [g for g in factors if g is not f]
            if any(inner_over & self._indices_of(g) for g in rest) or inner_over & over:
                continue  # merging would capture an index
            window = [d for d in sp.Mul.make_args(f.function)
                      if self._scatter_target(d, list(inner_over)) is not None]
            if any(self._indices_of(self._scatter_target(d, list(inner_over))[1]) & over
                   for d in window):
                return sp.Sum(sp.Mul(*rest) * f.function, *e.limits, *f.limits)
        return None

    def _spread_scatters(self, e):
        """Σ_t (δ(h, T − t)·A + δ(h, t + 1)·B)·C as Σ_t δ(h, T − t)·A·C + Σ_t δ(h, t + 1)·B·C:
        each delta scatters its own term (a factored closed form groups them); None when no
        factor of the body is a sum of terms with a scatter delta."""
        over = [lim[0] for lim in e.limits]
        factors = list(sp.Mul.make_args(e.function))
        for f in factors:
            if isinstance(f, sp.Add) and any(
                    self._scatter_target(g, over) is not None
                    for term in f.args for g in sp.Mul.make_args(term)):
                rest = sp.Mul(*[g for g in factors if g is not f])
                return sp.Add(*[sp.Sum(term * rest, *e.limits) for term in f.args])
        return None

    SCATTER = "scatter_add"
    JOIN = "join_axes"

    def _dense_split(self, target, window, h) -> tuple | None:
        """The window indices from most to least significant if ``target`` numbers every
        position of h exactly once (B·a + b with b over B and h over A·B; C·B·a + C·b + c),
        else None."""
        expr = sp.expand(target)
        steps = {w: expr.coeff(w) for w in window}
        if not window or any(w not in self.ranges for w in window) or h not in self.ranges \
                or sp.expand(expr - sum(c * w for w, c in steps.items())) != 0:
            return None
        order, step = [], sp.Integer(1)
        while len(order) < len(window):
            nxt = [w for w in window if w not in order and sp.expand(steps[w] - step) == 0]
            if len(nxt) != 1:
                return None
            order.append(nxt[0])
            step = sp.expand(step * self.ranges[nxt[0]])
        if sp.expand(step - self.ranges[h]) != 0:
            return None
        return tuple(reversed(order))

    def _scatter(self, e, delta, h, target) -> Arr:
        """Σ_over values·δ(h, target) as a scatter-add into a new axis h.

        Indices of ``target`` that this sum does not reduce (k in Σ_t δ(h, S·t + k)·G[n,t])
        keep their axis: each of their values is a scatter of its own (``batch`` axes)."""
        over = [lim[0] for lim in e.limits]
        index = self._positions(target)
        batch = tuple(a for a in index.axes if a not in over)
        window = tuple(a for a in index.axes if a in over)
        if batch and index.axes != batch + window:
            perm = tuple(index.axes.index(a) for a in batch + window)
            index = Arr(self.transpose(self.paren(index.code, index.prec, ATOM), perm),
                        batch + window, ATOM)
        rest = sp.Mul(*[f for f in sp.Mul.make_args(e.function) if f is not delta])
        labels = self.label_delta(delta, [h]) is not None and h in self._indices_of(rest)
        if labels:  # Σ_n δ(c, y[n])·f[n, c]: the values scattered are f at c = y[n]
            rest = self._at_label(rest, h, target) or rest
        kept = [lim for lim in e.limits if lim[0] not in index.axes]
        inner = self.lower(sp.Sum(rest, *kept) if kept else rest)
        if labels and h in inner.axes:  # a named term over c: gathered as an array
            inner = self._fancy_gather(inner, h, target)
        if set(inner.axes) & (set(over) - set(index.axes)):
            raise CodegenError(f"cannot scatter {e}: a summed index is left over")
        lead = tuple(a for a in inner.axes if a not in index.axes)
        split = None if batch else self._dense_split(target, window, h)
        if split is not None and inner.axes:
            # every position of h is written once: the scatter-add is a reshape
            values = self.align(inner, lead + split)
            sizes = self.sizes_code([self.ranges[w] for w in split])
            self.helpers.add(self.JOIN)
            return Arr(f"{self.JOIN}({values}, {sizes}, {len(lead)})", lead + (h,), ATOM)
        values = self.align(inner, lead + index.axes) if inner.axes else \
            self.scatter_scalar(inner.code, rest)
        if inner.axes and self._bool_only(rest) and self.ref is not None:
            # a mask [X = max X] scattered by overlapping windows counts them: added as
            # booleans, True + True would stay True
            prec = inner.prec if values == inner.code else ATOM
            values = self.cast_like(self.paren(values, prec, ATOM), self.ref)
        size = self.lower(sp.sympify(self.ranges[h]))
        self.helpers.add(self.SCATTER)
        self.imports.add("math")  # the helper counts the kept entries with math.prod
        args = f"{values}, {index.code}, {size.code}, {len(lead)}"
        if batch:
            args += f", batch={len(batch)}"
        return Arr(f"{self.SCATTER}({args})", lead + batch + (h,), ATOM)

    # -- integer labels: δ(c, y[n]) summed over c picks c = y[n]; added, it scatters ----------
    def label_delta(self, f, free) -> tuple | None:
        """(c, y[…]) if ``f`` is δ(c, y[…]), the one-hot indicator of integer labels
        (:meth:`~gradtool.spec.lang.Spec.labels`), with c one of the indices ``free`` and
        the labels read at plain indices other than c; else None."""
        if not isinstance(f, sp.KroneckerDelta):
            return None
        for c, label in (f.args, f.args[::-1]):
            if c in free and self._is_index(c) and isinstance(label, sp.Indexed) and \
                    label.base.label.name in self.labels and c not in label.free_symbols and \
                    all(self._is_index(i) for i in label.indices) and \
                    len(set(label.indices)) == len(label.indices):
                return c, label
        return None

    def _pick_label(self, e):
        """Σ_c δ(c, y[n])·f[n, c] as f[n, y[n]] (with the sum's other indices kept): the term
        at the label only, so no one-hot array is built and reads X[n, c] become gathers
        X[n, y[n]] (:meth:`_label_gather`). None when no factor of the body is such a δ
        over a summed index, or another sum inside binds that index."""
        over = [lim[0] for lim in e.limits]
        factors = sp.Mul.make_args(e.function)
        for f in factors:
            hit = self.label_delta(f, over)
            if hit is None:
                continue
            c, label = hit
            rest = sp.Mul(*[g for g in factors if g is not f])
            if any(isinstance(n, sp.Sum) and c in n.variables
                   for n in sp.preorder_traversal(rest)):
                continue
            picked = self._at_label(rest, c, label)
            if picked is None:
                continue
            limits = [lim for lim in e.limits if lim[0] != c]
            return sp.Sum(picked, *limits) if limits else picked
        return None

    def _at_label(self, e, c, label):
        """``e`` at c = y[…]: every read X[…, c, …] becomes X[…, y[…], …]; None when c
        appears otherwise (an affine index X[n, c + 1], c as a number) or a read could not
        be gathered (:meth:`_gather_parts`)."""
        at = e.xreplace({c: label})
        reads = {n: sp.Dummy() for n in sp.preorder_traversal(at)
                 if isinstance(n, sp.Indexed) and label in n.indices}
        if any(self._gather_parts(r) is None for r in reads) or \
                at.xreplace(reads).has(label) or c in self._indices_of(at):
            return None  # (a named common term over c keeps c: no substitution reaches it)
        return at

    def _fancy_gather(self, arr: Arr, c, label) -> Arr:
        """``arr`` read at c = y[…] with one integer array per axis, ``w[y]``,
        ``A[np.arange(N)[:, None], y]``: the axes of ``arr`` but c, then those of the labels
        that ``arr`` lacks."""
        out = tuple(a for a in arr.axes if a != c) + tuple(
            i for i in label.indices if i not in arr.axes)
        y = self.lower(label)
        parts = [self.align(y, out) if a == c else self.align(self._arange(a), out)
                 for a in arr.axes]
        return Arr(f"{self.paren(arr.code, arr.prec, ATOM)}[{', '.join(parts)}]", out, ATOM)

    GATHER = "np.take_along_axis({x}, {index}, {axis})"

    def _label_gather(self, e) -> Arr | None:
        """X[n, y[n]] (X read at integer labels y): ``X[np.arange(N), y]`` where the labels
        have all of X's other axes, else ``np.take_along_axis(X, y[:, None], 1)[:, 0]``
        (torch: ``X.gather(1, y[:, None])[:, 0]``, :meth:`gather`). The labels' own indices
        must be plain indices of the read, in the same order; None otherwise."""
        parts = self._gather_parts(e)
        if parts is None:
            return None
        pos, label, rest = parts
        idx = tuple(e.indices)
        if not set(label.indices) <= set(rest):  # w[y[n]]: the labels add axes
            c = sp.Dummy("c", integer=True)
            return self._fancy_gather(Arr(self.names[e.base.label.name],
                                          rest[:pos] + (c,) + rest[pos:]), c, label)
        own = tuple(i for i in rest if i in label.indices)  # the labels' axes in X's order
        y = self.lower(label)
        code = y.code if y.axes == own else self.transpose(
            self.paren(y.code, y.prec, ATOM), tuple(y.axes.index(i) for i in own))
        slots = [":" if i in label.indices else "None" for i in rest]
        slots.insert(pos, "None")
        index = f"{self.paren(code, y.prec, ATOM)}[{', '.join(slots)}]"
        self.imports.add(self.module)
        positions = None
        if len(own) == len(rest) and all(i in self.ranges for i in rest):
            positions = ", ".join(self.align(self.lower(label) if p == pos else
                                             self._arange(i), rest)
                                  for p, i in enumerate(idx))
        return Arr(self.gather(self.names[e.base.label.name], index, pos, positions), rest,
                   ATOM)

    def _gather_parts(self, e) -> tuple | None:
        """(position of the labels, the labels' read y[…], X's other indices) if ``e`` is
        X read at integer labels, X[n, y[n]]: plain distinct indices elsewhere, the labels
        read at some of them; else None."""
        if not isinstance(e, sp.Indexed):
            return None
        idx = tuple(e.indices)
        labels = [p for p, i in enumerate(idx) if isinstance(i, sp.Indexed)
                  and i.base.label.name in self.labels]
        if len(labels) != 1:
            return None
        pos = labels[0]
        label = idx[pos]
        rest = idx[:pos] + idx[pos + 1:]
        if not all(self._is_index(i) for i in rest) or len(set(rest)) != len(rest) or \
                not all(self._is_index(i) for i in label.indices) or \
                not all(i in self.ranges for i in rest + tuple(label.indices)):
            return None
        return pos, label, rest

    def gather(self, x: str, index: str, axis: int, positions: str | None) -> str:
        """``x`` read along ``axis`` at ``index`` (an integer array of x's rank, size 1 on
        ``axis``), that axis dropped. ``positions``: the same entries as one integer index
        per axis (``np.arange(N), y``) where the labels have all of x's other axes, else None
        (the index broadcasts). NumPy indexes with the positions (~1.3 µs at 32×10, against
        ~4 µs for ``take_along_axis``)."""
        if positions is not None:
            return f"{x}[{positions}]"
        drop = ", ".join([":"] * axis + ["0"])
        return f"{self.GATHER.format(x=x, index=index, axis=axis)}[{drop}]"

    def label_scatter(self, expr, axes: tuple) -> tuple | None:
        """A gradient ``rest + coef·δ(c, y[…])`` over ``axes`` (the labels read at all the
        other axes) split as (rest, positions, coef, the positions' axes: ``axes`` but c):
        the kernel computes ``rest`` into an
        array of its own, then adds ``coef`` (a gather at c = y[…] if it reads c) at the
        positions ``[arange(N), y]`` only, instead of multiplying an N×C one-hot. None when
        ``expr`` is not linear in one such δ (a δ under a sum or a function stays a one-hot)."""
        deltas = {n for n in sp.preorder_traversal(expr)
                  if self.label_delta(n, axes) is not None}
        if len(deltas) != 1:
            return None
        delta = deltas.pop()
        c, label = self.label_delta(delta, axes)
        others = tuple(a for a in axes if a != c)
        if set(label.indices) != set(others):
            return None
        t = sp.Dummy("onehot")
        split = _linear_split(expr.xreplace({delta: t}), t)
        if split is None or split[1] == 0:
            return None
        rest, coef = split
        coef = self._at_label(coef, c, label)
        if coef is None or {i for i in self._indices_of(coef) if self._is_index(i)} - set(others):
            return None
        self.order = list(axes) + [s for s in self.order if s not in axes]
        y = self.lower(label)
        parts = [self.align(y, others) if a == c else self.align(self._arange(a), others)
                 for a in axes]
        return rest, LabelSites(", ".join(parts), tuple(axes), c, label), coef, others

    def add_at_labels(self, positions: LabelSites, coef, axes: tuple, target: str) -> str:
        """The in-place update that adds ``coef`` (free of the class axis) at ``positions``
        (from :meth:`label_scatter`, whose integer arrays broadcast over ``axes``, the
        gradient's axes but the class axis) of the gradient ``target``, written after its
        name: ``[np.arange(N), y] -= G / N``. ``coef`` is aligned to all of ``axes``, so a
        coefficient over the first of two label axes broadcasts along it, not the last (a
        wrong gradient, or a shape error, before: docs/fuzzing.md, finding 28). One label per
        position, so no position repeats and the fancy-index update is exact."""
        op = "-=" if coef.could_extract_minus_sign() else "+="
        value = self.lower(-coef if op == "-=" else coef)
        code = self.align(value, axes) if value.axes else value.code
        return f"[{positions}] {op} {code}"

    # -- padding: Xp = X padded (spec.pad), and the adjoint of X as a slice of Xp's ----------
    def _print_Unpad(self, e) -> Arr:
        """The slice of a padded array at its source's positions: ``g[:, :, P:P + H]``. A
        body that is one window scatter may be lowered to an op that pads itself (a
        convolution's input gradient with ``padding=P``), which takes the slice too."""
        self._unpad, self._unpadded = (e if isinstance(e.body, sp.Sum) else None), False
        try:
            inner = self.lower(e.body)
        finally:
            self._unpad, unpadded, self._unpadded = None, self._unpadded, False
        if unpadded:
            source = {hp: h for hp, h, _ in e.shifts}
            return Arr(inner.code, tuple(source.get(a, a) for a in inner.axes), inner.prec)
        code, axes = self.paren(inner.code, inner.prec, ATOM), list(inner.axes)
        for hp, h, before in e.shifts:
            if hp not in axes:  # the body does not vary along it: broadcast later
                continue
            k = axes.index(hp)
            lo = self.lower(sp.sympify(before)).code
            hi = self.lower(sp.expand(before + self.ranges[h]))
            hi_code = hi.code if hi.prec > 0 else f"({hi.code})"
            part = f"{lo}:{hi_code}" if before != 0 else f":{hi_code}"
            code = f"{code}[{', '.join([':'] * k + [part])}]"
            axes[k] = h
        return Arr(code, tuple(axes), ATOM)

    def pad(self, source: str, widths: list[tuple[str, str]], fill) -> str:
        """Code for ``source`` padded by (before, after) ``widths`` per axis with ``fill``."""
        pairs = ", ".join(f"({a}, {b})" for a, b in widths) + ("," if len(widths) == 1 else "")
        value = self._fill_code(fill)
        return self.unless_unpadded(f"np.pad({source}, ({pairs})" + (
            f", constant_values={value})" if value != "0" else ")"), source, widths)

    @staticmethod
    def unless_unpadded(code: str, source: str, widths) -> str:
        """``code if P else X``: a padding whose widths are sizes (P) is skipped at run time
        when they are all 0 (the padded copy is then ``source`` itself, not a copy of it;
        the backward's slice ``[P:P + H]`` is then the whole axis, a view)."""
        sizes = list(dict.fromkeys(w for pair in widths for w in pair if w != "0"))
        if not sizes or all(w.lstrip("-").isdigit() for w in sizes):
            return code
        cond = " or ".join(w if w.isidentifier() else f"({w})" for w in sizes)
        return f"{code} if {cond} else {source}"

    def _fill_code(self, fill) -> str:
        if fill in (sp.oo, -sp.oo):
            self.imports.add("math")
            return "-math.inf" if fill == -sp.oo else "math.inf"
        return self.lower(sp.sympify(fill)).code

    def cast_like(self, code: str, ref: str) -> str:
        """``code`` converted to the dtype of the array ``ref``."""
        return f"{code}.astype({self.dtype_of(ref)})"

    def dtype_of(self, ref: str) -> str:
        """The dtype of the kernel variable ``ref``: ``ref.dtype``, or ``np.result_type(G)``
        for a 0-d one (a loss's upstream gradient may be a Python float in NumPy, which has
        no ``.dtype``: docs/fuzzing.md, finding 28)."""
        return f"np.result_type({ref})" if ref in self.scalar_tensors else f"{ref}.dtype"

    def scatter_scalar(self, code: str, expr) -> str:
        """The values of a scatter that are one number for every position (Σ_t,k δ(h, S·t + k)
        counts the windows that cover h): NumPy takes a Python number as it is."""
        return code

    def _matvec(self, operands, arrs, over) -> Arr | None:
        """Σ_d A[n,d]·v[d] as ``A @ v`` (and Σ_n v[n]·A[n,d] as ``v @ A``): a BLAS
        matrix-vector product reads A once and writes no temporary."""
        if len(arrs) != 2 or any(self._bool_only(f) for f in operands):
            return None
        (big, vec) = sorted(arrs, key=lambda a: -len(a.axes))
        if len(vec.axes) != 1 or len(big.axes) != 2 or set(over) & set(big.axes) != \
                set(vec.axes) or vec.axes[0] not in big.axes:
            return None
        a, v = self.paren(big.code, big.prec, ATOM), self.paren(vec.code, vec.prec, ATOM)
        # ADD precedence: written in parentheses next to a factor, (1/D)·(A @ v) is not
        # the full-size ((1/D)·A) @ v
        if big.axes[1] == vec.axes[0]:
            return Arr(f"{a} @ {v}", (big.axes[0],), ADD)
        return Arr(f"{v} @ {a}", (big.axes[1],), ADD)

    def _matmul(self, operands, arrs, over) -> MatMul | None:
        """Σ_k A[…, m, k]·B[…, k, n] as ``A @ B``: one BLAS matrix product (einsum takes a
        generic path with copies). An operand whose k and free index come in the other order is
        transposed (``W.T``, a view: BLAS reads it transposed for free); indices both operands
        share and keep are batch axes, which must lead in both (``matmul`` broadcasts over
        them). The left operand is the one whose free index comes first in the result."""
        if len(arrs) != 2 or any(self._bool_only(f) for f in operands):
            return None
        a, b = arrs
        shared = set(a.axes) & set(b.axes)
        summed = [s for s in over if s in set(a.axes) | set(b.axes)]
        if len(summed) != 1 or summed[0] not in shared:
            return None
        k = summed[0]
        batch = tuple(s for s in a.axes if s in shared and s != k)
        free_a = [s for s in a.axes if s not in shared]
        free_b = [s for s in b.axes if s not in shared]
        if len(free_a) != 1 or len(free_b) != 1 or a.axes[:len(batch)] != batch or \
                b.axes[:len(batch)] != batch:
            return None
        if self._rank(free_b[0]) < self._rank(free_a[0]):
            a, b, free_a, free_b = b, a, free_b, free_a

        def operand(arr: Arr, last_two: tuple) -> str:
            code = self.paren(arr.code, arr.prec, ATOM)
            if arr.axes[-2:] == last_two:
                return code
            return code + (".T" if len(arr.axes) == 2 else ".mT")

        left, right = operand(a, (free_a[0], k)), operand(b, (k, free_b[0]))
        # ADD precedence, as for a matrix-vector product: c·(A @ B) keeps its parentheses
        return MatMul(f"{left} @ {right}", batch + (free_a[0], free_b[0]), ADD, left, right,
                      len(batch))

    def _product(self, arrs) -> Arr:
        """Element-wise product in the layout of its largest factor (no transposes), lowest
        rank first so that small factors combine before the full-size ones."""
        arrs = sorted(arrs, key=lambda a: len(a.axes))
        axes = arrs[-1].axes
        parts = [self.paren(self.align(a, axes) if a.axes and a.axes != axes else a.code,
                            a.prec if a.axes == axes or not a.axes else ATOM, MUL)
                 for a in arrs]
        return Arr(" * ".join(parts), axes, MUL)

    def _indices_of(self, e) -> set:
        """Free symbols of ``e``, seeing through common subexpressions to their axes."""
        out = set()
        for sym in e.free_symbols:
            out |= set(self.temps[sym].axes) if sym in self.temps else {sym}
        return out

    def _times(self, a: Arr, b: Arr) -> Arr:
        axes = self._union([a, b])
        left = self.paren(self.align(a, axes) if a.axes else a.code, a.prec, MUL)
        right = self.paren(self.align(b, axes) if b.axes else b.code, b.prec, MUL)
        return Arr(f"{left} * {right}", axes, MUL)

    def _reduce(self, x: Arr, over, template) -> Arr:
        """The reduction of ``x`` over the axes ``over`` that it has. Over none of them, the
        maximum (or mean) of a value constant along ``over`` is that value, ``x`` itself:
        ``x.max(())`` is no reduction in NumPy but torch's ``x.amax(())`` reduces every axis
        to a 0-d tensor, smaller than the axes this result has (a sum counts its terms in
        :meth:`_print_Sum` and reaches here only over axes of x)."""
        positions = tuple(x.axes.index(s) for s in over if s in x.axes)
        if not positions:
            return x
        axes = tuple(s for s in x.axes if s not in over)
        pos = str(positions[0]) if len(positions) == 1 else str(positions)
        code = template.format(x=self.paren(x.code, x.prec, ATOM), axes=pos)
        return Arr(code, axes, ATOM)

    def _print_MaxOver(self, e: MaxOver) -> Arr:
        pooled = self.window_max(e)
        if pooled is not None:
            return pooled
        return self._reduce(self.lower(e.body), list(e.over), self.MAX)

    def _contraction(self, operands, arrs, over) -> Arr:
        """Σ_over of a product of three or more factors that no single factor spans: the
        factors that read the same indices are multiplied element-wise first (that grows
        nothing), so Σ_e (1 − h²)[n,e]·T[n,e]·W[e,d] is ``((1 - h*h) * T) @ W``, a matrix
        product, not a three-operand einsum, which torch contracts pair by pair through an
        N×E×D intermediate (or an einsum of the grouped factors where no matrix product fits)."""
        groups: dict = {}
        for f, a in zip(operands, arrs, strict=True):
            groups.setdefault(frozenset(a.axes), []).append((f, a))
        if len(operands) >= 3 and len(groups) < len(operands):
            # the factors' lowered forms are reused: lowering them again would redo every
            # nested sum inside them, twice per level of a chain
            grouped = [sp.Mul(*[f for f, _ in fs]) for fs in groups.values()]
            garrs = [fs[0][1] if len(fs) == 1 else self._product([a for _, a in fs])
                     for fs in groups.values()]
            product = self._matvec(grouped, garrs, over) if len(grouped) >= 2 else None
            if product is None and len(grouped) >= 2:
                product = self._matmul(grouped, garrs, over)
            if product is not None:
                return product
            if len(grouped) >= 2:
                operands, arrs = grouped, garrs
        return self._einsum([self._numeric(f, a) for f, a in zip(operands, arrs, strict=True)],
                            over)

    def _einsum(self, arrs, over) -> Arr:
        letters = {}
        for s in self._union(arrs) + tuple(over):
            if s in letters:
                continue
            first = s.name[0].lower()
            letters[s] = first if first.isalpha() and first not in letters.values() else \
                next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters.values())
        out_axes = tuple(s for s in self._union(arrs) if s not in over)
        spec = ",".join("".join(letters[s] for s in a.axes) for a in arrs)
        spec += "->" + "".join(letters[s] for s in out_axes)
        self.imports.add(self.module)
        args = ", ".join(a.code for a in arrs)
        return Arr(self.einsum(spec, args), out_axes, ATOM)

    def einsum(self, spec: str, args: str) -> str:
        return f'{self.module}.einsum("{spec}", {args})'

    # -- statements -------------------------------------------------------------------------
    def assign(self, expr, axes: tuple, shape: tuple[str, ...]) -> str:
        """Code for ``expr`` with exactly ``axes`` (broadcast to ``shape`` if it lacks some)."""
        self.order = list(axes) + [s for s in self.order if s not in axes]
        arr = self.lower(expr)
        extra = set(arr.axes) - set(axes)
        if extra:
            raise CodegenError(f"free indices {sorted(map(str, extra))} left in {expr}")
        if arr.axes == tuple(axes):
            return arr.code
        if set(arr.axes) == set(axes):
            perm = tuple(arr.axes.index(s) for s in axes)
            return self.transpose(self.paren(arr.code, arr.prec, ATOM), perm)
        return self.broadcast(self.align(arr, tuple(axes)) if arr.axes else arr.code,
                              shape, arr)

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        raise NotImplementedError


def _linear_split(e, t) -> tuple | None:
    """(rest, coef) with ``e`` = rest + coef·t, each free of t, found through sums and
    products only (no expansion: the rest keeps its factored form); None when t appears
    otherwise (a power, a function, a bound sum)."""
    if e == t:
        return sp.Integer(0), sp.Integer(1)
    if not e.has(t):
        return e, sp.Integer(0)
    if isinstance(e, sp.Add):
        parts = [_linear_split(a, t) for a in e.args]
        if any(p is None for p in parts):
            return None
        return sp.Add(*[p[0] for p in parts]), sp.Add(*[p[1] for p in parts])
    if isinstance(e, sp.Mul):
        holding = [f for f in e.args if f.has(t)]
        if len(holding) != 1:
            return None
        inner = _linear_split(holding[0], t)
        if inner is None:
            return None
        others = sp.Mul(*[f for f in e.args if f is not holding[0]])
        return others * inner[0], others * inner[1]
    return None
