"""Output on terminals that cannot show Unicode (``PYTHONIOENCODING=ascii``, a C locale).

gradtool prints math: σ, Σ, δ, ⊙, ∂, x̂. Where the output stream cannot encode them, each is
written as an ASCII rendering (``sigma``, ``sum``, ``delta``, ``(.)``) instead of failing with
a ``UnicodeEncodeError``; JSON is written with ``\\uXXXX`` escapes, which lose nothing.
"""

from __future__ import annotations

import codecs
import sys
import unicodedata

ASCII = {
    "σ": "sigma", "Σ": "sum", "δ": "delta", "⊙": "(.)", "∂": "d", "μ": "mu", "ε": "eps",
    "γ": "gamma", "β": "beta", "α": "alpha", "λ": "lambda", "τ": "tau", "θ": "theta",
    "π": "pi", "η": "eta", "ρ": "rho", "ω": "omega", "ϕ": "phi", "φ": "phi", "ψ": "psi",
    "·": "*", "×": "x", "−": "-", "—": "--", "–": "-", "≥": ">=", "≤": "<=", "≠": "!=",
    "≈": "~", "→": "->", "←": "<-", "↔": "<->", "⇒": "=>", "√": "sqrt", "∑": "sum",
    "∞": "inf", "ᵀ": "^T", "²": "^2", "³": "^3", "¹": "^1", "⁰": "^0", "⁻": "^-", "′": "'",
    "…": "...", "•": "*", "✓": "ok", "✗": "x", "│": "|", "─": "-", "╭": "+", "╮": "+",
    "╰": "+", "╯": "+", "┃": "|", "━": "-", "┏": "+", "┓": "+", "┗": "+", "┛": "+",
    "\u0302": "^",  # combining circumflex: x̂ → x^
}
ERRORS = "gradtool_ascii"


def _fallback(exc: UnicodeError):
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = []
    for ch in exc.object[exc.start:exc.end]:
        if ch in ASCII:
            out.append(ASCII[ch])
            continue
        plain = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
        out.append(plain or "?")
    return "".join(out), exc.end


codecs.register_error(ERRORS, _fallback)


def can_encode(stream, text: str = "σΣδ⊙∂") -> bool:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def ascii_fallback_streams() -> None:
    """Make stdout and stderr write ASCII renderings of what their encoding cannot show."""
    for stream in (sys.stdout, sys.stderr):
        if not can_encode(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ERRORS)
