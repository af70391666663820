"""The spec language: a layer written as index-notation math over plain SymPy.

A spec file builds one :class:`Spec`::

    from gradtool.lang import Spec, Sum, sqrt

    spec = Spec("layernorm", "Layer normalisation over the last axis")
    N, D = spec.dims("N D")
    n, d = spec.indices(n=N, d=D)
    X = spec.input("X", N, D)
    gamma = spec.param("gamma", D, init="ones")
    beta = spec.param("beta", D, init="zeros")
    eps = spec.hyper("eps", 1e-5)

    mu = spec.let("mu", [n], Sum(X[n, d], d) / D)
    xc = spec.let("xc", [n, d], X[n, d] - mu[n])
    var = spec.let("var", [n], Sum(xc[n, d] ** 2, d) / D)
    rstd = spec.let("rstd", [n], 1 / sqrt(var[n] + eps))
    xhat = spec.let("xhat", [n, d], xc[n, d] * rstd[n])
    spec.output("Y", [n, d], gamma[d] * xhat[n, d] + beta[d])

Every method records the line it was called from, so errors point into the spec file.
"""

from __future__ import annotations

import keyword
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field

import sympy as sp

from gradtool.errors import SpecError

INITS = ("zeros", "ones", "normal", "uniform", "kaiming_uniform", "xavier_uniform")
KINDS = ("input", "param", "state")
DOMAINS = ("real", "positive", "nonzero", "unit", "binary")
# a hyper-parameter's domain: (what it says, its SymPy assumptions, does a value lie in it?).
# The assumptions are all the simplifier knows of the symbol (Abs(a) is a only for a positive
# a), so a value outside the domain is refused wherever one is given (Spec.check_hypers).
HYPER_DOMAINS = {
    "real": ("a real number", {"real": True}, lambda v: True),
    "positive": ("positive (> 0)", {"positive": True}, lambda v: v > 0),
    "nonnegative": ("non-negative (≥ 0)", {"nonnegative": True}, lambda v: v >= 0),
    "nonzero": ("non-zero", {"real": True, "nonzero": True}, lambda v: v != 0),
    "unit": ("in [0, 1]", {"nonnegative": True}, lambda v: 0 <= v <= 1),
}


class SumOver(sp.Function):
    """``Sum(body, i, j)``: the sum of ``body`` over every value of the indices ``i, j``."""

    nargs = None

    @classmethod
    def eval(cls, *args):
        return None

    @property
    def body(self) -> sp.Expr:
        return self.args[0]

    @property
    def over(self) -> tuple[sp.Symbol, ...]:
        return tuple(self.args[1:])



class MaxOver(sp.Function):
    """``Max(body, i)``: the largest value of ``body`` over every value of ``i`` (pooling)."""

    nargs = None

    @classmethod
    def eval(cls, *args):
        return None

    @property
    def body(self) -> sp.Expr:
        return self.args[0]

    @property
    def over(self) -> tuple[sp.Symbol, ...]:
        return tuple(self.args[1:])



class Padded(sp.Function):
    """``Padded(X[n, c, h - P, w - P], fill)``: the entry of X where every index lies inside
    X's axes, else ``fill`` (0 for zero padding, −∞ for max pooling). The right-hand side of
    a statement made by :meth:`Spec.pad`, and nowhere else."""

    nargs = 2

    @classmethod
    def eval(cls, *args):
        return None

    @property
    def access(self) -> sp.Indexed:
        return self.args[0]

    @property
    def fill(self) -> sp.Expr:
        return self.args[1]


def _is_index(x) -> bool:
    # indices are integer symbols; dimensions are integer *and* positive
    return isinstance(x, sp.Symbol) and bool(x.is_integer) and not x.is_positive


def Sum(body, *over):  # noqa: N802 - reads like the math
    """Sum ``body`` over the named indices: ``Sum(X[n, d], d)`` is Σ_d X[n, d].

    SymPy-style limits ``(d, 0, D - 1)`` are accepted too; the bounds always come from the
    index's declared dimension.
    """
    idx = []
    for i in over:
        if isinstance(i, (tuple, sp.Tuple)):
            i = i[0]
        if not _is_index(i):
            what = "a dimension" if getattr(i, "is_positive", False) else "not an index"
            raise TypeError(f"Sum(...) reduces over declared indices, but `{i}` is {what}; "
                            f"declare an index over it with spec.indices(k=...) and sum over k")
        idx.append(i)
    if not idx:
        raise TypeError("Sum(body, i) needs at least one index to sum over")
    return SumOver(sp.sympify(body), *idx)


def Max(*args):  # noqa: N802
    """``Max(X[n, c], c)`` is the largest X over c (a reduction); ``Max(x, 0)`` is element-wise."""
    if len(args) >= 2 and all(_is_index(a) for a in args[1:]) \
            and not _is_index(args[0]):
        return MaxOver(sp.sympify(args[0]), *args[1:])
    return sp.Max(*args)


def Min(*args):  # noqa: N802
    """``Min(X[n, c], c)`` is the smallest X over c (a reduction), written as −max(−X) so that it
    shares Max's gradient rule (to the first minimum); ``Min(x, 0)`` is element-wise."""
    if len(args) >= 2 and all(_is_index(a) for a in args[1:]) \
            and not _is_index(args[0]):
        return -MaxOver(-sp.sympify(args[0]), *args[1:])
    return sp.Min(*args)


def sigmoid(x):
    """The logistic function 1 / (1 + e^(−x))."""
    return 1 / (1 + sp.exp(-x))


