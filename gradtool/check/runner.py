"""``check_spec``: a spec's derived backward against independent oracles.

Oracles, each compared per differentiable input on random float64 data of several shapes:

* finite differences of the generated forward (dependency-coloured, two step sizes; random
  signed probes when a tensor is too large to colour),
* torch.autograd through the generated PyTorch forward,
* the spec's independent reference implementation (``@spec.torch_reference``),
* the NumPy kernels against the PyTorch kernels,
* the generated forward against the spec's own evaluator.

When a generated kernel fails a gradient row, the derived closed form is evaluated directly
(by the spec evaluator, without generated code) to say where the fault lies: a formula that
agrees with the oracle while the kernel does not is a code-generation fault, not a derivation
error.
"""

from __future__ import annotations

import contextlib
import inspect
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import sympy as sp

from gradtool.check.fd import diagonal_axes, fd_with_noise, probe_fd
from gradtool.check.kernels import Kernels, shape_of, to_numpy
from gradtool.check.kinks import has_kinks, kink_distance, max_tie_gap
from gradtool.check.numeric import autograd_or_none, derived_gradients, derived_magnitudes
from gradtool.check.sampling import fact_text, fact_violations, sample_dims, sample_inputs
from gradtool.errors import GradtoolError, SpecError
from gradtool.spec.lang import Spec
from gradtool.symbolic.evaluate import run_forward
from gradtool.symbolic.reverse import Derivation, derive

KINK_MARGIN = 1e-3
FD_STEP = 1e-6
# A hand-written float64 layer is judged at several input scales with a relative tolerance
# that admits an epsilon stabiliser (log(x + 1e-8) is off by ~2e-6 at probabilities × 0.1);
# a genuine slip, such as an eps dropped from a batch-norm backward, is large at some scale
# (1e-3 and more at inputs × 0.1).
HAND_RTOL = 1e-5
HAND_SCALES = (1.0, 0.1, 10.0)
ROUNDING = 1e-9  # above this, a passing exact comparison gets a note
# An exact comparison allows tol·max|expected| + 1e-12: relative to the gradient's own size.
# Where the closed form's terms cancel to a much smaller value (an exact 0: instance norm
# over one element, dX = G/σ − G/σ), a correct float64 kernel is off by the rounding of the
# terms, which is relative to their size, not the result's: 2.9e-9 where the terms were 1.2e8
# (1/√ε = 316). A row that fails the plain allowance is judged again with this much of the
# terms' magnitude added (DerivedFormula.rounding): 16 unit roundoffs. Measured, the kernels
# are within one (instance norm at one element, float64; 3 in float32 at two), the magnitude
# being itself an upper bound. A dropped or wrong term is off by its own size, which only a
# term below 4e-15 of the others could hide.
TERM_ROUNDING = 16 * float(np.finfo(np.float64).eps)
# what a row compares, read from its ``input`` label (``Y (forward)``, ``running_mean (state
# update)``) or its oracle (``contract: ...``); see :attr:`Row.kind`
KIND_SUFFIXES = {" (forward)": "forward", " (state update)": "state_update"}


@dataclass
class Diagnosis:
    """A named finding on a row: ``code`` is stable snake_case for scripts (docs/json.md lists
    every code), ``text`` the sentence the table prints."""

    code: str
    text: str


@dataclass
class Row:
    spec: str
    input: str
    oracle: str
    shape: str
    max_abs: float
    max_rel: float
    index: list | None
    analytic: float | None
    numeric: float | None
    allowed: float
    passed: bool
    note: str = ""
    diagnoses: list = field(default_factory=list)  # Diagnosis, the decisive one first

    @property
    def kind(self) -> str:
        """``gradient``, ``second_order``, ``forward``, ``state_update``, ``contract``,
        ``settings`` (what was read from a hand-written layer) or ``skipped`` (an oracle
        that could not run)."""
        if self.oracle.startswith("contract: "):
            return "contract"
        if self.input == "settings":
            return "settings"
        for suffix, kind in KIND_SUFFIXES.items():
            if self.input.endswith(suffix):
                return kind
        if self.oracle.startswith("2nd order"):
            return "second_order"
        return "skipped" if self.input == "all" and self.passed else "gradient"

    @property
    def tensor(self) -> str | None:
        """The tensor the row is about, without the kind (``Y`` of ``Y (forward)``); ``None``
        for a row about the whole layer."""
        if self.input in ("all", "settings", "backward"):
            return None
        for suffix in KIND_SUFFIXES:
            if self.input.endswith(suffix):
                return self.input.removesuffix(suffix)
        return self.input

    def diagnose(self, code: str, text: str, first: bool = False) -> None:
        """Add a finding to the note and to :attr:`diagnoses` (``first``: it comes before the
        others, as the decisive one)."""
        found = Diagnosis(code, text)
        parts = [text, self.note] if first else [self.note, text]
        self.note = "; ".join(x for x in parts if x)
        self.diagnoses = [found, *self.diagnoses] if first else [*self.diagnoses, found]

    def to_json(self) -> dict:
        """One row as docs/json.md describes it (``schemas/check.schema.json``): the shape as
        an object of sizes, the kind and the tensor apart, each diagnosis as a code and its
        sentence; infinite or NaN numbers become ``null``."""
        sizes, scale = parse_shape_text(self.shape)
        out = {"spec": self.spec, "kind": self.kind, "tensor": self.tensor,
               "input": self.input, "oracle": self.oracle, "shape": sizes,
               "input_scale": scale}
        for k in ("max_abs", "max_rel"):
            out[k] = _finite(getattr(self, k))
        out["index"] = self.index
        for k in ("analytic", "numeric", "allowed"):
            out[k] = _finite(getattr(self, k))
        out["passed"] = self.passed
        out["diagnoses"] = [asdict(d) for d in self.diagnoses]
        out["note"] = self.note
        return out


