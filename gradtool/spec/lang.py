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

import re
import sys
import unicodedata
from dataclasses import dataclass, field

import sympy as sp

from gradtool.errors import SpecError

INITS = ("zeros", "ones", "normal", "uniform", "kaiming_uniform", "xavier_uniform")
KINDS = ("input", "param", "state")
DOMAINS = ("real", "positive", "nonzero", "unit", "binary")


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


def _caller_line() -> int | None:
    # the first frame outside this module is the spec file's own line
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_lineno if frame is not None else None


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
    lifted: dict[str, tuple] = field(default_factory=dict)  # lifted tensor -> its statement

    # -- errors ---------------------------------------------------------------------------
    def error(self, message: str, line: int | None = None, hint: str | None = None) -> SpecError:
        return SpecError(message, file=self.file, line=line, hint=hint)

    def _new_name(self, name: str, line: int | None, what: str = "name") -> None:
        """Refuse a name that is not one Python identifier of its own: not an identifier,
        not in the form Python reads it (NFKC: ``ℕ`` is ``N``, ``ﬁ`` is ``fi``), already
        declared (sizes, tensors, hyper-parameters and indices share one namespace), or
        one that gradtool's printed gradients would read as the gradient of another name
        (tensors ``dX``, ``g_X`` beside a tensor ``X``). Names that the generated kernels
        use for themselves (G, np, torch, ctx, ...) are fine: the kernels rename around
        them, and the upstream gradient takes another name (see ``reverse.seed_name``)."""
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
            for prefix in ("d", "g_"):
                grad, base = (name, other) if name == prefix + other else (other, name) \
                    if other == prefix + name else (None, None)
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
                domain="real") -> sp.IndexedBase:
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
        dims = tuple(sp.sympify(d) for d in dims)
        base = sp.IndexedBase(name, shape=tuple(dims) if dims else None)
        if domain not in DOMAINS:
            raise self.error(f"unknown domain {domain!r} for `{name}`", line,
                             "use one of " + ", ".join(DOMAINS))
        self.tensors[name] = Tensor(name, kind, tuple(dims), base, line, grad, init, domain)
        return base if dims else sp.Symbol(name, real=True)

    def input(self, name: str, *dims: sp.Symbol, grad: bool = True,
              domain: str = "real") -> sp.IndexedBase:
        """A tensor the layer receives. ``grad=False`` for targets, masks and labels.

        ``domain`` says where valid values live, for checks that sample random inputs:
        real (default), positive (log, division), nonzero, unit (0..1, probabilities),
        binary (0/1 masks). Stated facts (``spec.fact``) are honoured too.
        """
        return self._tensor(name, "input", dims, _caller_line(), grad=grad, domain=domain)

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

    def hyper(self, name: str, default: float) -> sp.Symbol:
        """A hyper-parameter with a default value, a plain scalar in the math (eps, slope, p)."""
        line = _caller_line()
        self._new_name(name, line, "hyper-parameter")
        try:
            value = float(default)
        except (TypeError, ValueError):
            raise self.error(f"hyper-parameter `{name}` needs a number as default, "
                             f"got {default!r}", line) from None
        sym = sp.Symbol(name, real=True, positive=True) if value > 0 else sp.Symbol(name, real=True)
        self.hypers[name] = Hyper(sym, value, line)
        return sym

    # -- statements -------------------------------------------------------------------------
    def _statement(self, kind: str, name: str, lhs, rhs, line) -> sp.IndexedBase:
        lhs = tuple(lhs) if isinstance(lhs, (list, tuple)) else (lhs,)
        for i in lhs:
            if i not in self.index_dims:
                raise self.error(f"`{name}[...]` is indexed by {i!r}, which is not a declared "
                                 "index", line, "declare it with spec.indices(i=D)")
        if len(set(lhs)) != len(lhs):
            raise self.error(f"`{name}` repeats an index on the left", line,
                             "each axis of a new tensor needs its own index")
        try:
            rhs = sp.sympify(rhs)
        except (sp.SympifyError, TypeError):
            raise self.error(f"the right-hand side of `{name}` is not a SymPy expression", line,
                             "build it from tensors, indices, numbers and gradtool.lang "
                             "functions") from None
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

    def let(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """A named intermediate: ``mu = spec.let("mu", [n], Sum(X[n, d], d) / D)``."""
        return self._statement("let", name, lhs, rhs, _caller_line())

    def output(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """An output of the layer; ``[]`` as indices makes a scalar (a loss)."""
        return self._statement("output", name, lhs, rhs, _caller_line())

    def update(self, name: str, lhs, rhs) -> sp.IndexedBase:
        """The forward's new value of a state tensor (running mean/var); not differentiated."""
        return self._statement("update", name, lhs, rhs, _caller_line())

    def fact(self, lhs, rhs) -> None:
        """State a fact about the inputs that the simplifier may use,
        e.g. ``spec.fact(Sum(T[n, c], c), 1)``: each row of the targets sums to one."""
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