@dataclass
class Tensor:
    name: str
    kind: str  # input | param | state | let | output | update
    dims: tuple[sp.Symbol, ...]
    base: sp.IndexedBase
    line: int | None
    grad: bool = False
    init: str | None = None
    domain: str = "real"
    classes: sp.Expr | None = None  # integer labels: the number of classes (values 0..C-1)
    onehot_of: str | None = None    # a one-hot indicator: the labels it is built from
    keep: sp.Expr | None = None  # a sampled mask: P(value = 1), over hyper-parameters

    @property
    def is_labels(self) -> bool:
        """Integer class labels (``spec.labels``): not a float tensor, never differentiated."""
        return self.classes is not None


@dataclass
class Statement:
    target: str
    lhs: tuple[sp.Symbol, ...]
    rhs: sp.Expr
    kind: str  # let | output | update
    line: int | None


@dataclass
class Fact:
    lhs: sp.Expr
    rhs: sp.Expr
    line: int | None


@dataclass
class Hyper:
    symbol: sp.Symbol
    default: float
    line: int | None
    domain: str = "real"  # a key of HYPER_DOMAINS; the symbol's assumptions follow from it


def _caller_line() -> int | None:
    # the first frame outside this module is the spec file's own line (the dataclass's
    # generated __init__ runs with this module's globals, so it counts as inside)
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_globals is globals()):
        frame = frame.f_back
    return frame.f_lineno if frame is not None else None


MAX_AXES = 12  # the checker samples every axis; more axes than this is never a layer