def _finite(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


@dataclass
class CheckOptions:
    tol: float | None = None          # relative tolerance (default per oracle)
    dtype: str = "float64"            # float32: kernels in float32 against float64 oracles
    cases: int = 3                    # shapes: batch 1, then random non-square ones
    seed: int = 0
    order: int = 1                    # 2: also gradients of gradients
    probes: int = 32
    max_fd_calls: int = 4096          # above this, finite differences use random probes
    oracles: tuple = ("fd", "autograd", "reference", "backends", "forward")
    fixed: dict = field(default_factory=dict)   # sizes pinned by name
    one_hot: tuple = ()               # inputs drawn as one-hot rows (targets of -log Σ x·y)
    batch_one: bool = True            # the first shape has N = 1


# -- comparison ---------------------------------------------------------------------------

def compare(spec, name, oracle, shape, analytic, reference, allowed, note="") -> Row:
    """Row for ``analytic`` vs ``reference``; ``allowed`` is a scalar or per-element array."""
    a, r = to_numpy(analytic), to_numpy(reference)
    if a.shape != r.shape:
        row = Row(spec, name, oracle, shape, np.inf, np.inf, None, None, None, 0.0, False)
        row.diagnose("wrong_shape", f"shape {a.shape} but expected {r.shape}")
        return row
    if a.size == 0:
        return Row(spec, name, oracle, shape, 0.0, 0.0, None, None, None, 0.0, True, note)
    allowed = np.broadcast_to(np.asarray(allowed, dtype=np.float64), a.shape)
    same = a == r  # equal infinities (a running variance at N = 1) agree
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(a - r))
    bad = ~np.isfinite(a) & ~same
    ratio = np.where(bad, np.inf, err / np.maximum(allowed, 1e-300))
    worst = np.unravel_index(int(np.argmax(ratio)), a.shape)
    finite = np.abs(r[np.isfinite(r)])
    scale = float(finite.max()) if finite.size else 0.0
    errs = np.where(bad, np.inf, err)
    # all NaN (an oracle that is NaN everywhere): NaN, without nanmax's warning
    max_abs = float(np.nanmax(errs)) if not np.isnan(errs).all() else float("nan")
    passed = bool(np.all(err <= allowed) and not bad.any())
    row = Row(spec, name, oracle, shape, max_abs, max_abs / scale if scale else max_abs,
              [int(i) for i in worst], float(a[worst]), float(r[worst]),
              float(allowed[worst]), passed, note)
    if not passed:
        row.diagnose(*diagnose(a, r, err > allowed))
    return row


def classify(a: np.ndarray, r: np.ndarray, wrong: np.ndarray) -> str:
    """Name the pattern of a wrong gradient where one is recognisable (the sentence of
    :func:`diagnose`)."""
    return diagnose(a, r, wrong)[1]


def _factor(c: float) -> str:
    """``c`` with as many significant digits (4 to 10) as it takes not to read as 1 (a
    1.0001× gradient is not "1 ×")."""
    for digits in range(4, 11):
        text = f"{c:.{digits}g}"
        if float(text) != 1.0:
            return text
    return f"{c:.10g}"


def diagnose(a: np.ndarray, r: np.ndarray, wrong: np.ndarray) -> tuple[str, str]:
    """``(code, sentence)`` naming the pattern of a wrong gradient ``a`` against the expected
    ``r`` (same shape; ``wrong`` marks the elements outside tolerance)."""
    if not np.all(np.isfinite(r)):
        return "reference_not_finite", (
            "the expected values are not finite (NaN or inf) at the sampled inputs, so the "
            "forward is undefined there: if it takes the log, square root or a power of an "
            "input, declare the input's domain (spec.input(..., domain=\"positive\")); if a "
            "window can hold −∞ padding only, require sizes that prevent it "
            "(spec.require(2*P <= K))")
    if not np.all(np.isfinite(a)):
        return "non_finite", "non-finite values (NaN or inf) in the gradient"
    scale = float(np.abs(r).max()) if r.size else 0.0
    # the narrowest float type whose numbers all of the layer's values are (float16 first: a
    # float16 number is a float32 number too), with differences at its rounding level
    for name, narrow, level in (("float16", np.float16, 4e-3), ("float32", np.float32, 1e-4)):
        if scale and np.array_equal(a, a.astype(narrow).astype(np.float64)) \
                and not np.array_equal(r, r.astype(narrow).astype(np.float64)) \
                and float(np.abs(a - r).max()) <= level * scale:
            return f"{name}_precision", (f"{name} precision: every value is a {name} number "
                                         f"and the differences are at {name}'s rounding "
                                         "level (compute in float64)")
    rr = float(np.sum(r * r))
    if rr > 0 and float(np.abs(r).max()) > 1e-8 and a.size > 1:
        c = float(np.sum(a * r) / rr)
        resid = float(np.linalg.norm(a - c * r)) / max(float(np.linalg.norm(r)), 1e-300)
        if resid < 1e-6 and abs(c - 1) > 1e-6 and 1e-3 < abs(c) < 1e3:
            if abs(c + 1) < 1e-6:
                return "wrong_sign", "wrong sign: the gradient is the negative of the expected one"
            return "global_scale", (f"global scale: the gradient is {_factor(c)} × the "
                                    "expected one (sum vs mean?)")
    if a.ndim == 2 and a.shape[0] == a.shape[1] and np.allclose(a, r.T, rtol=1e-6, atol=1e-9) \
            and not np.allclose(a, r, rtol=1e-6, atol=1e-9):
        return "transposed", "transposed: the gradient equals the expected one transposed"
    for axis in range(wrong.ndim):
        if wrong.shape[axis] < 2:
            continue
        rows = np.flatnonzero(wrong.any(axis=tuple(k for k in range(wrong.ndim) if k != axis)))
        if len(rows) == 1:
            return "one_index_wrong", f"only index {int(rows[0])} along axis {axis} is wrong"
    if wrong.mean() > 0.5:
        return "wrong_almost_everywhere", "wrong almost everywhere: a dropped or extra term"
    return "some_elements_wrong", f"{int(wrong.sum())} of {wrong.size} elements wrong"


# -- helpers ----------------------------------------------------------------------------------

def shape_text(dims: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(((str(k), v) for k, v in dims.items())))


SCALED = ",inputs×"  # a hand-written layer's shape at scaled inputs: "N=2,D=3,inputs×0.1"


def parse_shape_text(shape: str) -> tuple[dict[str, int], float]:
    """``"D=3,N=2,inputs×0.1"`` (a row's shape) → ``({"D": 3, "N": 2}, 0.1)``."""
    head, sep, scale = shape.partition(SCALED.lstrip(","))
    sizes = {}
    for part in head.split(","):
        name, eq, value = part.partition("=")
        if eq:
            sizes[name] = int(value)
    return sizes, float(scale) if sep else 1.0


def call_reference(spec: Spec, tensors: dict, dims: dict):
    """Call ``spec.reference_fn`` with what it names: tensors, hyper-parameters, sizes."""
    fn = spec.reference_fn
    values = {name: h.default for name, h in spec.hypers.items()}
    values.update({str(k): int(v) for k, v in dims.items()})
    values.update(tensors)
    params = inspect.signature(fn).parameters
    missing = [p for p in params if p not in values]
    if missing:
        raise GradtoolError(f"the reference of {spec.name} takes unknown arguments "
                            f"{', '.join(missing)}",
                            hint="name its parameters after the spec's tensors, "
                                 "hyper-parameters or sizes")
    out = fn(**{p: values[p] for p in params})
    return out if isinstance(out, tuple) else (out,)


