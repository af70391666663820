"""Verified before assembled: every spec a model uses passes ``gradtool check``'s oracles.

The check runs at fast settings (two shapes, the first with N = 1) on the spec and on its eval
form. A pass is cached under the kernel cache (``verified/``), keyed by the spec file's content
and the generator's fingerprint (gradtool's version and engine source), so a second run does not
repeat it. A failure is never cached.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gradtool.errors import GradtoolError

FAST_CASES = 2


class VerificationError(GradtoolError):
    """A spec whose derived backward or generated kernels disagree with an oracle."""


@dataclass
class Verified:
    spec: str
    sha256: str
    comparisons: int
    seconds: float
    cached: bool
    forms: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _key(text: bytes) -> str:
    from gradtool.codegen.cache import generator_fingerprint

    return hashlib.sha256(text + generator_fingerprint()).hexdigest()[:24]


def _diagnosis(row) -> str:
    where = f" at {row.index}" if row.index is not None else ""
    values = (f": {row.analytic:.6g} vs {row.numeric:.6g} (allowed error {row.allowed:.3g})"
              if row.analytic is not None and row.numeric is not None else "")
    note = f"; {row.note}" if row.note else ""
    return f"d{row.input} vs {row.oracle} ({row.shape}){where}{values}{note}"


def verify_spec(name: str) -> Verified:
    """Check spec ``name`` (built-in name or path) and its eval form, or reuse a cached pass.

    Raises :class:`VerificationError` with the worst failing comparison."""
    from gradtool.check.runner import CheckOptions, check_spec
    from gradtool.codegen.cache import cache_dir, write_atomic
    from gradtool.spec.loader import load_spec

    spec = load_spec(name)
    text = Path(spec.file).read_bytes()
    digest = hashlib.sha256(text).hexdigest()
    record = cache_dir() / "verified" / f"{spec.name}-{_key(text)}.json"
    if record.exists():
        try:
            data = json.loads(record.read_text())
            return Verified(**{**data, "cached": True})
        except (ValueError, TypeError):
            pass  # an unreadable record: check again
    start = time.perf_counter()
    forms = [spec] + ([spec.eval_form()] if spec.eval_form() is not None else [])
    rows = []
    for form in forms:
        rows += check_spec(form, CheckOptions(cases=FAST_CASES))
    failed = [r for r in rows if not r.passed]
    if failed:
        worst = max(failed, key=lambda r: r.max_abs / max(r.allowed, 1e-300))
        raise VerificationError(
            f"spec {spec.name} failed verification: {len(failed)} of {len(rows)} comparisons "
            f"wrong; worst {_diagnosis(worst)}", file=spec.file,
            hint=f"run `gradtool check {name}` for every row; fix the spec, or pass "
                 "--no-verify to train anyway (the run is recorded as unverified)")
    result = Verified(spec.name, digest, len(rows), round(time.perf_counter() - start, 3),
                      False, [f.name for f in forms])
    write_atomic(record, json.dumps(result.to_json()))
    return result


def verify_all(names: list[str], progress: Callable[[Verified], None] | None = None
               ) -> list[Verified]:
    out = []
    for name in names:
        out.append(verify_spec(name))
        if progress:
            progress(out[-1])
    return out
