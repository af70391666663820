"""The PyTorch target: ``torch.einsum``, broadcasting, and tensors of the inputs' dtype."""

from __future__ import annotations

from gradtool.codegen.base import Arr, ArrayPrinter


class TorchPrinter(ArrayPrinter):
    module = "torch"
    FUNCS = {
        "exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "tanh": "torch.tanh",
        "sinh": "torch.sinh", "cosh": "torch.cosh", "sin": "torch.sin", "cos": "torch.cos",
        "atan": "torch.atan", "Abs": "torch.abs", "sign": "torch.sign", "erf": "torch.erf",
    }
    SUM = "{x}.sum({axes})"
    MAX = "{x}.amax({axes})"

    def transpose(self, code: str, perm: tuple) -> str:
        if perm == (1, 0):
            return f"{code}.T"
        return f"{code}.permute{perm}"

    def where(self, cond: str, a: Arr, b: Arr, axes) -> str:
        # a Python-number branch would make torch.where return float32: give it the
        # condition's dtype through a tensor that is already there
        ref = next((v for v in self.names.values() if v in cond), None)
        av, bv = self.align(a, axes), self.align(b, axes)
        if ref is not None and not a.axes and not b.axes:
            av = f"{ref}.new_tensor({av})"
        return f"torch.where({cond}, {av}, {bv})"

    def _extremum(self, e, fname):
        args = [self.lower(a) for a in e.args]
        if len(args) == 2 and any(not a.axes and a.code.lstrip("-").replace(".", "").isdigit()
                                  for a in args):
            x, c = (args[0], args[1]) if args[1].code.lstrip("-").replace(".", "").isdigit() \
                else (args[1], args[0])
            bound = "min" if fname == "maximum" else "max"
            return Arr(f"torch.clamp({x.code}, {bound}={c.code})", x.axes)
        return super()._extremum(e, fname)

    def broadcast(self, code: str, shape: tuple[str, ...], arr: Arr) -> str:
        if not arr.axes:
            return f"{self.ref}.new_full(({', '.join(shape)},), {code})"
        return f"{self.paren(code, arr.prec, 4)}.expand({', '.join(shape)}).contiguous()"


IMPORTS = {
    "torch": "import torch",
    "math": "import math",
}