def _keeps_facts(spec, d: Derivation, inputs, dims) -> None:
    """Raise :class:`SpecError` at a stated fact that the sampled values break: gradients
    derived with a false fact are compared at no inputs at all."""
    if not spec.facts:
        return
    with np.errstate(all="ignore"):
        env = run_forward(d.program, inputs, dims)
    broken = fact_violations(d.program, env, dims)
    if broken:
        fact, err = broken[0]
        raise spec.error(f"the fact {fact_text(fact)} does not hold on the sampled "
                         f"inputs (relative error {err:.2g})", fact.line,
                         "a fact about inputs must have the form Sum(A[n, k], k) = r, which "
                         "checks sample to hold; a fact about intermediates must follow "
                         "from their definitions")


def _allows(spec: Spec, fixed: dict) -> bool:
    """Do some sizes with ``fixed`` pinned meet the spec's derived sizes and requirements?"""
    try:
        sample_dims(spec, np.random.default_rng(0), fixed=fixed)
    except SpecError:
        return False
    return True


def _sample(spec, d: Derivation, rng, fixed, scale=1.0, one_hot=()):
    """Sizes and inputs away from every kink; the note says what was done. ``scale``
    multiplies the real-valued data inputs; ``one_hot`` names inputs drawn as one-hot rows."""
    for attempt in range(50):
        dims = sample_dims(spec, rng, low=1 if fixed.get("N") == 1 else 2, high=5, fixed=fixed)
        inputs = sample_inputs(spec, dims, rng)
        for t in spec.of_kind("input"):
            if t.name in one_hot:
                inputs[t.name] = _one_hot(inputs[t.name].shape, rng)
            elif _scalable(spec, t, scale):
                inputs[t.name] = inputs[t.name] * scale
        if attempt == 0:
            _keeps_facts(spec, d, inputs, dims)
        if not has_kinks(d.program):
            return dims, inputs, ""
        with np.errstate(all="ignore"):
            env = run_forward(d.program, inputs, dims)
        gap = kink_distance(d.program, env, dims)
        if gap > KINK_MARGIN:
            again = f", resampled {attempt}×" if attempt else ""
            return dims, inputs, f"kinks avoided (distance ≥ {gap:.2g}{again})"
    return dims, inputs, f"could not sample {KINK_MARGIN:g} away from a kink"


def _scalable(spec, t, scale: float) -> bool:
    """Whether input ``t`` stays valid at ``scale`` × its values: not binary, not integer
    class labels, not bound by a stated fact (rows summing to one), probabilities only
    towards zero."""
    if scale == 1.0 or t.domain == "binary" or t.is_labels \
            or (t.domain == "unit" and scale > 1):
        return False
    bound = {b.base.label.name for f in spec.facts for b in f.lhs.atoms(sp.Indexed)}
    return t.name not in bound


def _one_hot(shape: tuple, rng) -> np.ndarray:
    """Rows that are one-hot along the last axis (class targets)."""
    out = np.zeros(shape)
    if out.size:
        hot = rng.integers(0, shape[-1], shape[:-1])
        np.put_along_axis(out, hot[..., None], 1.0, axis=-1)
    return out


def _upstream(spec, dims, rng) -> dict:
    out = {}
    for s in spec.statements:
        if s.kind == "output":
            shape = shape_of(spec, s.target, dims)
            out[s.target] = rng.standard_normal(shape) if shape else float(rng.standard_normal())
    return out


def _loss(outputs: dict, upstream: dict) -> float:
    return float(sum(np.sum(np.asarray(upstream[o]) * to_numpy(y)) for o, y in outputs.items()))


# -- code generation or derivation? ---------------------------------------------------------

class DerivedFormula:
    """The derived closed forms of one check case, evaluated directly by the spec evaluator
    (``gradtool.symbolic.evaluate``), with no generated code in between: the arbiter between a
    derivation fault and a code-generation fault. Evaluated on first use, so a check that
    passes never pays for it."""

    def __init__(self, d: Derivation, inputs: dict, dims: dict, upstream: dict,
                 options: CheckOptions):
        self.d, self.inputs, self.dims, self.upstream = d, inputs, dims, upstream
        self.options = options
        self._grads: dict | None = None
        self._magnitudes: dict | None = None
        self.error = ""

    def gradient(self, name: str) -> np.ndarray | None:
        """∂L/∂name by the formula, with the same upstream gradients the kernels were given;
        None if the formula could not be evaluated (``error`` says why)."""
        if self._grads is None:
            self._grads = self._evaluate()
        return self._grads.get(name)

    def _evaluate(self, evaluate=derived_gradients) -> dict:
        by_seed, scale = {}, 1.0
        for out, seed in self.d.seeds.items():
            if isinstance(seed, sp.Indexed):
                by_seed[seed.base.label.name] = np.asarray(self.upstream[out], dtype=np.float64)
            elif isinstance(seed, sp.Symbol):
                by_seed[seed.name] = float(self.upstream[out])
            else:  # a loss: the formula is ∂L/∂X, the kernel scales it by L's upstream gradient
                scale = float(self.upstream[out])
        try:
            with np.errstate(all="ignore"):
                grads = evaluate(self.d, self.inputs, self.dims, by_seed)
        except Exception as exc:  # noqa: BLE001 - only a diagnosis: the failed row stays failed
            self.error = f"{type(exc).__name__}: {exc}"
            return {}
        return {k: np.broadcast_to(scale * v, np.shape(self.inputs[k])) for k, v in
                grads.items()}

    def rounding(self, name: str) -> np.ndarray | None:
        """What float64 rounding may leave in ∂L/∂name where the closed form's terms cancel:
        ``TERM_ROUNDING`` times their magnitude, element by element
        (:func:`~gradtool.check.numeric.term_magnitude`); None if it cannot be evaluated."""
        if self._magnitudes is None:
            self._magnitudes = self._evaluate(derived_magnitudes)
        found = self._magnitudes.get(name)
        return None if found is None else TERM_ROUNDING * np.abs(found)

    def agrees(self, value, name: str) -> bool:
        """Whether ``value`` (a kernel's gradient of ``name``) equals the formula's, to the
        tolerance of two exact computations."""
        f = self.gradient(name)
        return f is not None and _exact_agree(value, f, self.options)


def _exact_agree(a, b, options) -> bool:
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape:
        return False
    tol = _exact_tol(options, float(np.abs(b).max()) if b.size else 1.0)
    with np.errstate(invalid="ignore"):
        return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= tol)))


def _worst(a, b) -> str:
    a, b = to_numpy(a), to_numpy(b)
    if a.shape != b.shape or not a.size:
        return f"shape {a.shape} vs {b.shape}"
    with np.errstate(invalid="ignore"):
        err = np.where(a == b, 0.0, np.abs(a - b))
    at = np.unravel_index(int(np.argmax(np.nan_to_num(err, nan=np.inf))), a.shape)
    return f"worst at {[int(i) for i in at]}: kernel {a[at]:.6g}, formula {b[at]:.6g}"


