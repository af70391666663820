"""``check_spec``: a spec's derived backward against independent oracles.

Oracles, each compared per differentiable input on random float64 data of several shapes:

* finite differences of the generated forward (dependency-coloured, two step sizes; random
  signed probes when a tensor is too large to colour),
* torch.autograd through the generated PyTorch forward,
* the spec's independent reference implementation (``@spec.torch_reference``),
* the NumPy kernels against the PyTorch kernels,
* the generated forward against the spec's own evaluator.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from gradtool.check.fd import diagonal_axes, fd_with_noise, probe_fd
from gradtool.check.kernels import Kernels, shape_of, to_numpy
from gradtool.check.kinks import has_kinks, kink_distance
from gradtool.check.numeric import autograd_or_none
from gradtool.check.sampling import fact_text, fact_violations, sample_dims, sample_inputs
from gradtool.errors import GradtoolError
from gradtool.spec.lang import Spec
from gradtool.symbolic.evaluate import run_forward
from gradtool.symbolic.reverse import Derivation, derive

KINK_MARGIN = 1e-3
FD_STEP = 1e-6


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

    def to_json(self) -> dict:
        out = asdict(self)
        for k in ("max_abs", "max_rel", "analytic", "numeric", "allowed"):
            v = out[k]
            out[k] = None if v is None or not np.isfinite(v) else float(v)
        return out


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


# -- comparison ---------------------------------------------------------------------------

def compare(spec, name, oracle, shape, analytic, reference, allowed, note="") -> Row:
    """Row for ``analytic`` vs ``reference``; ``allowed`` is a scalar or per-element array."""
    a, r = to_numpy(analytic), to_numpy(reference)
    if a.shape != r.shape:
        return Row(spec, name, oracle, shape, np.inf, np.inf, None, None, None, 0.0, False,
                   f"shape {a.shape} but expected {r.shape}")
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
    max_abs = float(np.nanmax(np.where(bad, np.inf, err)))
    passed = bool(np.all(err <= allowed) and not bad.any())
    if not passed:
        note = "; ".join(x for x in (note, classify(a, r, err > allowed)) if x)
    return Row(spec, name, oracle, shape, max_abs, max_abs / scale if scale else max_abs,
               [int(i) for i in worst], float(a[worst]), float(r[worst]),
               float(allowed[worst]), passed, note)


def classify(a: np.ndarray, r: np.ndarray, wrong: np.ndarray) -> str:
    """Name the pattern of a wrong gradient where one is recognisable."""
    if not np.all(np.isfinite(a)):
        return "non-finite values (NaN or inf) in the gradient"
    rr = float(np.sum(r * r))
    if rr > 0 and float(np.abs(r).max()) > 1e-8 and a.size > 1:
        c = float(np.sum(a * r) / rr)
        resid = float(np.linalg.norm(a - c * r)) / max(float(np.linalg.norm(r)), 1e-300)
        if resid < 1e-6 and abs(c - 1) > 1e-6 and 1e-3 < abs(c) < 1e3:
            if abs(c + 1) < 1e-6:
                return "wrong sign: the gradient is the negative of the expected one"
            return f"global scale: the gradient is {c:.4g} × the expected one (sum vs mean?)"
    if a.ndim == 2 and a.shape[0] == a.shape[1] and np.allclose(a, r.T, rtol=1e-6, atol=1e-9) \
            and not np.allclose(a, r, rtol=1e-6, atol=1e-9):
        return "transposed: the gradient equals the expected one transposed"
    for axis in range(wrong.ndim):
        if wrong.shape[axis] < 2:
            continue
        rows = np.flatnonzero(wrong.any(axis=tuple(k for k in range(wrong.ndim) if k != axis)))
        if len(rows) == 1:
            return f"only index {int(rows[0])} along axis {axis} is wrong"
    if wrong.mean() > 0.5:
        return "wrong almost everywhere: a dropped or extra term"
    return f"{int(wrong.sum())} of {wrong.size} elements wrong"


# -- helpers ----------------------------------------------------------------------------------

def shape_text(dims: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(((str(k), v) for k, v in dims.items())))


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


def _sample(spec, d: Derivation, rng, fixed):
    """Sizes and inputs away from every kink; the note says what was done."""
    for attempt in range(50):
        dims = sample_dims(spec, rng, low=1 if fixed.get("N") == 1 else 2, high=5, fixed=fixed)
        inputs = sample_inputs(spec, dims, rng)
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


def _upstream(spec, dims, rng) -> dict:
    out = {}
    for s in spec.statements:
        if s.kind == "output":
            shape = shape_of(spec, s.target, dims)
            out[s.target] = rng.standard_normal(shape) if shape else float(rng.standard_normal())
    return out


def _loss(outputs: dict, upstream: dict) -> float:
    return float(sum(np.sum(np.asarray(upstream[o]) * to_numpy(y)) for o, y in outputs.items()))


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
    d = derive(spec)
    subject = subject or Subject(spec)
    ref_np = Kernels(spec, "numpy")
    rows: list[Row] = []
    cases = [{"N": 1}] + [{}] * max(0, options.cases - 1)
    for case_no, fixed in enumerate(cases[:options.cases]):
        fixed = {**fixed, **options.fixed} if "N" in spec.dim_symbols or options.fixed else {}
        seed = zlib.crc32(f"{spec.name}/{options.seed}/{case_no}".encode())
        rng = np.random.default_rng(seed)
        dims, inputs, kink_note = _sample(spec, d, rng, fixed)
        shape = shape_text(dims)
        upstream = _upstream(spec, dims, rng)
        if hasattr(subject, "takes_upstream") and not subject.takes_upstream():
            # a loss layer whose backward() takes no argument: its upstream gradient is 1
            upstream = {o: (1.0 if not np.ndim(v) else v) for o, v in upstream.items()}
        if progress:
            progress(f"{spec.name} {shape}")
        with np.errstate(all="ignore"):
            outs, grads, state = subject.run(inputs, dims, upstream)
        ctx = dict(spec=spec, d=d, dims=dims, inputs=inputs, upstream=upstream, shape=shape,
                   outs=outs, grads=grads, state=state, options=options, rng=rng,
                   kink_note=kink_note, ref_np=ref_np, subject=subject)
        if "forward" in options.oracles:
            rows += _forward_rows(**ctx)
        if "fd" in options.oracles:
            rows += _fd_rows(**ctx)
        if "autograd" in options.oracles:
            rows += _autograd_rows(**ctx)
        if "reference" in options.oracles and spec.reference_fn is not None:
            rows += _reference_rows(**ctx)
        if "backends" in options.oracles and subject.name == "derived":
            rows += _backend_rows(**ctx)
        if options.dtype == "float32" and subject.name == "derived":
            rows += _float32_rows(**ctx)
        if options.order >= 2 and subject.name == "derived":
            rows += _second_order_rows(**ctx)
        if case_no == 0 and hasattr(subject, "contract"):
            for what, ok, why in subject.contract(inputs, dims, upstream):
                rows.append(Row(spec.name, "backward", f"contract: {what}", shape, 0.0, 0.0,
                                None, None, None, 0.0, ok, why))
    return rows


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
            row.note = "; ".join(x for x in ("the forward already disagrees", row.note) if x)
        rows.append(row)
    for name, value in state.items():
        expect = env[f"{name}:new"]
        tol = _exact_tol(options, float(np.abs(expect).max()))
        rows.append(compare(spec.name, f"{name} (state update)", "spec evaluator", shape,
                            value, expect, tol))
    return rows


def _fd_rows(spec, d, dims, inputs, upstream, shape, grads, options, rng, kink_note, ref_np,
             **_):
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
            rows.append(compare(spec.name, t.name, "finite differences", shape,
                                grads[t.name], numeric, allowed,
                                "; ".join(x for x in (note, kink_note) if x)))
        else:
            a, n, noise = probe_fd(lambda v, name=t.name: _loss(outputs_at(v, name), upstream),
                                   x, to_numpy(grads[t.name]), options.probes, FD_STEP, rng)
            allowed = 10 * noise + rtol * float(np.abs(n).max()) + 1e-10
            row = compare(spec.name, t.name, "finite differences (random probes)", shape,
                          a, n, allowed, f"{options.probes} signed probes; {kink_note}".strip(
                              "; "))
            rows.append(row)
    return rows


def _torch_leaves(spec, inputs, requires):
    """float64 leaves (``requires`` with gradients); integer labels as int64 tensors, as
    F.cross_entropy and the generated kernels take them."""
    import torch

    return {k: torch.tensor(np.asarray(v, dtype=np.int64), dtype=torch.int64)
            if spec.tensors[k].is_labels else
            torch.tensor(np.asarray(v, dtype=np.float64), dtype=torch.float64,
                         requires_grad=k in requires) for k, v in inputs.items()}


def _autograd_rows(spec, dims, inputs, upstream, shape, grads, options, **_):
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
    rows = []
    for name, g in zip(wrt, auto, strict=True):
        expect = np.zeros(np.shape(inputs[name])) if g is None else to_numpy(g)
        tol = _exact_tol(options, float(np.abs(expect).max()) if expect.size else 1.0)
        rows.append(compare(spec.name, name, "torch.autograd", shape, grads[name], expect, tol))
    return rows


def _reference_rows(spec, dims, inputs, upstream, shape, outs, grads, state, options, **_):
    import torch

    wrt = [t.name for t in spec.grad_inputs]
    leaves = _torch_leaves(spec, inputs, set(wrt))
    try:
        ref_out = call_reference(spec, leaves, dims)
    except GradtoolError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. F.batch_norm refuses a batch of one
        return [Row(spec.name, "all", "reference", shape, 0.0, 0.0, None, None, None, 0.0,
                    True, f"skipped: the reference raised {type(exc).__name__}: {exc}")]
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
        rows.append(compare(spec.name, name, "reference", shape, grads[name], expect, tol))
    return rows


def _backend_rows(spec, dims, inputs, upstream, shape, outs, grads, options, **_):
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
        rows.append(compare(spec.name, name, "numpy vs torch kernels", shape, t_grads[name],
                            ref, tol))
    return rows


def _float32_rows(spec, dims, inputs, upstream, shape, grads, options, subject, **_):
    kernels = Kernels(spec, "torch")
    outs, saved, _ = kernels.forward(inputs, dims, dtype="float32")
    g32 = kernels.backward(upstream, saved, dims, dtype="float32")
    rtol = options.tol if options.tol is not None else 1e-4
    rows = []
    for name in grads:
        ref = to_numpy(grads[name])
        tol = rtol * (float(np.abs(ref).max()) if ref.size else 1.0) + 1e-6
        rows.append(compare(spec.name, name, "float32 kernels vs float64", shape, g32[name],
                            ref, tol))
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
    if not inner.requires_grad:  # the backward does not depend on the inputs (ReLU, sums)
        second = [None] * len(wrt)
    else:
        try:
            second = torch.autograd.grad(inner, [leaves[k] for k in wrt], allow_unused=True)
        except RuntimeError as exc:
            return [Row(spec.name, "all", "2nd order", shape, np.nan, np.nan, None, None, None,
                        0.0, False, f"the generated backward is not differentiable: {exc}")]
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


__all__ = ["CheckOptions", "Row", "check_spec", "compare", "classify", "summary"]