@dataclass
class Spec:
    """One layer, written as math. See the module docstring for a complete example."""

    name: str
    description: str = ""
    reference: str | None = None
    file: str | None = None
    dim_symbols: dict[str, sp.Symbol] = field(default_factory=dict)
    index_dims: dict[sp.Symbol, sp.Symbol] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    hypers: dict[str, Hyper] = field(default_factory=dict)
    statements: list[Statement] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    reference_fn: object = None
    min_sizes: dict[str, int] = field(default_factory=dict)
    eval_statements: list[Statement] = field(default_factory=list)
    eval_reference_fn: object = None
    lifted: dict[str, tuple] = field(default_factory=dict)  # lifted tensor -> its statement
    derived: dict[str, sp.Expr] = field(default_factory=dict)  # size -> its formula (spec.size)
    requires: list = field(default_factory=list)  # (relation between sizes, line)
    # relations that hold only where the layer trains (batch statistics): spec.require(...,
    # training=True); the eval form has none
    training_requires: list = field(default_factory=list)  # (relation, line)
    # the generated layer class's name as people write it (LayerNorm, ReLU); None: the spec's
    # name in CamelCase (my_layer -> MyLayer)
    class_name: str | None = None

    def __post_init__(self) -> None:
        line = _caller_line()
        if not isinstance(self.name, str) or not self.name.isidentifier() \
                or not self.name.isascii():
            raise self.error(f"the spec's name {self.name!r} is not a valid name", line,
                             "use an ASCII identifier such as 'layernorm' or 'my_layer' "
                             "(it names the generated class and the cached kernel files)")
        for what in ("description", "reference"):
            value = getattr(self, what)
            if value is not None and not isinstance(value, str):
                raise self.error(f"the spec's {what} must be text, got {value!r}", line,
                                 f'write Spec("{self.name}", "what the layer computes")')
        if self.description is None:
            self.description = ""
        if self.class_name is not None:
            from gradtool.codegen.base import RESERVED  # (the generated module's own names)

            if not (isinstance(self.class_name, str) and self.class_name.isidentifier()
                    and self.class_name.isascii() and not keyword.iskeyword(self.class_name)):
                raise self.error(f"the class name {self.class_name!r} is not a valid Python "
                                 "class name", line, 'use an ASCII identifier such as "LayerNorm"')
            if self.class_name in RESERVED:
                raise self.error(f"the class name {self.class_name!r} is a name the generated "
                                 "module uses for itself", line,
                                 'pick another, such as "LayerNorm"')

    # -- errors ---------------------------------------------------------------------------
    def error(self, message: str, line: int | None = None, hint: str | None = None) -> SpecError:
        return SpecError(message, file=self.file, line=line, hint=hint)

    def _new_name(self, name: str, line: int | None, what: str = "name") -> None:
        """Refuse a name that is not one Python identifier of its own: not an identifier,
        not in the form Python reads it (NFKC: ``ℕ`` is ``N``, ``ﬁ`` is ``fi``), already
        declared (sizes, tensors, hyper-parameters and indices share one namespace), or
        one that gradtool's printed gradients would read as the gradient of another name
        (a tensor ``dX`` beside a tensor ``X``). Names that the generated kernels use for
        themselves (G, np, torch, ctx, ...) are fine: the kernels rename around them, and the
        upstream gradient and the adjoints take other names (``Derivation.upstream_names``,
        ``Derivation.adjoint_names``: a tensor ``g_t`` beside ``t`` gives the adjoint ``g_t_``)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise self.error(f"{name!r} is not a valid name", line,
                             "use a Python identifier such as 'X' or 'gamma'")
        plain = unicodedata.normalize("NFKC", name)
        if plain != name:
            raise self.error(f"the {what} `{name}` is `{plain}` to Python (identifiers are "
                             "NFKC-normalised), so it would be one variable with any "
                             f"`{plain}`", line, f"write it as `{plain}`, or pick another name")
        if name in self._names():
            raise self.error(f"`{name}` is declared twice", line,
                             "sizes, tensors, hyper-parameters and indices each need a name "
                             "of their own")
        if what != "tensor":
            return
        for other in self.tensors:
            grad, base = (name, other) if name == "d" + other else (other, name) \
                if other == "d" + name else (None, None)
            if grad is not None:
                raise self.error(f"`{grad}` reads as the gradient of `{base}` in "
                                 "gradtool's printed backward", line,
                                 f"rename `{grad}` (or `{base}`)")

    def _names(self) -> set[str]:
        return set(self.tensors) | set(self.hypers) | set(self.dim_symbols) | \
            {i.name for i in self.index_dims}

    # -- declarations -----------------------------------------------------------------------
    def dims(self, names: str) -> tuple[sp.Symbol, ...]:
        """Declare dimension sizes: ``N, D = spec.dims("N D")``."""
        line = _caller_line()
        out = []
        for name in names.replace(",", " ").split():
            self._new_name(name, line, "size")
            sym = sp.Symbol(name, integer=True, positive=True)
            self.dim_symbols[name] = sym
            out.append(sym)
        return out[0] if len(out) == 1 else tuple(out)

    def min_size(self, **sizes: int) -> None:
        """The smallest size the layer makes sense for, e.g. ``spec.min_size(N=2)`` when the
        forward divides by N − 1; checks never sample below it."""
        line = _caller_line()
        for name, value in sizes.items():
            if name not in self.dim_symbols:
                raise self.error(f"min_size names `{name}`, which is not a declared dimension",
                                 line, 'declare it first with spec.dims("N D")')
            self.min_sizes[name] = int(value)

    def size(self, name: str, formula) -> sp.Symbol:
        """A size that follows from other sizes, read from nothing and passed to nothing: the
        kernels and layers compute it from the input's sizes at every call. A convolution's
        output length, with PyTorch's floor (input rows no window reaches are unused)::

            OH = spec.size("OH", (H + 2*P - K) // S + 1)

        ``formula`` is built from declared sizes, integers, + − × and ``//``. Checks sample
        only sizes where it is at least 1. Raises :class:`SpecError` for anything else."""
        line = _caller_line()
        try:
            formula = sp.sympify(formula, strict=True)
        except (sp.SympifyError, TypeError):
            formula = None
        declared = set(self.dim_symbols.values())
        ok = isinstance(formula, sp.Expr) and bool(formula.free_symbols) \
            and formula.free_symbols <= declared and all(
                isinstance(n, (sp.Add, sp.Mul, sp.Symbol, sp.Integer, sp.floor))
                or (isinstance(n, sp.Pow) and n.exp == -1) or n.is_Rational
                for n in sp.preorder_traversal(formula))
        if ok:  # a quotient only inside ⌊ ⌋: a size is an integer
            outside = formula.xreplace({f: sp.Integer(0) for f in formula.atoms(sp.floor)})
            ok = not any(isinstance(n, sp.Pow) or (n.is_Rational and not n.is_Integer)
                         for n in sp.preorder_traversal(outside))
        if not ok:
            raise self.error(f"the size `{name}` is given as {formula!r}, which is not a "
                             "formula of declared sizes", line,
                             'write it from sizes declared with spec.dims, integers, + - * '
                             'and //, e.g. spec.size("OH", (H + 2*P - K) // S + 1)')
        self._new_name(name, line, "size")
        sym = sp.Symbol(name, integer=True, positive=True)
        self.dim_symbols[name] = sym
        self.derived[name] = formula
        return sym

    def require(self, *relations, training: bool = False) -> None:
        """Relations between sizes that the layer needs, e.g. ``spec.require(2*P <= K)`` for
        max pooling (PyTorch refuses padding wider than half the window, where a window
        could hold padding only). Checks sample only sizes that satisfy them; a layer refuses
        others. With ``training=True`` they hold only in training, not for the eval form:
        ``spec.require(N*H*W >= 2, training=True)`` for batch norm over channels, whose
        unbiased running variance divides by the N·H·W − 1 values per channel (PyTorch's
        "Expected more than 1 value per channel when training")."""
        line = _caller_line()
        declared = set(self.dim_symbols.values())
        for rel in relations:
            if not isinstance(rel, sp.core.relational.Relational) or \
                    not rel.free_symbols <= declared:
                raise self.error(f"spec.require takes relations between sizes, got {rel!r}",
                                 line, "write e.g. spec.require(2*P <= K)")
            (self.training_requires if training else self.requires).append((rel, line))

    def check_given_sizes(self, sizes: dict[str, int], option: str = "--shape") -> None:
        """Raise :class:`SpecError` for a size given below its minimum (1, or what
        :meth:`min_size` says: a padding may be 0)."""
        for name, value in sizes.items():
            least = self.min_sizes.get(name, 1)
            if name in self.dim_symbols and value < least:
                raise SpecError(f"{option} {name}={value}: {self.name} needs {name} ≥ {least}",
                                hint=f"give {name} ≥ {least}")

    @property
    def base_dims(self) -> dict[str, sp.Symbol]:
        """The sizes that are not :meth:`size` formulas: those that are sampled or given."""
        return {n: s for n, s in self.dim_symbols.items() if n not in self.derived}

    def sizes_from(self, values: dict) -> dict:
        """``values`` (size symbol or name -> int, the base sizes) with every derived size
        added, under the same kind of key. Raises :class:`SpecError` when a derived size is
        below 1 or a :meth:`require` relation fails (the message names the sizes)."""
        by_name = values and isinstance(next(iter(values)), str)
        at = {self.dim_symbols[k] if by_name else k: int(v) for k, v in values.items()}
        for name, formula in self.derived.items():
            value = formula.xreplace(at)
            if not value.is_number:
                continue  # a size it needs is not given
            value = int(value)
            if value < 1:
                shown = ", ".join(f"{s} = {at[s]}" for s in sorted(formula.free_symbols, key=str))
                raise self.error(f"the size {name} = {self.derived[name]} is {value} at "
                                 f"{shown}", None, f"{name} must be at least 1: larger inputs "
                                 "or a smaller window")
            at[self.dim_symbols[name]] = value
        for rel, line in self.requires + self.training_requires:
            value = rel.xreplace(at)
            if value in (sp.true, sp.false) and not value:
                raise self.error(f"the sizes break {rel} ("
                                 + ", ".join(f"{s} = {at[s]}" for s in
                                             sorted(rel.free_symbols, key=str)) + ")", line)
        return {(k.name if by_name else k): v for k, v in at.items()}

    def indices(self, **ranges: sp.Symbol) -> tuple[sp.Symbol, ...]:
        """Declare index variables and the dimension each runs over.

        ``n, d = spec.indices(n=N, d=D)``
        """
        line = _caller_line()
        out = []
        for name, dim in ranges.items():
            if sp.Symbol(name, integer=True) in self.index_dims:
                raise self.error(f"index `{name}` is declared twice", line)
            self._new_name(name, line, "index")
            if re.fullmatch(r"[^\W\d]*'*_\d+", name):
                raise self.error(f"index names like `{name}` are the ones gradtool gives the "
                                 "indices it binds itself", line,
                                 f"drop the underscore: `{name.replace('_', '')}`")
            if not self._is_dim(dim):
                raise self.error(f"index `{name}` runs over {dim!r}, which is not a declared "
                                 "dimension", line, 'declare it first with spec.dims("N D")')
            dim = sp.sympify(dim)
            sym = sp.Symbol(name, integer=True)
            self.index_dims[sym] = dim
            out.append(sym)
        return out[0] if len(out) == 1 else tuple(out)

    def _is_dim(self, dim) -> bool:
        """A declared dimension, or an integer expression of declared dimensions."""
        try:
            expr = sp.sympify(dim)
        except (sp.SympifyError, TypeError):
            return False
        declared = set(self.dim_symbols.values())
        return bool(expr.free_symbols) and expr.free_symbols <= declared and \
            (expr in declared or expr.is_polynomial(*declared))

    def _tensor(self, name, kind, dims, line, grad=False, init=None,
                domain="real", classes=None) -> sp.IndexedBase:
        if kind == "lifted":  # named by the engine, which keeps clear of declared names
            if name in self._names():
                raise self.error(f"internal: the lifted name `{name}` is taken", line)
        else:
            self._new_name(name, line, "tensor")
        for dim in dims:
            if not self._is_dim(dim):
                raise self.error(f"`{name}` has a dimension {dim!r} that is not declared", line,
                                 'declare dimensions with spec.dims("N D"); a size may also be '
                                 'an expression of them, like (T - 1)*S + K')
        if len(dims) > MAX_AXES:
            raise self.error(f"`{name}` has {len(dims)} axes; a tensor has at most {MAX_AXES}",
                             line, "merge axes, or split the layer into several specs")
        dims = tuple(sp.sympify(d) for d in dims)
        base = sp.IndexedBase(name, shape=tuple(dims) if dims else None)
        if domain not in DOMAINS and not (domain == "labels" and classes is not None):
            hint = "use one of " + ", ".join(DOMAINS)
            if domain == "labels":
                hint = f'declare integer labels with spec.labels("{name}", N, classes=C)'
            raise self.error(f"unknown domain {domain!r} for `{name}`", line, hint)
        self.tensors[name] = Tensor(name, kind, tuple(dims), base, line, grad, init, domain,
                                    classes)
        return base if dims else sp.Symbol(name, real=True)

    def input(self, name: str, *dims: sp.Symbol, grad: bool = True,
              domain: str = "real") -> sp.IndexedBase:
        """A float tensor the layer receives. ``grad=False`` for targets and masks; integer
        class labels are :meth:`labels`.

        ``domain`` says where valid values live, for checks that sample random inputs:
        real (default), positive (log, division), nonzero, unit (0..1, probabilities),
        binary (0/1 masks, one-hot targets). Stated facts about the input (``spec.fact``,
        e.g. rows summing to one) are kept too: see :mod:`gradtool.check.sampling`.
        """
        return self._tensor(name, "input", dims, _caller_line(), grad=grad, domain=domain)

    def mask(self, name: str, *dims: sp.Symbol, keep) -> sp.IndexedBase:
        """A random 0/1 input that a layer draws itself in training, each element 1 with
        probability ``keep`` (an expression of hyper-parameters), as dropout's mask::

            M = spec.mask("M", N, D, keep=1 - p)

        For derivation and checks it is an ordinary input without a gradient (domain binary);
        a model layer samples it at every training call, so its caller never passes it.
        """
        line = _caller_line()
        try:
            keep = sp.sympify(keep)
        except (sp.SympifyError, TypeError):
            raise self.error(f"keep= of mask `{name}` is not an expression", line,
                             "write it from hyper-parameters, e.g. keep=1 - p") from None
        hypers = {h.symbol for h in self.hypers.values()}
        unknown = keep.free_symbols - hypers
        if unknown:
            sym = sorted(unknown, key=str)[0]
            raise self.error(f"keep= of mask `{name}` uses `{sym}`, which is not a "
                             "hyper-parameter", line,
                             "declare it first with spec.hyper, e.g. p = spec.hyper('p', 0.5)")
        base = self._tensor(name, "input", dims, line, grad=False, domain="binary")
        self.tensors[name].keep = keep
        return base

    def labels(self, name: str, *dims: sp.Symbol, classes: sp.Symbol) -> sp.IndexedBase:
        """Integer class labels with values 0 .. classes − 1, as PyTorch's
        ``F.cross_entropy(X, y)`` and course code take them::

            y = spec.labels("y", N, classes=C)
            T = spec.onehot(y)                  # T[n, c] = δ(c, y[n])

        Labels are never differentiated. They enter the math only through their one-hot
        indicator, ``spec.onehot(y)[n, c]`` or, the same, ``KroneckerDelta(c, y[n])``: a
        constant 0/1 tensor whose rows sum to one (that fact is stated for you). Generated
        kernels take ``y`` as an integer array (NumPy) or an int64 tensor (PyTorch); checks
        sample it as integers in [0, classes).

        Raises :class:`SpecError` when ``classes`` is not a declared dimension or ``y`` has
        no axes.
        """
        line = _caller_line()
        if not self._is_dim(classes):
            raise self.error(f"labels `{name}` need classes=<a declared dimension>, got "
                             f"{classes!r}", line,
                             'declare it with spec.dims("N C") and pass classes=C')
        if not dims:
            raise self.error(f"labels `{name}` need at least one axis", line,
                             f'one label per sample: spec.labels("{name}", N, classes=C)')
        return self._tensor(name, "input", dims, line, grad=False, domain="labels",
                            classes=sp.sympify(classes))

    def onehot(self, labels) -> sp.IndexedBase:
        """The one-hot indicator of integer labels (see :meth:`labels`):
        ``spec.onehot(y)[n, c]`` is δ(c, y[n]), 1 where c is the label of sample n, else 0.

        It is the constant tensor ``onehot_y`` over y's axes and the classes axis, defined by
        its own statement, with the fact Σ_c onehot_y[n, c] = 1; the engine treats it as any
        non-differentiable 0/1 input, so softmax cross-entropy simplifies to
        (softmax(X) − onehot_y)/N as it does with soft targets. The kernels build it from the
        labels (an integer comparison) and the backward reads the labels, not a float copy.
        """
        line = _caller_line()
        name = getattr(getattr(labels, "label", None), "name", labels)
        t = self.tensors.get(name) if isinstance(name, str) else None
        if t is None or not t.is_labels:
            raise self.error(f"spec.onehot(...) takes integer labels, got {labels!r}", line,
                             'declare them with y = spec.labels("y", N, classes=C)')
        return self._onehot(t, None, line)

    def _onehot(self, t: Tensor, idx, line) -> sp.IndexedBase:
        """The tensor ``onehot_<labels>``, made on first use; ``idx`` (the indices of a first
        use such as δ(c, y[n])) names its axes when they are plain distinct indices."""
        name = f"onehot_{t.name}"
        if name in self.tensors:
            return self.tensors[name].base
        dims = tuple(t.dims) + (t.classes,)
        plain = idx is not None and len(set(idx)) == len(idx) == len(dims) and all(
            self.index_dims.get(i) == d for i, d in zip(idx, dims, strict=True))
        if not plain:
            idx = []
            for d in dims:
                free = [i for i, r in self.index_dims.items() if r == d and i not in idx]
                if not free:
                    raise self.error(f"the one-hot of `{t.name}` needs an index over {d}",
                                     line, f"declare one first, e.g. spec.indices(k={d})")
                idx.append(free[0])
        idx = tuple(idx)
        base = self._statement("let", name, idx, sp.KroneckerDelta(idx[-1], t.base[idx[:-1]]),
                               line, indicators=False)
        self.tensors[name].onehot_of = t.name
        self.facts.append(Fact(SumOver(base[idx], idx[-1]), sp.Integer(1), line))
        return base

    def _indicators(self, rhs: sp.Expr, line) -> sp.Expr:
        """δ(c, y[n]) with integer labels y → onehot_y[n, c]; labels read any other way (a
        gather X[n, y[n]], arithmetic on y) are an error that says what to write."""
        def label_access(x) -> Tensor | None:
            if isinstance(x, sp.Indexed) and x.base.label.name in self.tensors:
                t = self.tensors[x.base.label.name]
                return t if t.is_labels else None
            return None

        def indicator(node):
            a, b = node.args
            if label_access(a) is not None:
                a, b = b, a
            t = label_access(b)
            if t is None:
                return node
            if self.index_dims.get(a) != t.classes:
                raise self.error(f"{node} compares the labels `{t.name}` with `{a}`, which is "
                                 f"not an index over the classes {t.classes}", line,
                                 f"write KroneckerDelta(c, {b}) with c an index over "
                                 f"{t.classes}")
            idx = tuple(b.indices) + (a,)
            return self._onehot(t, idx, line)[idx]

        rhs = rhs.replace(lambda e: isinstance(e, sp.KroneckerDelta), indicator)
        for node in sp.preorder_traversal(rhs):
            t = label_access(node)
            if t is not None:
                raise self.error(f"the integer labels `{t.name}` are read as {node}; labels "
                                 "enter the math only as their one-hot indicator", line,
                                 f"write spec.onehot({t.name})[n, c] or KroneckerDelta(c, "
                                 f"{t.name}[n]) with c over {t.classes}; a gather "
                                 f"X[n, {t.name}[n]] is Sum(spec.onehot({t.name})[n, c] * "
                                 "X[n, c], c)")
        return rhs

    def param(self, name: str, *dims: sp.Symbol, init: str = "normal") -> sp.IndexedBase:
        """A learned parameter; ``init`` is one of zeros, ones, normal, uniform,
        kaiming_uniform, xavier_uniform."""
        line = _caller_line()
        if init not in INITS:
            raise self.error(f"unknown init {init!r} for `{name}`", line,
                             "use one of " + ", ".join(INITS))
        return self._tensor(name, "param", dims, line, grad=True, init=init)

    def state(self, name: str, *dims: sp.Symbol, init: str = "zeros") -> sp.IndexedBase:
        """A buffer the forward reads and updates (running statistics); never differentiated."""
        line = _caller_line()
        if init not in INITS:
            raise self.error(f"unknown init {init!r} for `{name}`", line,
                             "use one of " + ", ".join(INITS))
        return self._tensor(name, "state", dims, line, grad=False, init=init)

    def hyper(self, name: str, default: float, domain: str = "real") -> sp.Symbol:
        """A hyper-parameter with a default value, a plain scalar in the math (eps, slope, p).

        ``domain`` is what the math may assume of it, and all the simplifier knows: "real"
        (default: any finite number), "positive" (> 0: eps, so that sqrt(var + eps) needs no
        case for eps ≤ 0), "nonnegative" (≥ 0), "nonzero" or "unit" (in [0, 1]: dropout's p,
        a momentum). A positive default alone assumes nothing: ``Abs(a)`` stays ``Abs(a)``
        unless ``a`` is declared positive. Raises :class:`SpecError` for an unknown domain or
        a default outside it; a value given later (a layer's option, ``check --set``, a value
        read from your layer) is checked the same way (:meth:`check_hypers`)."""
        line = _caller_line()
        self._new_name(name, line, "hyper-parameter")
        try:
            value = float(default)
        except (TypeError, ValueError):
            raise self.error(f"hyper-parameter `{name}` needs a number as default, "
                             f"got {default!r}", line) from None
        if not math.isfinite(value):
            raise self.error(f"hyper-parameter `{name}` has the default {value}", line,
                             "give a finite number")
        if domain not in HYPER_DOMAINS:
            raise self.error(f"unknown domain {domain!r} for hyper-parameter `{name}`", line,
                             "use one of " + ", ".join(HYPER_DOMAINS))
        what, assumptions, holds = HYPER_DOMAINS[domain]
        if not holds(value):
            raise self.error(f"hyper-parameter `{name}` is declared {what} (domain="
                             f"\"{domain}\") but its default is {value:g}", line,
                             "give a default in the domain, or declare the domain the value "
                             "lies in")
        sym = sp.Symbol(name, **assumptions)
        self.hypers[name] = Hyper(sym, value, line, domain)
        return sym

    def check_hypers(self, values: dict, source: str = "") -> dict[str, float]:
        """``values`` (hyper-parameter name -> number) as floats, after checking that each
        is a finite number in its declared domain and that no statement divides by zero
        there (dropout's X·M/(1 − p) at p = 1), the others at their defaults. ``source``
        says where the values came from (``"layernorm layer"``, ``"--set"``).

        The simplifier derived the kernels under the domain's assumptions (Abs(eps) is eps
        only for a positive eps), so a value outside it would compute another function,
        silently. Raises :class:`SpecError` at the hyper-parameter's declaration: its name,
        the value, what the spec assumes and the fix."""
        given = f"{source}: " if source else ""
        out = {}
        for name, value in values.items():
            h = self.hypers[name]
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            what, _, holds = HYPER_DOMAINS[h.domain]
            if isinstance(value, bool) or not math.isfinite(number) or not holds(number):
                shown = f"{number:g}" if math.isfinite(number) else repr(value)
                raise self.error(
                    f"{given}hyper-parameter `{name}` = {shown}, but {self.name} declares it "
                    f"{what} (spec.hyper(\"{name}\", ..., domain=\"{h.domain}\")) and its "
                    "kernels are derived for such values only", h.line,
                    f"give `{name}` a value that is {what}" + ("" if h.domain == "real" else
                                                         ", or declare a wider domain in the "
                                                         "spec if its math holds there"))
            out[name] = number
        changed = {self.hypers[n].symbol: v for n, v in out.items() if v != self.hypers[n].default}
        if changed:
            at = {**self.hyper_defaults(), **changed}
            for st in self.statements + self.eval_statements:
                if st.rhs.xreplace(at).has(sp.zoo, sp.nan):
                    shown = ", ".join(f"{s} = {v:g}" for s, v in changed.items()
                                      if st.rhs.has(s))
                    raise self.error(f"{given}`{st.target}` divides by zero at {shown}",
                                     st.line, "give the hyper-parameter another value")
        return out

    def pad(self, name: str, source, widths, fill=0) -> sp.IndexedBase:
        """A padded copy of ``source``: ``widths`` has one entry per axis, a size, a number or
        a pair (before, after); an entry w pads w before and w after. Entries outside
        ``source`` read ``fill``::

            Xp = spec.pad("Xp", X, (0, 0, P, P))              # zero padding of axes 2, 3
            Xm = spec.pad("Xm", X, (0, 0, P, P), fill=-oo)    # max pooling pads with −∞

        Xp's axes are X's plus both widths; Xp[n, c, h, w] = X[n, c, h − P, w − P] inside X,
        ``fill`` outside, so the adjoint of X is the slice of Xp's adjoint at X's positions
        (the padding's gradient has no source). The kernels pad with ``np.pad``/``F.pad``.
        Raises :class:`SpecError` for an unknown source, a wrong number of widths, or a width
        that is not a size or a non-negative integer."""
        line = _caller_line()
        src = self.tensors.get(getattr(getattr(source, "label", None), "name", source)) \
            if isinstance(source, (sp.IndexedBase, str)) else None
        if src is None or not src.dims or src.is_labels:
            raise self.error(f"spec.pad('{name}', ...) pads a declared tensor with axes, got "
                             f"{source!r}", line, f'e.g. spec.pad("{name}", X, (0, 0, P, P))')
        widths = tuple(widths) if isinstance(widths, (tuple, list)) else (widths,)
        if len(widths) != len(src.dims):
            raise self.error(f"`{src.name}` has {len(src.dims)} axes but spec.pad gives "
                             f"{len(widths)} widths", line, "give one width per axis (0 where "
                             "an axis is not padded)")
        pairs = []
        for w in widths:
            pair = tuple(w) if isinstance(w, (tuple, list)) else (w, w)
            checked = []
            for x in pair:
                x = sp.sympify(x)
                if not ((x.is_Integer and x >= 0) or self._is_dim(x)):
                    raise self.error(f"the padding width {x!r} of `{name}` is not a size or a "
                                     "non-negative integer", line,
                                     'declare it with spec.dims("P"), or write a number')
                checked.append(x)
            if len(checked) != 2:
                raise self.error(f"a padding width of `{name}` has {len(checked)} entries",
                                 line, "give w, or a pair (before, after)")
            pairs.append(tuple(checked))
        try:
            fill = sp.sympify(fill, strict=True)
        except (sp.SympifyError, TypeError):
            fill = None
        if not (isinstance(fill, sp.Expr) and fill.is_number and (fill.is_real
                                                                   or fill in (sp.oo, -sp.oo))):
            raise self.error(f"the fill of `{name}` must be a number (0, or -oo for max "
                             f"pooling), got {fill!r}", line)
        dims = tuple(d + a + b for d, (a, b) in zip(src.dims, pairs, strict=True))
        lhs = []
        for d, (a, b), old in zip(dims, pairs, src.dims, strict=True):
            if a == 0 and b == 0:
                free = [i for i, r in self.index_dims.items() if r == d and i not in lhs]
                if free:
                    lhs.append(free[0])
                    continue
            lhs.append(self._pad_index(old, d, line))
        self._tensor(name, "let", dims, line)
        read = src.base[tuple(i - a for i, (a, _) in zip(lhs, pairs, strict=True))]
        self.statements.append(Statement(name, tuple(lhs), Padded(read, fill), "let", line))
        return self.tensors[name].base

    def _pad_index(self, old, dim, line) -> sp.Symbol:
        """A new index over a padded axis, named after the axis (h over H + 2P)."""
        stem = str(old).lower() if isinstance(old, sp.Symbol) and str(old).isalpha() else "x"
        taken = self._names()
        name = next(n for n in (stem + "p", *(f"{stem}p{k}" for k in range(2, 99)))
                    if n not in taken)
        sym = sp.Symbol(name, integer=True)
        self.index_dims[sym] = sp.sympify(dim)
        return sym

    # -- statements -------------------------------------------------------------------------
    def _statement(self, kind: str, name: str, lhs, rhs, line,
                   indicators: bool = True) -> sp.IndexedBase:
        lhs = tuple(lhs) if isinstance(lhs, (list, tuple)) else (lhs,)
        for i in lhs:
            if i not in self.index_dims:
                raise self.error(f"`{name}[...]` is indexed by {i!r}, which is not a declared "
                                 "index", line, "declare it with spec.indices(i=D)")
        if len(set(lhs)) != len(lhs):
            raise self.error(f"`{name}` repeats an index on the left", line,
                             "each axis of a new tensor needs its own index")
        try:
            rhs = sp.sympify(rhs, strict=True)
        except (sp.SympifyError, TypeError):
            rhs = None
        if not isinstance(rhs, sp.Expr):
            raise self.error(f"the right-hand side of `{name}` is not a SymPy expression", line,
                             "build it from tensors, indices, numbers and gradtool.lang "
                             "functions")
        if indicators:
            rhs = self._indicators(rhs, line)
        self._check_reads(name, kind, rhs, line)
        dims = tuple(self.index_dims[i] for i in lhs)
        if kind == "update":
            if name not in self.tensors or self.tensors[name].kind != "state":
                raise self.error(f"spec.update('{name}', ...) needs a state tensor", line,
                                 f'declare it with spec.state("{name}", ...)')
            if dims != self.tensors[name].dims:
                raise self.error(f"`{name}` is updated with indices over {dims}, but it is "
                                 f"declared over {self.tensors[name].dims}", line)
            base = self.tensors[name].base
        else:
            base = self._tensor(name, kind, dims, line)
        self.statements.append(Statement(name, lhs, rhs, kind, line))
        return base

    def _check_reads(self, name: str, kind: str, rhs: sp.Expr, line) -> None:
        """Every tensor a statement reads is declared before it (no cycles, no forward
        references), and no constant division by zero."""
        for base in sorted({a.base.label.name for a in rhs.atoms(sp.Indexed)}):
            if base not in self.tensors:
                what = "reads itself" if base == name else f"reads `{base}` before it is defined"
                raise self.error(f"`{name}` {what}", line,
                                 "a statement may read inputs, parameters, hyper-parameters and "
                                 "tensors defined on earlier lines")
            if base == name and kind != "update":
                raise self.error(f"`{name}` reads itself", line,
                                 "give the new value its own name")
        if rhs.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise self.error(f"`{name}` divides by zero (its right-hand side is {rhs})", line,
                             "check the denominators")
        if rhs.has(sp.I):
            raise self.error(f"`{name}` has an imaginary number (its right-hand side is {rhs}); "
                             "gradtool differentiates real functions", line,
                             "remove the imaginary part (1j, sympy.I)")
        defaults = {h.symbol: h.default for h in self.hypers.values()}
        if defaults and rhs.xreplace(defaults).has(sp.zoo, sp.nan):
            zero = [n for n, h in self.hypers.items() if h.default == 0 and rhs.has(h.symbol)]
            raise self.error(f"`{name}` divides by zero at the default "
                             f"{', '.join(f'{z} = 0' for z in zero) or 'hyper-parameters'}", line,
                             "give the hyper-parameter a non-zero default")

    def let(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """A named intermediate: ``mu = spec.let("mu", [n], Sum(X[n, d], d) / D)``."""
        return self._statement("let", name, lhs, rhs, _caller_line())

    def output(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """An output of the layer; ``[]`` as indices makes a scalar (a loss)."""
        return self._statement("output", name, lhs, rhs, _caller_line())

    def update(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """The forward's new value of a state tensor (running mean/var); not differentiated."""
        return self._statement("update", name, lhs, rhs, _caller_line())

    def eval_output(self, name: str, lhs, rhs) -> None:
        """What output ``name`` is at evaluation (``model.eval()``) instead of in training:
        batch norm reads its running statistics, dropout is the identity::

            spec.eval_output("Y", [n, c], gamma[c] * (X[n, c] - running_mean[c])
                             / sqrt(running_var[c] + eps) + beta[c])

        The eval form (:meth:`eval_form`) is derived, generated and checked like any spec.
        It has no state updates, no sampled masks it does not read, and no ``min_size`` (but
        a size that may be 0, a padding, still may).
        """
        line = _caller_line()
        lhs = tuple(lhs) if isinstance(lhs, (list, tuple)) else (lhs,)
        out = self.tensors.get(name)
        if out is None or out.kind != "output":
            raise self.error(f"spec.eval_output('{name}', ...) names no output", line,
                             f"declare the training form first: spec.output('{name}', ...)")
        if any(s.target == name for s in self.eval_statements):
            raise self.error(f"the eval form of `{name}` is given twice", line)
        dims = tuple(self.index_dims.get(i) for i in lhs)
        if dims != out.dims:
            raise self.error(f"the eval form of `{name}` is indexed over {dims}, but `{name}` "
                             f"is over {out.dims}", line, "use the same index list as its output")
        try:
            rhs = sp.sympify(rhs)
        except (sp.SympifyError, TypeError):
            raise self.error(f"the eval form of `{name}` is not a SymPy expression",
                             line) from None
        self.eval_statements.append(Statement(name, lhs, rhs, "output", line))

    def eval_reference(self, fn):
        """Decorator: like :meth:`torch_reference`, for the eval form (``F.batch_norm`` with
        ``training=False``)."""
        self.eval_reference_fn = fn
        return fn

    def eval_form(self) -> Spec | None:
        """The layer at evaluation, as its own spec named ``<name>_eval``, or None when the
        spec states no eval form. Outputs given by :meth:`eval_output` replace the training
        ones; updates are dropped; intermediates and tensors no output reads are pruned."""
        if not self.eval_statements:
            return None
        evals = {s.target: s for s in self.eval_statements}
        kept = [evals.get(s.target, s) for s in self.statements if s.kind != "update"]
        by_name = {s.target: s for s in kept}
        needed, todo = set(), [s.target for s in kept if s.kind == "output"]
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            needed.add(name)
            if name in by_name:
                rhs = by_name[name].rhs
                todo += [b.label.name for b in rhs.atoms(sp.IndexedBase)]
                todo += [x.name for x in rhs.free_symbols if isinstance(x, sp.Symbol)
                         and x.name in self.tensors]
        out = Spec(f"{self.name}_eval", f"{self.description} (eval form)".lstrip(),
                   reference=None, file=self.file,
                   class_name=f"{self.class_name}Eval" if self.class_name else None)
        out.dim_symbols = dict(self.dim_symbols)
        out.index_dims = dict(self.index_dims)
        out.derived = dict(self.derived)
        out.requires = list(self.requires)
        out.min_sizes = {k: v for k, v in self.min_sizes.items() if v == 0}  # paddings
        out.hypers = dict(self.hypers)
        out.tensors = {n: t for n, t in self.tensors.items() if n in needed}
        out.statements = [s for s in kept if s.target in needed]
        out.facts = [f for f in self.facts
                     if {b.label.name for b in f.lhs.atoms(sp.IndexedBase)} <= needed]
        out.reference_fn = self.eval_reference_fn
        return out

    def fact(self, lhs, rhs) -> None:
        """State a fact about the inputs that the simplifier may use,
        e.g. ``spec.fact(Sum(T[n, c], c), 1)``: each row of the targets sums to one.

        Checks sample inputs that keep it (one-hot rows for a binary T, probability rows for a
        positive one) and stop with an error at this line when they cannot, or when the
        sampled values break it (:mod:`gradtool.check.sampling`)."""
        self.facts.append(Fact(sp.sympify(lhs), sp.sympify(rhs), _caller_line()))

    def torch_reference(self, fn):
        """Decorator: an independent PyTorch implementation that ``gradtool check`` compares
        the spec against (usually a ``torch.nn.functional`` op)::

            @spec.torch_reference
            def reference(X, gamma, beta, eps):
                import torch.nn.functional as F
                return F.layer_norm(X, X.shape[-1:], gamma, beta, eps)

        Its parameters are named after the spec's tensors and hyper-parameters (any subset, in
        any order); it returns the outputs in declaration order (a tuple for several), and may
        update state tensors in place as ``F.batch_norm`` does. Import torch inside it, so that
        loading the spec stays fast.
        """
        self.reference_fn = fn
        return fn

    # -- queries ----------------------------------------------------------------------------
    def of_kind(self, *kinds: str) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.kind in kinds]

    @property
    def grad_inputs(self) -> list[Tensor]:
        """Inputs and parameters that get a gradient, in declaration order."""
        return [t for t in self.tensors.values() if t.kind in ("input", "param") and t.grad]

    @property
    def outputs(self) -> list[Tensor]:
        return self.of_kind("output")

    def hyper_defaults(self) -> dict[sp.Symbol, float]:
        return {h.symbol: h.default for h in self.hypers.values()}