def _within_rounding(row: Row, formula: DerivedFormula | None, name: str, value, expect,
                     allowed, note: str = "", dtype: str = "float64") -> Row:
    """``row`` judged again with the rounding of the closed form's terms added to its
    allowance (``TERM_ROUNDING``, in units of ``dtype``'s roundoff), if it failed and the
    formula can say: a passing row says that the expected value is small because terms
    cancel."""
    if row.passed or formula is None:
        return row
    extra = formula.rounding(name)
    if extra is None or np.shape(extra) != np.shape(to_numpy(value)):
        return row
    extra = extra * (np.finfo(dtype).eps / np.finfo(np.float64).eps)
    again = compare(row.spec, row.input, row.oracle, row.shape, value, expect,
                    allowed + extra, note)
    if not again.passed:
        return row
    terms = float(np.abs(to_numpy(formula.rounding(name))).max()) / TERM_ROUNDING
    again.note = "; ".join(x for x in (note, "small where the formula's terms cancel: within "
                                       f"{dtype} rounding of terms up to {terms:.2g}") if x)
    return again


def _judge_kernel(row: Row, formula: DerivedFormula | None, name: str, kernel_grad, expect,
                 allowed, note: str = "", probes: list | None = None) -> Row:
    """Say whose fault a failed row of the generated NumPy kernel's gradient of ``name`` is.

    ``expect`` and ``allowed`` are the oracle's values and tolerance, of the gradient itself
    or, with ``probes``, of its projections on those directions. If the derived formula agrees
    with the oracle, the kernel is wrong: a code-generation fault, and the row says so instead
    of naming a derivation pattern (a dropped or extra term). If the formula disagrees too,
    the derivation is at fault and the row says that as well."""
    if row.passed or formula is None or \
            any(d.code == "reference_not_finite" for d in row.diagnoses):
        return row  # an oracle that is NaN says nothing about whose fault it is
    f = formula.gradient(name)
    if f is None:
        if formula.error:
            row.note = "; ".join(x for x in (row.note, "the derived formula could not be "
                                             f"evaluated directly ({formula.error})") if x)
        return row

    def seen(g):  # what the oracle saw of a gradient: itself, or its projections
        g = to_numpy(g)
        return g if probes is None else np.array([np.sum(g * v) for v in probes])

    ours, value = seen(kernel_grad), seen(f)
    by_formula = compare(row.spec, row.input, row.oracle, row.shape, value, expect, allowed)
    if by_formula.passed:  # the pattern against the oracle says nothing about the kernel
        row.note, row.diagnoses = note, []
        row.diagnose("codegen_fault", "the generated numpy kernel disagrees with the derived "
                     f"formula, which agrees with {row.oracle}: a code-generation fault, not "
                     f"a derivation error ({_worst(kernel_grad, f)})")
    elif _exact_agree(ours, value, formula.options):
        row.diagnose("derivation_fault",
                     f"the derived formula itself disagrees with {row.oracle}", first=True)
    else:
        row.diagnose("derivation_and_codegen_fault",
                     f"the derived formula disagrees with {row.oracle}, and the generated "
                     "numpy kernel differs from the formula too", first=True)
    return row


# -- the check ------------------------------------------------------------------------------

class Subject:
    """What is being checked: by default the generated NumPy kernels of the spec."""

    name = "derived"

    def __init__(self, spec: Spec):
        self.kernels = Kernels(spec, "numpy")

    def run(self, inputs, dims, upstream):
        outs, saved, state = self.kernels.forward(inputs, dims)
        grads = self.kernels.backward(upstream, saved, dims)
        return outs, grads, state


def check_spec(spec: Spec, options: CheckOptions | None = None, subject=None,
               progress: Callable[[str], None] | None = None) -> list[Row]:
    """Check ``spec`` (or ``subject``, a hand-written implementation of it) against every oracle
    that applies, and return one row per (shape, input, oracle)."""
    options = options or CheckOptions()
    subject = subject or Subject(spec)
    hand = subject.name != "derived"
    rows: list[Row] = []
    if hand:
        spec, rows = _resolve_layer(spec, subject, options)
        if options.tol is None:
            options = replace(options, tol=HAND_RTOL)
    d = derive(spec)
    ref_np = Kernels(spec, "numpy")
    # the first shape is a batch of one, unless the spec's requirements exclude N = 1
    # (spec.require(N > D + 5)): then every shape is drawn freely
    one = options.batch_one and "N" not in options.fixed and _allows(spec, {"N": 1,
                                                                           **options.fixed})
    cases = [{"N": 1} if one else {}] + [{}] * max(0, options.cases - 1)
    for case_no, fixed in enumerate(cases[:options.cases]):
        fixed = {**fixed, **options.fixed} if "N" in spec.dim_symbols or options.fixed else {}
        seed = zlib.crc32(f"{spec.name}/{options.seed}/{case_no}".encode())
        rng = np.random.default_rng(seed)
        scale = HAND_SCALES[case_no % len(HAND_SCALES)] if hand else 1.0
        dims, inputs, kink_note = _sample(spec, d, rng, fixed, scale, options.one_hot)
        scaled = scale != 1.0 and any(_scalable(spec, t, scale) and t.name not in
                                      options.one_hot for t in spec.of_kind("input"))
        shape = shape_text(dims) + (f"{SCALED}{scale:g}" if scaled else "")
        upstream = _upstream(spec, dims, rng)
        if hasattr(subject, "takes_upstream") and not subject.takes_upstream():
            # a loss layer whose backward takes no upstream gradient: it is 1
            upstream = {o: (1.0 if not np.ndim(v) else v) for o, v in upstream.items()}
        if progress:
            progress(f"{spec.name} {shape}")
        with np.errstate(all="ignore"), _at_shape(shape, subject):
            outs, grads, state = subject.run(inputs, dims, upstream)
        formula = DerivedFormula(d, inputs, dims, upstream, options) \
            if subject.name == "derived" else None
        ctx = dict(spec=spec, d=d, dims=dims, inputs=inputs, upstream=upstream, shape=shape,
                   outs=outs, grads=grads, state=state, options=options, rng=rng,
                   kink_note=kink_note, ref_np=ref_np, subject=subject, formula=formula)
        case_rows = []
        if "forward" in options.oracles:
            case_rows += _forward_rows(**ctx)
        if "fd" in options.oracles:
            case_rows += _fd_rows(**ctx)
        if "autograd" in options.oracles:
            case_rows += _autograd_rows(**ctx)
        if "reference" in options.oracles and spec.reference_fn is not None:
            case_rows += _reference_rows(**ctx)
        if "backends" in options.oracles and subject.name == "derived":
            case_rows += _backend_rows(**ctx)
        if options.dtype == "float32" and subject.name == "derived":
            case_rows += _float32_rows(**ctx)
        if options.order >= 2 and subject.name == "derived":
            case_rows += _second_order_rows(**ctx)
        if hand:
            _one_diagnosis(case_rows, spec, dims, inputs, upstream, grads, options)
            _note_small_differences(case_rows, {**outs, **grads})
        rows += case_rows
        if case_no == len(cases[:options.cases]) - 1 and "autograd" in options.oracles:
            rows += _zero_rows(**ctx)
        if case_no == 0 and hand:
            rows += _tie_rows(spec, d, dims, inputs, upstream, shape, options, subject)
        if case_no == 0 and hasattr(subject, "contract"):
            with _at_shape(shape, subject):
                contract = subject.contract(inputs, dims, upstream)
            for what, ok, why in contract:
                row = Row(spec.name, "backward", f"contract: {what}", shape, 0.0, 0.0,
                          None, None, None, 0.0, ok)
                if ok:
                    row.note = why
                else:  # "grad_out not mutated" broken: code contract_grad_out_not_mutated
                    row.diagnose("contract_" + "_".join(what.replace("-", " ").split()), why)
                rows.append(row)
    return rows


def _resolve_layer(spec: Spec, subject, options: CheckOptions):
    """The layer's own hyper-parameters (``self.eps = 1e-8``, a Function's ``eps=1e-5``
    default, ``--set``) become the spec's for every oracle, and its parameter layouts are
    read. A value outside a hyper-parameter's declared domain (``eps = -1e-5`` where the
    spec declares eps positive) raises :class:`SpecError` at the declaration. One passing
    row says what was read. Sizes are distinct (2, 3, 4, ...) so that a transposed weight is
    told from a square one."""
    if not hasattr(subject, "resolve"):
        return spec, []
    dims = {}
    for k, (name, sym) in enumerate(spec.base_dims.items()):  # derived sizes follow
        dims[sym] = max(int(options.fixed.get(name, 2 + k)), spec.min_sizes.get(name, 1))
    with contextlib.suppress(SpecError):  # only the parameters' layouts are read here
        dims = spec.sizes_from(dims)
    notes = subject.resolve(dims)
    values = getattr(subject, "hyper_values", {})
    sources = getattr(subject, "hyper_sources", {})
    for name in spec.hypers:  # the kernels are derived for the declared domain only
        if name in values:
            spec.check_hypers({name: values[name]}, sources.get(name, "your layer"))
    if any(values.get(k, h.default) != h.default for k, h in spec.hypers.items()):
        spec = replace(spec, hypers={k: replace(h, default=values.get(k, h.default))
                                     for k, h in spec.hypers.items()})
        subject.spec = spec
    if not notes:
        return spec, []
    return spec, [Row(spec.name, "settings", "read from your layer", "", 0.0, 0.0, None, None,
                      None, 0.0, True, "; ".join(notes))]


TIE_ORACLE = "derived backward at tied maxima"


def _tied(spec: Spec, inputs: dict, one_hot=()) -> dict:
    """The differentiable data inputs rounded to a coarse grid in their domain (real: whole
    numbers, zeros among them, as after a ReLU; positive: multiples of 0.5 from 0.5), so
    that the windows of a ``Max`` reduction hold repeated values. Other domains, targets
    (``grad=False``, which stated facts may bind) and labels stay as sampled."""
    out = dict(inputs)
    for t in spec.of_kind("input"):
        if t.is_labels or not t.grad or t.name in one_hot or t.name not in out:
            continue
        x = np.asarray(out[t.name], dtype=np.float64)
        if t.domain == "real":
            out[t.name] = np.round(x) + 0.0  # no −0.0
        elif t.domain == "positive":
            out[t.name] = np.maximum(np.round(2 * x) / 2, 0.5)
    return out


def _tie_rows(spec, d, dims, inputs, upstream, shape, options, subject) -> list[Row]:
    """A hand-written layer at inputs with tied maxima, against the derived backward.

    Checks sample away from kinks, so a ``Max`` reduction's windows never tie there; after a
    ReLU, all-zero windows are common. The convention is torch's (``F.max_pool2d``,
    ``torch.max(x, dim)``): the whole gradient of a window goes to its first maximum in
    row-major order; every tie getting it (k·G for k ties: no subgradient) is a bug. One row
    per gradient; none when the spec has no ``Max`` reduction or rounding made no tie."""
    tied = _tied(spec, inputs, options.one_hot)
    with np.errstate(all="ignore"):
        env = run_forward(d.program, tied, dims)
        if max_tie_gap(d.program, env, dims) != 0:
            return []
        _, expect, _ = Subject(spec).run(tied, dims, upstream)
    expect = {k: to_numpy(v) for k, v in expect.items()}
    if not all(np.all(np.isfinite(v)) for v in expect.values()):
        return []  # the rounded inputs left the forward's domain
    with np.errstate(all="ignore"), _at_shape(shape, subject):
        _, grads, _ = subject.run(tied, dims, upstream)
    rows = []
    for t in spec.grad_inputs:
        if t.name not in grads or t.name not in expect:
            continue
        r = expect[t.name]
        tol = _exact_tol(options, float(np.abs(r).max()) if r.size else 1.0)
        row = compare(spec.name, t.name, TIE_ORACLE, shape + ",tied", grads[t.name], r, tol,
                      "inputs rounded so that maxima tie")
        if not row.passed:
            rule = _tie_rule(spec, subject, tied, dims, upstream, t.name)
            if rule is not None:
                row.diagnose(*rule, first=True)
        rows.append(row)
    return rows


def _tie_rule(spec, subject, tied, dims, upstream, name) -> tuple[str, str] | None:
    """How a layer that fails at tied maxima routes the gradient there, read off both
    backwards for an upstream gradient of ones (each window's gradient then counts where it
    goes): more in total, and nowhere less than the first maximum gets, is every tie getting
    it; the same total is another tie, or a split among them. None when neither fits."""
    ones = {o: (1.0 if not np.ndim(v) else np.ones_like(v)) for o, v in upstream.items()}
    with np.errstate(all="ignore"):
        _, mine, _ = subject.run(tied, dims, ones)
        _, first, _ = Subject(spec).run(tied, dims, ones)
    a, r = to_numpy(mine.get(name, np.empty(0))), to_numpy(first[name])
    if a.shape != r.shape or not np.all(np.isfinite(a)) or not r.size:
        return None
    slack = 1e-6 * max(1.0, float(np.abs(r).max()))
    if np.all(a >= r - slack) and a.sum() > r.sum() + 0.5:
        return ("ties_to_every_maximum", "at tied maxima your layer sends the gradient to "
                "every tie; torch and the derived backward send it to the first")
    if abs(float(a.sum() - r.sum())) <= slack * r.size:
        return ("ties_to_another_maximum", "at tied maxima your layer sends the gradient to "
                "another tie than the first, or splits it among them; torch and the derived "
                "backward send it to the first (row-major)")
    return None


def _is_float32(value) -> bool:
    a = to_numpy(value)
    return bool(a.size) and np.array_equal(a, a.astype(np.float32).astype(np.float64))


def _note_small_differences(rows: list[Row], values: dict) -> None:
    """A passing exact comparison of a hand-written layer that is off by more than rounding
    says so: float32 precision when the layer's values are float32 numbers, else harmless at
    this size (an epsilon stabiliser, a constant)."""
    for row in rows:
        if row.passed and row.analytic is not None and row.max_rel > ROUNDING \
                and not row.oracle.startswith("finite differences"):
            name = row.input.removesuffix(" (forward)")
            if name in values and _is_float32(values[name]):
                small = f"float32 precision: differs by {row.max_rel:.2g} (relative)"
            else:
                small = (f"differs by {row.max_rel:.2g} (relative), more than float64 "
                         f"rounding but within the {row.allowed:.2g} allowed: harmless "
                         "(an epsilon stabiliser?)")
            row.note = "; ".join(x for x in (row.note, small) if x)


def _one_diagnosis(rows: list[Row], spec, dims, inputs, upstream, grads, options) -> None:
    """One diagnosis per input for a hand-written layer, whichever oracle saw the error: the
    pattern of its gradient against gradtool's derived one (which every oracle checks), and
    a swap when two gradients are each other's expected values (dγ and dβ exchanged)."""
    failed = [r for r in rows if not r.passed and r.input in grads and r.analytic is not None]
    if not failed:
        return
    ones = {o: (1.0 if not np.ndim(v) else np.ones_like(v)) for o, v in upstream.items()}
    with np.errstate(all="ignore"):
        _, expected, _ = Subject(spec).run(inputs, dims, upstream)
        _, at_ones, _ = Subject(spec).run(inputs, dims, ones)
    expected = {k: to_numpy(v) for k, v in expected.items()}
    diagnosis = {}
    for name in {r.input for r in failed}:
        a, r = to_numpy(grads[name]), expected[name]
        if a.shape != r.shape:
            continue
        tol = options.tol * (float(np.abs(r).max()) if r.size else 1.0) + 1e-12
        diagnosis[name] = diagnose(a, r, np.abs(a - r) > tol)
        unit = to_numpy(at_ones[name])
        if np.allclose(a, unit, rtol=1e-6, atol=1e-12) and \
                not np.allclose(a, r, rtol=1e-6, atol=1e-12):
            diagnosis[name] = ("ignores_upstream", "the gradient ignores the upstream gradient: "
                               "it is the one for an upstream gradient of ones (multiply by "
                               "grad_out)")
        for other, r2 in expected.items():
            a2 = to_numpy(grads.get(other, np.empty(0)))
            if other != name and a.shape == r2.shape and a2.shape == r.shape \
                    and np.allclose(a, r2, rtol=1e-6, atol=1e-12) \
                    and np.allclose(a2, r, rtol=1e-6, atol=1e-12) \
                    and not np.allclose(a, r, rtol=1e-6, atol=1e-12):
                first, second = sorted((name, other), key=list(expected).index)
                diagnosis[name] = ("swapped", f"swapped: the gradients of {first} and "
                                   f"{second} are each other's expected values")
    for row in failed:  # the pattern against the derived gradient replaces the oracle's
        if row.input not in diagnosis:
            continue
        if row.diagnoses:
            head, sep, _ = row.note.rpartition("; ")
            row.note, row.diagnoses = head, row.diagnoses[:-1]
        row.diagnose(*diagnosis[row.input])


@contextlib.contextmanager
def _at_shape(shape: str, subject):
    """A hand-written layer's error names the sizes it was called with (a layer that fails
    only at N = 1, because of a ``squeeze()``, is a real finding)."""
    try:
        yield
    except GradtoolError as exc:
        if subject.name != "derived" and "(called with " not in exc.message:
            exc.message += f" (called with {shape})"
        raise


def _exact_tol(options, scale) -> float:
    return (options.tol if options.tol is not None else 1e-9) * scale + 1e-12


def _forward_rows(spec, d, dims, inputs, shape, outs, state, options, subject, **_):
    rows = []
    with np.errstate(all="ignore"):
        env = run_forward(d.program, inputs, dims)
    for name, y in outs.items():
        expect = env[name]
        tol = _exact_tol(options, float(np.abs(expect).max()) if np.size(expect) else 1.0)
        row = compare(spec.name, f"{name} (forward)", "spec evaluator", shape, y, expect, tol)
        if not row.passed and subject.name != "derived":
            row.diagnose("forward_disagrees", "the forward already disagrees", first=True)
        rows.append(row)
    for name, value in state.items():
        expect = env[f"{name}:new"]
        tol = _exact_tol(options, float(np.abs(expect).max()))
        rows.append(compare(spec.name, f"{name} (state update)", "spec evaluator", shape,
                            value, expect, tol))
    return rows


def _fd_rows(spec, d, dims, inputs, upstream, shape, grads, options, rng, kink_note, ref_np,
             formula, **_):
    rows = []
    rtol = options.tol if options.tol is not None else 1e-6
    for t in spec.grad_inputs:
        x = np.asarray(inputs[t.name], dtype=np.float64)

        def outputs_at(value, name=t.name):
            with np.errstate(all="ignore"):
                outs, _, _ = ref_np.forward({**inputs, name: value}, dims)
            return {k: np.asarray(v) for k, v in outs.items()}

        diag = diagonal_axes(d, t.name)
        coupled = [k for k in range(x.ndim) if k not in diag]
        calls = 4 * int(np.prod([x.shape[k] for k in coupled])) if coupled else 4
        if calls <= options.max_fd_calls:
            numeric, noise, used = fd_with_noise(outputs_at, x, upstream, diag, FD_STEP)
            scale = float(np.abs(numeric).max()) if numeric.size else 0.0
            allowed = 10 * noise + rtol * scale + 1e-10
            note = f"{used} forward calls"
            note += f" ({len(diag)} independent ax{'is' if len(diag) == 1 else 'es'})" \
                if diag else ""
            note = "; ".join(x for x in (note, kink_note) if x)
            row = compare(spec.name, t.name, "finite differences", shape, grads[t.name],
                          numeric, allowed, note)
            row = _within_rounding(row, formula, t.name, grads[t.name], numeric, allowed, note)
            rows.append(_judge_kernel(row, formula, t.name, grads[t.name], numeric, allowed,
                                     note))
        else:
            probes: list = []
            a, n, noise = probe_fd(lambda v, name=t.name: _loss(outputs_at(v, name), upstream),
                                   x, to_numpy(grads[t.name]), options.probes, FD_STEP, rng,
                                   probes)
            allowed = 10 * noise + rtol * float(np.abs(n).max()) + 1e-10
            note = f"{options.probes} signed probes; {kink_note}".strip("; ")
            row = compare(spec.name, t.name, "finite differences (random probes)", shape,
                          a, n, allowed, note)
            rows.append(_judge_kernel(row, formula, t.name, grads[t.name], n, allowed, note,
                                     probes))
    return rows


def _torch_leaves(spec, inputs, requires):
    """float64 leaves (``requires`` with gradients); integer labels as int64 tensors, as
    F.cross_entropy and the generated kernels take them."""
    import torch

    return {k: torch.tensor(np.asarray(v, dtype=np.int64), dtype=torch.int64)
            if spec.tensors[k].is_labels else
            torch.tensor(np.asarray(v, dtype=np.float64), dtype=torch.float64,
                         requires_grad=k in requires) for k, v in inputs.items()}


def _autograd(spec, dims, inputs, upstream) -> dict[str, np.ndarray]:
    """∂L/∂x by torch.autograd through the generated PyTorch forward (primitive torch ops,
    not the derived backward), for every differentiable input."""
    import torch

    kernels = Kernels(spec, "torch")
    wrt = [t.name for t in spec.grad_inputs]
    leaves = _torch_leaves(spec, inputs, set(wrt))
    args = [leaves[t.name] for t in kernels.inputs]
    result = kernels.module.forward(*args, **kernels._keywords(kernels.module.forward, dims))
    outs = result[0] if len(kernels.outputs) > 1 else (result[0],)
    loss = sum((torch.as_tensor(upstream[o], dtype=torch.float64) * y).sum()
               for o, y in zip(kernels.outputs, outs, strict=True))
    auto = autograd_or_none(loss, [leaves[k] for k in wrt])
    return {name: np.zeros(np.shape(inputs[name])) if g is None else to_numpy(g)
            for name, g in zip(wrt, auto, strict=True)}


def _autograd_rows(spec, dims, inputs, upstream, shape, grads, options, formula, **_):
    rows = []
    for name, expect in _autograd(spec, dims, inputs, upstream).items():
        tol = _exact_tol(options, float(np.abs(expect).max()) if expect.size else 1.0)
        row = compare(spec.name, name, "torch.autograd", shape, grads[name], expect, tol)
        row = _within_rounding(row, formula, name, grads[name], expect, tol)
        rows.append(_judge_kernel(row, formula, name, grads[name], expect, tol))
    return rows


def zero_probe(spec: Spec, inputs: dict) -> dict[str, np.ndarray]:
    """``inputs`` with every other entry (in row-major order: 0, 2, 4, …) of each real-valued
    input and parameter set to exactly 0; the others as they were. Only tensors whose domain
    holds 0 (``real``) are probed: random draws are never exactly 0, so a backward that is
    0/0 there (p·Y/X for the derivative of X^p) passes every other row."""
    out = {}
    for t in spec.of_kind("input", "param"):
        if t.domain != "real" or t.is_labels or not np.size(inputs[t.name]):
            continue
        x = np.array(inputs[t.name], dtype=np.float64)
        x.reshape(-1)[::2] = 0.0
        out[t.name] = x
    return out


def _zero_rows(spec, d, dims, inputs, upstream, shape, options, subject, **_):
    """The kernels' (or a hand-written layer's) gradients at exact zeros of the inputs
    (:func:`zero_probe`) against
    torch.autograd through the generated forward, compared where autograd is finite (where
    it is not, the derivative does not exist: √X at 0). Zeros that put a kink at a switch
    (ReLU at 0, a tie of a Max) are not probed: both sides of a kink are valid there. All
    probed tensors are zeroed at once; if that meets a kink, each one alone."""
    zeroed = zero_probe(spec, inputs)
    if not zeroed or not spec.grad_inputs:
        return []
    tries = [zeroed] if len(zeroed) == 1 else [zeroed] + [{k: v} for k, v in zeroed.items()]
    rows, done = [], set()
    for probe in tries:
        if set(probe) <= done:
            continue
        probed = {**inputs, **probe}
        if has_kinks(d.program):
            with np.errstate(all="ignore"):
                env = run_forward(d.program, probed, dims)
            if not kink_distance(d.program, env, dims) > KINK_MARGIN:
                continue
        done |= set(probe)
        hand = subject.name != "derived"
        with np.errstate(all="ignore"), _at_shape(f"{shape}, every other entry 0", subject):
            _, grads, _ = subject.run(probed, dims, upstream)
            expected = _autograd(spec, dims, probed, upstream)
        # gradtool's own kernel's row also says whose fault a failure is (the derived formula
        # or the code generator); a hand-written layer's gets one diagnosis per input below
        formula = None if hand else DerivedFormula(d, probed, dims, upstream, options)
        first = len(rows)
        oracle = f"torch.autograd at zeros of {', '.join(sorted(probe))}"
        for name, expect in expected.items():
            defined = np.isfinite(expect)
            mine = np.where(defined, to_numpy(grads[name]), 0.0)
            expect = np.where(defined, expect, 0.0)
            tol = _exact_tol(options, float(np.abs(expect).max()) if expect.size else 1.0)
            note = "every other entry 0" + ("" if defined.all() else
                                            f"; {int((~defined).sum())} entries where autograd "
                                            "is not finite left out")
            row = compare(spec.name, name, oracle, shape, mine, expect, tol, note)
            row = _within_rounding(row, formula, name, mine, expect, tol, note)
            rows.append(_judge_kernel(row, formula, name, mine, expect, tol, note))
        if hand:
            _one_diagnosis(rows[first:], spec, dims, probed, upstream, grads, options)
        if len(done) == len(zeroed):
            break
    return rows


def _reference_error(spec, exc: Exception, shape) -> GradtoolError:
    """The error for a reference that failed at ``shape`` other than by refusing its sizes
    (a ``ValueError``): a skipped row would hide the fault, so the check stops here."""
    from gradtool.usercode import line_in

    return spec.error(f"the reference raised {type(exc).__name__}: {exc} (at {shape})",
                      line_in(exc.__traceback__, str(spec.file)) if spec.file else None,
                      "fix the reference function; it must accept every size the spec "
                      "allows (raise ValueError for sizes the op itself refuses)")


def _reference_rows(spec, dims, inputs, upstream, shape, outs, grads, state, options, formula,
                    **_):
    import torch

    wrt = [t.name for t in spec.grad_inputs]
    leaves = _torch_leaves(spec, inputs, set(wrt))
    try:
        ref_out = call_reference(spec, leaves, dims)
    except GradtoolError:
        raise
    except ValueError as exc:  # the op refuses these sizes: F.batch_norm a batch of one
        return [Row(spec.name, "all", "reference", shape, 0.0, 0.0, None, None, None, 0.0,
                    True, f"skipped: the reference raised {type(exc).__name__}: {exc}")]
    except Exception as exc:  # a fault in the reference (or in what gradtool passed it)
        raise _reference_error(spec, exc, shape) from exc
    names = [s.target for s in spec.statements if s.kind == "output"]
    rows = []
    loss = 0
    for name, y in zip(names, ref_out, strict=False):
        tol = _exact_tol(options, float(torch.abs(y.detach()).max()) if y.numel() else 1.0)
        rows.append(compare(spec.name, f"{name} (forward)", "reference", shape, outs[name],
                            y, tol))
        loss = loss + (torch.as_tensor(upstream[name], dtype=torch.float64) * y).sum()
    for name, value in state.items():
        expect = leaves[name]
        tol = _exact_tol(options, float(torch.abs(expect).max()))
        rows.append(compare(spec.name, f"{name} (state update)", "reference", shape, value,
                            expect, tol))
    auto = autograd_or_none(loss, [leaves[k] for k in wrt])
    for name, g in zip(wrt, auto, strict=True):
        expect = np.zeros(np.shape(inputs[name])) if g is None else to_numpy(g)
        tol = _exact_tol(options, float(np.abs(expect).max()) if expect.size else 1.0)
        row = compare(spec.name, name, "reference", shape, grads[name], expect, tol)
        row = _within_rounding(row, formula, name, grads[name], expect, tol)
        rows.append(_judge_kernel(row, formula, name, grads[name], expect, tol))
    return rows


def _backend_rows(spec, dims, inputs, upstream, shape, outs, grads, options, formula, **_):
    kernels = Kernels(spec, "torch")
    t_outs, saved, _ = kernels.forward(inputs, dims)
    t_grads = kernels.backward(upstream, saved, dims)
    rows = []
    for name in outs:
        tol = _exact_tol(options, float(np.abs(to_numpy(outs[name])).max()))
        rows.append(compare(spec.name, f"{name} (forward)", "numpy vs torch kernels", shape,
                            t_outs[name], outs[name], tol))
    for name in grads:
        ref = to_numpy(grads[name])
        tol = _exact_tol(options, float(np.abs(ref).max()) if ref.size else 1.0)
        row = compare(spec.name, name, "numpy vs torch kernels", shape, t_grads[name], ref, tol)
        row = _within_rounding(row, formula, name, t_grads[name], ref, tol)
        rows.append(_judge_backends(row, formula, name, grads[name], t_grads[name]))
    return rows


def _judge_backends(row: Row, formula: DerivedFormula | None, name: str, numpy_grad,
                    torch_grad) -> Row:
    """The NumPy and PyTorch kernels disagree: name the one that differs from the derived
    formula evaluated directly."""
    if row.passed or formula is None:
        return row
    if formula.gradient(name) is None:  # says why in the note
        return _judge_kernel(row, formula, name, torch_grad, numpy_grad, 0.0)
    wrong = [k for k, g in (("numpy", numpy_grad), ("torch", torch_grad))
             if not formula.agrees(g, name)]
    if len(wrong) == 1:
        right = "torch" if wrong[0] == "numpy" else "numpy"
        bad = numpy_grad if wrong[0] == "numpy" else torch_grad
        row.note, row.diagnoses = "", []
        row.diagnose("codegen_fault",
                     f"the generated {wrong[0]} kernel disagrees with the derived formula (the "
                     f"{right} kernel agrees with it): a code-generation fault, not a "
                     f"derivation error ({_worst(bad, formula.gradient(name))})")
    elif wrong:
        row.diagnose("codegen_fault", "both generated kernels disagree with the derived "
                     "formula: a code-generation fault", first=True)
    return row


def _float32_rows(spec, dims, inputs, upstream, shape, grads, options, subject, formula,
                  **_):
    kernels = Kernels(spec, "torch")
    outs, saved, _ = kernels.forward(inputs, dims, dtype="float32")
    g32 = kernels.backward(upstream, saved, dims, dtype="float32")
    rtol = options.tol if options.tol is not None else 1e-4
    rows = []
    for name in grads:
        ref = to_numpy(grads[name])
        tol = rtol * (float(np.abs(ref).max()) if ref.size else 1.0) + 1e-6
        row = compare(spec.name, name, "float32 kernels vs float64", shape, g32[name], ref,
                      tol)
        rows.append(_within_rounding(row, formula, name, g32[name], ref, tol,
                                     dtype="float32"))
    return rows


def _second_order_rows(spec, dims, inputs, upstream, shape, options, rng, **_):
    """d/dx ⟨w, backward(G, forward(x))⟩ by autograd through the generated backward, against
    finite differences of the generated NumPy backward along random probes."""
    import torch

    tk, nk = Kernels(spec, "torch"), Kernels(spec, "numpy")
    wrt = [t.name for t in spec.grad_inputs]
    weights = {k: rng.standard_normal(np.shape(inputs[k])) for k in wrt}

    def inner_np(values):
        with np.errstate(all="ignore"):
            _, saved, _ = nk.forward(values, dims)
            g = nk.backward(upstream, saved, dims)
        return float(sum(np.sum(weights[k] * to_numpy(g[k])) for k in wrt))

    leaves = _torch_leaves(spec, inputs, set(wrt))
    args = [leaves[t.name] for t in tk.inputs]
    result = tk.module.forward(*args, **tk._keywords(tk.module.forward, dims))
    seeds = [torch.as_tensor(upstream[o], dtype=torch.float64) if np.ndim(upstream[o])
             else float(upstream[o]) for o in tk.outputs]
    g = tk.module.backward(*seeds, *result[1], **tk._keywords(tk.module.backward, dims))
    inner = sum((torch.as_tensor(weights[k]) * gk).sum() for k, gk in zip(wrt, g, strict=True))
    # the backward does not depend on the inputs (ReLU, sums), or there are none (inner is 0)
    if not getattr(inner, "requires_grad", False):
        second = [None] * len(wrt)
    else:
        try:
            second = torch.autograd.grad(inner, [leaves[k] for k in wrt], allow_unused=True)
        except RuntimeError as exc:
            row = Row(spec.name, "all", "2nd order", shape, np.nan, np.nan, None, None, None,
                      0.0, False)
            row.diagnose("backward_not_differentiable",
                         f"the generated backward is not differentiable: {exc}")
            return [row]
    rows = []
    rtol = options.tol if options.tol is not None else 1e-6
    for name, s in zip(wrt, second, strict=True):
        grad2 = np.zeros(np.shape(inputs[name])) if s is None else to_numpy(s)
        x = np.asarray(inputs[name], dtype=np.float64)
        a, n, noise = probe_fd(lambda v, name=name: inner_np({**inputs, name: v}), x, grad2,
                               8, 1e-5, rng)
        allowed = 10 * noise + rtol * float(np.abs(n).max()) + 1e-8
        rows.append(compare(spec.name, name, "2nd order (probes)", shape, a, n, allowed))
    return rows


def summary(rows: list[Row]) -> dict:
    failed = [r for r in rows if not r.passed]
    return {"rows": len(rows), "failed": len(failed),
            "specs": sorted({r.spec for r in rows}),
            "failed_specs": sorted({r.spec for r in failed})}


__all__ = ["CheckOptions", "Diagnosis", "Row", "check_spec", "compare", "classify", "diagnose",
           "parse_shape_text", "summary"]
