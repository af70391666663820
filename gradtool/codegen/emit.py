"""Assemble a readable module from a derivation: ``forward``, ``backward`` and a layer class.

Generated NumPy module::

    def forward(X, gamma, beta, *, eps=1e-05):   # -> Y, saved
    def backward(G, gamma, xhat, rstd, *, eps=1e-05):   # -> dX, dgamma, dbeta
    class LayerNorm:          # forward(x) / backward(grad_out), params and grads dicts

Generated PyTorch module: the same two functions over tensors, ``LayerNormFunction`` (a
``torch.autograd.Function`` whose backward is the closed form and which saves only what it uses)
and ``LayerNorm`` (an ``nn.Module`` that owns the parameters and their initialisation). The
class is named as the spec states (``class_name``), constructed as ``LayerNorm(512)`` or by
name, and every line passes the project's ruff rules (100 characters, no unused names).
"""

from __future__ import annotations

import json
import keyword
import re
import textwrap

import sympy as sp

from gradtool import __version__
from gradtool.codegen.base import Arr, CodegenError, kernel_names
from gradtool.report import _forward, _gradients
from gradtool.spec.lang import MaxOver, Spec
from gradtool.symbolic.ir import access_indices, access_name, accesses, rename
from gradtool.symbolic.printing import present
from gradtool.symbolic.reverse import Derivation, derive

TARGETS = ("numpy", "torch")


def class_name(spec: Spec | str) -> str:
    """The generated layer class's name: the one the spec states (``class_name="LayerNorm"``),
    else its name in CamelCase (``my_layer`` -> ``MyLayer``; a bare name string likewise)."""
    if isinstance(spec, Spec) and spec.class_name:
        return spec.class_name
    name = spec.name if isinstance(spec, Spec) else spec
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_")) or "Layer"
    return camel + "Layer" if keyword.iskeyword(camel) else camel  # a spec named none


def _target_attributes(target: str) -> set[str]:
    """Attributes of the generated layer class that a declared name must not replace."""
    if target == "torch":
        from gradtool.codegen.torch_target import MODULE_ATTRIBUTES

        return set(MODULE_ATTRIBUTES)
    return set()


def _printer(target: str, names, temps=None):
    if target == "numpy":
        from gradtool.codegen.numpy_target import IMPORTS, NumpyPrinter

        return NumpyPrinter(names, temps), IMPORTS
    if target == "torch":
        from gradtool.codegen.torch_target import IMPORTS, TorchPrinter

        return TorchPrinter(names, temps), IMPORTS
    raise CodegenError(f"unknown target {target!r}", hint="use numpy or torch")


class Module:
    """Everything the emitter needs to know about one derivation."""

    def __init__(self, d: Derivation, target: str, folded: frozenset | None = None):
        self.d, self.spec, self.target = d, d.spec, target
        # padded copies that the target's ops pad themselves (torch: ``padding=P``): None
        # offers every padded copy to the printers (a first pass, to see which they fold);
        # a set folds those only, and drops their copies from the kernels
        self.offered = folded
        spec = d.spec
        cname = class_name(spec)
        reserved = {cname, cname + "Function"} | _target_attributes(target)
        self.seed_names = {out: d.upstream_names[out] for out in d.seeds}
        declared = list(spec.tensors) + list(spec.hypers) + list(spec.dim_symbols)
        # seeds come last: derive named them clear of every declared name
        self.names = kernel_names(declared + [s for s in self.seed_names.values()
                                              if s not in declared], reserved)
        self.inputs = [t for t in spec.tensors.values() if t.kind in ("input", "param", "state")]
        self.grads = [t for t in spec.grad_inputs]
        self.outputs = [a for a in d.program.assigns if a.kind == "output"]
        self.updates = [a for a in d.program.assigns if a.kind == "update"]
        self.imports: set[str] = set()
        self.helpers: set[str] = set()
        # kernel variables gradtool makes: the gradients, new state, shifts of exponentials
        self.grad_names = {t.name: self._fresh_name(f"d{self.names[t.name]}", claim=True)
                           for t in self.grads}
        self.new_names = {a.target: self._fresh_name(f"{self.names[a.target]}_new",
                                                     claim=True) for a in self.updates}
        self.need_names = {t.name: self._fresh_name(f"need_{self.names[t.name]}", claim=True)
                           for t in self.grads}
        self.lse = self.shifted_sums()

    # -- sizes ----------------------------------------------------------------------------
    def size_lines(self, dims: set, available: list[tuple[str, tuple]]) -> tuple[list, list]:
        """``N, D = X.shape`` lines for ``dims`` read off available tensors, then a line for
        each derived size no tensor has (``OH = (H + 2 * P - K) // S + 1``); the rest must be
        passed in (returned as the second list)."""
        dims = {x for dim in dims for x in sp.sympify(dim).free_symbols}  # (T-1)·S+K: T, S, K
        lines, found = [], set()
        self._read_sizes(dims, available, lines, found)
        computed = []
        for name, formula in self.spec.derived.items():
            sym = self.spec.dim_symbols[name]
            if sym in dims and sym not in found:
                need = formula.free_symbols
                self._read_sizes(need - found, available, lines, found)
                dims |= need
                computed.append(f"{self.names[name]} = {_formula_code(formula, self.names)}")
                found.add(sym)
        return lines + computed, sorted(dims - found, key=str)

    def _read_sizes(self, dims, available, lines: list, found: set) -> None:
        for var, tdims in available:
            got = [(k, dim) for k, dim in enumerate(tdims)
                   if dim in dims and dim not in found and isinstance(dim, sp.Symbol)
                   and dim not in tdims[:k]]  # W[O, C, K, K]: K once
            if not got:
                continue
            if len(got) == len(tdims) > 1:
                lines.append(f"{', '.join(self.names[str(x)] for _, x in got)} = {var}.shape")
            else:
                for k, dim in got:
                    lines.append(f"{self.names[str(dim)]} = {var}.shape[{k}]")
            found |= {dim for _, dim in got}

    def _dims_in(self, exprs) -> set:
        dims = set(self.spec.dim_symbols.values())
        out = set()
        for e in exprs:
            out |= e.free_symbols & dims
            for node in sp.preorder_traversal(e):
                if isinstance(node, sp.Sum):
                    for _, _lo, hi in node.limits:
                        out |= (sp.sympify(hi).free_symbols & dims)
                # an affine index or a scatter builds arrays of its indices' values
                affine = [i for i in node.indices if not i.is_Symbol] \
                    if isinstance(node, sp.Indexed) else \
                    list(node.args) if isinstance(node, sp.KroneckerDelta) else []
                for i in affine:
                    for s in i.free_symbols:
                        if s in self.d.program.ranges:
                            out |= sp.sympify(self.d.program.ranges[s]).free_symbols & dims
        return out

    def _hypers_in(self, exprs) -> list[str]:
        syms = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
        return [n for n, h in self.spec.hypers.items() if h.symbol in syms]

    # -- forward ----------------------------------------------------------------------------
    def forward(self) -> list[str]:
        d, spec = self.d, self.spec
        args = [self.names[t.name] for t in self.inputs]
        rhs = [a.rhs(d.program) for a in d.program.assigns]
        hypers = self._hypers_in(rhs)
        kw = [f"{self.names[h]}={spec.hypers[h].default!r}" for h in hypers]
        dims = self._dims_in(rhs) | {x for a in d.program.assigns for x in
                                     (d.program.ranges[i] for i in a.lhs)}
        avail = [(self.names[t.name], t.dims) for t in self.inputs]
        size_lines, missing = self.size_lines(dims, avail)
        self.forward_missing = [str(m) for m in missing]
        kw = [self.names[str(m)] for m in missing] + kw
        sig = ", ".join(args + (["*"] + kw if kw else []))
        body = list(size_lines)
        printer, imports = _printer(self.target, self.names)
        floats = [self.names[t.name] for t in self.inputs if not t.is_labels]
        printer.ref = (floats or args or [None])[0]  # dtype and device (labels are integers)
        printer.ranges = dict(d.program.ranges)
        printer.extents, printer.derived = self.extents(), self.derived_sizes()
        printer.taken = self._taken()
        printer.keep_owned = True
        printer.fold = self.folds()
        printer.labels = self.label_names()
        shifts = self.stable_exponentials()
        soft = self.softmaxes(shifts, printer)
        printer.taken = self._taken()
        inlined = self.inlined_sums(shifts)
        printer.scalar_tensors = self._scalar_tensors(shifts)
        picked = {a.target: self._picked_indicators(a.rhs(d.program), printer)
                  for a in d.program.assigns}
        unread = self._unread_onehots(picked)
        by_target = {a.target: a for a in d.program.assigns if a.kind != "update"}
        # statements that read a softmax read its probabilities or their logs
        gone = {x for sm in soft.values() for x in (sm.e, sm.z, sm.alias)}
        through = {a.target: self._softmax_reads(self._inline(picked[a.target], inlined),
                                                  soft, by_target)
                   for a in d.program.assigns if a.target not in set(inlined) | gone}
        read = {str(x.base.label) for e in through.values() for x in e.atoms(sp.Indexed)}
        kept = set(self.saved()) | {o.target for o in self.outputs}
        read |= {str(sm.prob.label) for sm in soft.values() if sm.alias in kept}
        for a in d.program.assigns:
            if a.target in inlined or a.target in unread or a.target in gone - set(soft):
                continue
            if a.target in soft:  # e = exp(f): f's softmax along k, and/or its log
                sm = soft[a.target]
                shape = tuple(printer.lower(sp.sympify(d.program.ranges[i])).code
                              for i in a.lhs)
                code = printer.assign(self._unshift(a.body.args[0]), tuple(a.lhs), shape)
                body += _setup_lines(printer)
                prob, log = self.names[str(sm.prob.label)], str(sm.log.label)
                if str(sm.log.label) in read:
                    body.append(f"{log} = {printer.LOG_SOFTMAX.format(x=code, dim=sm.pos)}")
                    if str(sm.prob.label) in read:  # one pass: exp of the logs
                        body.append(f"{prob} = {printer.FUNCS['exp']}({log})")
                else:
                    body.append(f"{prob} = {printer.SOFTMAX.format(x=code, dim=sm.pos)}")
                printer.imports.add(printer.module)
                continue
            target = self.new_names[a.target] if a.kind == "update" else self.names[a.target]
            if a.reduce == "pad":
                if a.target in self.dropped():
                    continue  # read only by ops that pad it themselves
                source = self.names[a.body.access.base.label.name]
                widths = [tuple(printer.lower(sp.sympify(w)).code for w in pair)
                          for pair in d.program.pad_widths(a)]
                body.append(f"{target} = {printer.pad(source, widths, a.body.fill)}")
                continue
            shape = tuple(printer.lower(sp.sympify(d.program.ranges[i])).code for i in a.lhs)
            rhs = through[a.target] if a.target in through else \
                self._inline(picked[a.target], inlined)
            rhs = present(self._logs_of_ratios(
                rhs, {e: pos for e, pos in shifts.items() if e not in soft}))
            if a.target in self.lse and self._lse_exponent(a) is not None:
                # Z = Σ_k c·exp(f) as exp(M)·Σ_k c·exp(f − M)
                # f and c may read other shifted tensors: each such read is exp(M')·(its
                # kernel variable), as everywhere else (docs/fuzzing.md, finding 19)
                peak, f = self.lse[a.target], self._lse_exponent(a)
                shown = self._unshift(f)
                code = printer.assign(MaxOver(shown, *a.over), tuple(a.lhs), shape)
                body += _setup_lines(printer)
                body.append(f"{peak} = {code}")
                printer.names[peak] = peak
                m = self._m_access(peak, a.lhs)
                c = self._unshift(a.body / sp.exp(f))
                rhs = present(d.program.make_sum(c * sp.exp(shown - m), a.over))
            elif a.target in self.lse_exp:  # e = exp(f) as exp(f − M), M = max_k f
                peak, pos = self.lse_exp[a.target]
                f = self._unshift(a.body.args[0])  # its reads of shifted tensors, unshifted
                rest = tuple(i for p, i in enumerate(a.lhs) if p != pos)
                shape_m = tuple(printer.lower(sp.sympify(d.program.ranges[i])).code
                                for i in rest)
                code = printer.assign(MaxOver(f, a.lhs[pos]), rest, shape_m)
                body += _setup_lines(printer)
                body.append(f"{peak} = {code}")
                printer.names[peak] = peak
                rhs = present(sp.exp(f - self._m_access(peak, rest)))
            elif a.target not in self.lse:  # a sum of named exponentials reads them as is
                rhs = self._unshift(rhs)
            if a.target in shifts:  # e = exp(f - max_k f): same ratios e/Z, no overflow
                arg = rhs.args[0]
                peak = printer._reduce(printer.lower(arg), [a.lhs[shifts[a.target]]],
                                       printer.MAX)
                name = self._exp_peak(a.target)
                body += _setup_lines(printer)
                body.append(f"{name} = {peak.code}")
                printer.names[name] = name
                rhs = sp.exp(arg - self._peak(a.target, a.lhs, shifts))
            code = printer.assign(rhs, tuple(a.lhs), shape)
            body += _setup_lines(printer)
            body.append(f"{target} = {code}")
        self.imports |= {imports[i] for i in printer.imports}
        self.helpers |= printer.helpers
        self.owned = dict(printer.owned)
        self._made = getattr(self, "_made", set()) | set(self.owned.values())
        body = _used_temps(body, set(printer._bound.values()) - set(self.owned.values()))
        body = _used_sizes(body, len(size_lines))
        outs = [self.names[a.target] for a in self.outputs]
        out = outs[0] if len(outs) == 1 else "(" + ", ".join(outs) + ")"
        kept = self.saved_names()
        saved = ", ".join(kept) + ("," if len(kept) == 1 else "")
        ret = f"return {out}, ({saved})"
        if self.updates:
            new = ", ".join(self.new_names[a.target] for a in self.updates)
            ret += f", ({new}{',' if len(self.updates) == 1 else ''})"
        doc = [f'"""The forward of {spec.name}; returns the output'
               + ("s" if len(outs) > 1 else "") + ", what backward needs"
               + (", and the new state" if self.updates else "") + '."""']
        return [f"def forward({sig}):", *("    " + x for x in doc + body + [ret])]

    def inlined_sums(self, shifts) -> dict:
        """Lifted sums written inside the one statement that reads them, as a term of its sum:
        ``Y = b + Σ_i X·W`` is one ``X @ W.T + b`` (torch: ``torch.addmm``, the bias added in
        the BLAS call) rather than a named product and a second full-size pass. Only a sum
        that is read once, as a plain term of an element-wise sum, and is not saved."""
        assigns = self.d.program.assigns
        saved = set(self.saved())
        found = {}
        for a in assigns:
            if a.kind != "lifted" or a.reduce != "sum" or a.target in saved | set(shifts) \
                    or a.target in self.lse:
                continue
            readers = [b for b in assigns if b is not a and any(
                access_name(x) == a.target for x in accesses(b.body, self.spec))]
            if len(readers) != 1 or readers[0].reduce or readers[0].kind == "update" or \
                    not isinstance(readers[0].body, sp.Add):
                continue
            terms = [t for t in readers[0].body.args if a.target in
                     {access_name(x) for x in accesses(t, self.spec)}]
            if len(terms) == 1 and accesses(terms[0], self.spec) == [terms[0]]:
                found[a.target] = a
        return found

    def _inline(self, expr, inlined: dict):
        """``expr`` with each read of an inlined sum replaced by the sum at those indices."""
        subs = {}
        for x in accesses(expr, self.spec):
            a = inlined.get(access_name(x))
            if a is not None:
                subs[x] = rename(a.rhs(self.d.program),
                                 dict(zip(a.lhs, access_indices(x), strict=True)))
        return expr.xreplace(subs) if subs else expr

    def stable_exponentials(self) -> dict:
        """Exponentials that are only ever normalised: ``e = exp(f)``, ``Z = Σ_k e`` and every
        other use of e and Z in the forward is the ratio e/Z. Subtracting max_k f before
        ``exp`` leaves every ratio unchanged and keeps large logits from overflowing (softmax,
        cross-entropy, attention). The forward is then invariant under (e, Z) → (λe, λZ) for
        any λ > 0 per row of Z, so the backward may read the shifted e' = exp(f − M) and
        Z' = Σ_k e' in place of e and Z where each of its expressions is homogeneous of
        degree 0 in (e, Z) (:func:`_scale_degree`; attention's ``dK`` reads ``ex·ex/Z²``);
        an e or Z that a gradient reads otherwise stays unshifted.
        Returns {e: the position of k among e's indices}."""
        if hasattr(self, "_stable"):
            return self._stable
        assigns = self.d.program.assigns
        forms = [e for _, e, _ in self.closed_forms(raw=True)]
        found, self._folded = {}, {}
        for a in assigns:
            if a.reduce or a.kind == "output" or not isinstance(a.body, sp.exp):
                continue
            sums = [b for b in assigns if b.reduce == "sum" and len(b.over) == 1
                    and isinstance(b.body, sp.Indexed) and access_name(b.body) == a.target]
            if len(sums) != 1 or sums[0].kind == "output":
                continue
            z = sums[0]
            k = z.over[0]
            pos = list(z.body.indices).index(k)
            if not self._only_ratios(a.target, z, pos, skip=(a, z)):
                continue
            folded = [self._fold_exponential(e, a) for e in forms]
            if {a.target, z.target} & {access_name(x) for e in folded
                                       for x in accesses(e, self.spec)}:
                if not self._reads_scale_free(folded, a.target, z, pos):
                    continue
                self._folded[a.target] = a  # the backward reads e where it reads exp(f)
            found[a.target] = pos
        self._stable = found
        return found

    def _fold_exponential(self, expr, a):
        """``expr`` with each ``exp(f)`` that is the let ``a`` (e = exp(f)) at some indices
        read as e at those indices: the closed form may write e's definition (dB of
        e = exp(X + B)), and a backward that reads the shifted e must not recompute exp(f)."""
        f = a.body.args[0]
        wild = {i: sp.Wild(f"w_{i}") for i in a.lhs}
        pattern = f.xreplace(wild)

        def fold(node):
            if not isinstance(node, sp.exp):
                return None
            found = node.args[0].match(pattern)
            if not found or set(found) != set(wild.values()):
                return None
            idx = [found[wild[i]] for i in a.lhs]
            if rename(f, dict(zip(a.lhs, idx, strict=True))) != node.args[0]:
                return None
            return self.d.program.access(a.target, idx)

        return expr.replace(lambda node: fold(node) is not None, fold)

    def _reads_scale_free(self, exprs, e_name: str, z, pos: int) -> bool:
        """Is every expression in ``exprs`` unchanged when e and the sum ``z`` (Z = Σ_k e)
        are scaled by the same λ > 0 per row of Z (e[..k..] → λ[row]·e, Z → λ[row]·Z)? A row
        is named by e's indices less k; a read of Z reaches it through Z's own axes."""
        lam = sp.IndexedBase(sp.Dummy("lam"), positive=True)
        row_scale = sp.Dummy("lam", positive=True)  # a 0-d Z: one row
        rest = [i for p, i in enumerate(z.body.indices) if p != pos]
        if not set(rest) <= set(z.lhs):  # Z[n] = Σ_k e[n + 1, k]: no row to name
            return False

        def scale(node):
            if isinstance(node, sp.Symbol) and (node.is_integer or node.name != z.target):
                return None
            name, idx = access_name(node), list(access_indices(node))
            if name == e_name:
                del idx[pos]
            elif name == z.target:
                axes = dict(zip(z.lhs, idx, strict=True))
                idx = [axes[i] for i in rest]
            else:
                return None
            return lam[tuple(idx)] if idx else row_scale

        return all(_scale_degree(e, scale) == 1 for e in exprs)

    # -- softmax: a normalised exponential as the target's one call -------------------------
    def softmaxes(self, shifts, printer) -> dict:
        """Normalised exponentials that the target computes with its own softmax: for a
        stable exponential (:meth:`stable_exponentials`) e = exp(f) with Z = Σ_k e, every
        ratio e/Z is softmax(f) along k's axis and every log of it log-softmax(f), so the
        kernel computes neither e nor Z (torch: ``torch.softmax(f, k)``, or
        ``torch.log_softmax`` when a log reads it, and ``torch.exp`` of that where the
        probabilities are read too: one call each instead of max, shift, exp, sum, divide and
        log). A let P = e/Z takes the softmax's values under its own name. Empty when the
        printer has no softmax (NumPy keeps the max-shifted form); an exponential stays in
        the shifted form when some read of e or Z is not through the ratio, or when the
        backward reads e or Z (it reads the shifted ones the forward saves).
        Returns {e: :class:`Softmax`}."""
        if getattr(printer, "SOFTMAX", None) is None:
            return {}
        assigns = self.d.program.assigns
        saved = set(self.saved())
        found = {}
        for e_name, pos in dict(shifts).items():
            z = next(b for b in assigns if b.reduce == "sum" and isinstance(b.body, sp.Indexed)
                     and access_name(b.body) == e_name)
            if {e_name, z.target} & saved:  # the backward reads the shifted e and Z
                continue
            found[e_name] = Softmax(e_name, z.target, pos,
                                    sp.IndexedBase(self._fresh_name(f"{self.names[e_name]}"
                                                                    "_softmax", claim=True)))
        for a in assigns:  # a let P that is exactly the ratio e/Z names the softmax
            if a.kind not in ("let", "output") or a.reduce or not a.lhs:
                continue
            for sm in found.values():
                if sm.alias is None and \
                        self._softmax_reads(a.body, found) == sm.prob[tuple(a.lhs)]:
                    sm.alias, sm.prob = a.target, self.spec.tensors[a.target].base
        by_target = {a.target: a for a in assigns if a.kind != "update"}
        for a in assigns:  # every other statement reads e and Z only through the ratio
            if any(a.target in (sm.e, sm.z, sm.alias) for sm in found.values()):
                continue
            rewritten = self._softmax_reads(a.rhs(self.d.program), found, by_target)
            left = {access_name(x) for x in accesses(rewritten, self.spec)}
            for sm in list(found.values()):
                if {sm.e, sm.z} & left:
                    del found[sm.e]
        for sm in found.values():
            stem = self.names[sm.alias] if sm.alias else self.names[sm.e]
            sm.log = sp.IndexedBase(self._fresh_name(f"log_{stem}" if sm.alias else
                                                     f"{stem}_log_softmax", claim=True))
            for base in (sm.prob, sm.log):
                self.names.setdefault(str(base.label), str(base.label))
        return found

    def _softmax_reads(self, expr, found: dict, by_target=None):
        """``expr`` with each read of e as softmax·Z (so that e/Z is the softmax) and each
        log of a softmax as the log-softmax, also the log of a product of powers of reads
        with a softmax among them (log(P·T) = log-softmax + log T), and, given
        ``by_target``, of a let that is such a product."""
        subs = {}
        for x in accesses(expr, self.spec):
            sm = found.get(access_name(x))
            z = next((b for b in self.d.program.assigns if b.target == sm.z), None) \
                if sm is not None else None
            read = self._z_read(z, access_indices(x), sm.pos) if z is not None else None
            if read is not None:  # else e stays, and the softmax is not taken
                subs[x] = sm.prob[tuple(access_indices(x))] * read
        expr = expr.xreplace(subs) if subs else expr
        probs = {str(sm.prob.label): sm for sm in found.values()}

        def expand(node):
            if not isinstance(node, sp.log):
                return None
            arg = node.args[0]
            a = by_target.get(access_name(arg)) if by_target is not None and \
                isinstance(arg, sp.Indexed) else None
            if a is not None and a.kind == "let" and not a.reduce and \
                    str(arg.base.label) not in probs:
                arg = self._softmax_reads(
                    rename(a.body, dict(zip(a.lhs, access_indices(arg), strict=True))), found)
            terms, hit = [], False
            for f in sp.Mul.make_args(arg):
                base, power = f.as_base_exp()
                if not isinstance(base, sp.Indexed):
                    return None
                sm = probs.get(str(base.base.label))
                if sm is not None and sm.log is not None:
                    terms.append(power * sm.log[base.indices])
                    hit = True
                else:
                    terms.append(power * sp.log(base))
            return sp.Add(*terms) if hit else None

        return expr.replace(lambda n: expand(n) is not None, expand)

    # -- log-sum-exp: Σ_k exp(f) feeding a log or a division --------------------------------
    def shifted_sums(self) -> dict[str, str]:
        """Sums of exponentials ``Z = Σ_k c·exp(f)`` (log-sum-exp, an inline softmax's
        normaliser) that the kernels compute as ``exp(M)·Z'`` with ``M = max_k f`` and
        ``Z' = Σ_k c·exp(f − M)``: every later use of Z reads ``exp(M)·Z'``, so that
        ``log Z = M + log Z'`` and ``exp(g)/Z = exp(g − M)/Z'`` never overflow (logits of
        ±800). Returns {Z: the name of its M}. Outputs keep their plain value."""
        found = {}
        self.lse_exp = {}  # a named exponential e -> (its M, the position of k in e)
        by_target = {b.target: b for b in self.d.program.assigns if b.kind != "update"}
        for a in self.d.program.assigns:
            if a.reduce != "sum" or a.kind not in ("let", "lifted"):
                continue
            if self._lse_exponent(a) is not None:
                found[a.target] = self._fresh_name(f"{self.names[a.target]}_max", claim=True)
                self.names[found[a.target]] = found[a.target]
                continue
            named = self._named_exponential(a, by_target)
            if named is None:
                continue
            e, pos = named
            if e not in self.lse_exp:
                if not self._sums_agree(e, pos, by_target):
                    continue
                peak = self._fresh_name(f"{self.names[e]}_max", claim=True)
                self.names[peak] = peak
                self.lse_exp[e] = (peak, pos)
            found[a.target] = self.lse_exp[e][0]
        return found

    def _named_exponential(self, a, by_target) -> tuple[str, int] | None:
        """(e, position of k) when the sum ``a`` is ``Z[i] = Σ_k c·e[i, k]`` over a let
        ``e = exp(f)`` that the ratio rule (:meth:`stable_exponentials`) leaves alone: e is
        then computed as exp(f − M) with M = max_k f, Z as Σ_k c·exp(f − M), and both are
        read as exp(M)·(what was computed)."""
        if len(a.over) != 1:
            return None
        # e element-wise: the body of a sum Σ_k exp(f) is an exponential too, but the sum is
        # shifted by its own maximum (docs/fuzzing.md, finding 23)
        reads = [x for x in sp.Mul.make_args(a.body) if isinstance(x, sp.Indexed)
                 and getattr(by_target.get(access_name(x)), "kind", None) == "let"
                 and by_target[access_name(x)].reduce is None
                 and isinstance(by_target[access_name(x)].body, sp.exp)]
        if len(reads) != 1 or access_name(reads[0]) in self.stable_exponentials():
            return None
        idx = list(access_indices(reads[0]))
        k = a.over[0]
        rest = sp.Mul(*[f for f in sp.Mul.make_args(a.body) if f is not reads[0]])
        # the factor c is read as it is: it must hold no sum and no exponential
        if idx.count(k) != 1 or rest.has(sp.exp) or \
                any(access_name(x) in by_target and (by_target[access_name(x)].reduce or
                                                     by_target[access_name(x)].body.has(sp.exp))
                    for x in accesses(rest, self.spec)) or \
                [i for i in idx if i != k] != list(a.lhs) or len(set(idx)) != len(idx):
            return None
        return access_name(reads[0]), idx.index(k)

    def _sums_agree(self, e: str, pos: int, by_target) -> bool:
        """Does every sum that reads e reduce the same axis of it (the one M is over)?"""
        for b in self.d.program.assigns:
            if b.reduce == "sum" and any(access_name(x) == e
                                         for x in accesses(b.body, self.spec)):
                if self._named_exponential(b, by_target) != (e, pos):
                    return False
        return True

    def _lse_exponent(self, a) -> sp.Expr | None:
        """f when the body of the sum ``a`` is ``c·exp(f)`` with f varying over the sum."""
        exps = [f for f in sp.Mul.make_args(a.body) if isinstance(f, sp.exp)]
        if len(exps) != 1 or not set(a.over) & exps[0].free_symbols:
            return None
        rest = sp.Mul(*[f for f in sp.Mul.make_args(a.body) if f is not exps[0]])
        if rest.has(sp.exp) and any(set(a.over) & x.free_symbols
                                    for x in rest.atoms(sp.exp)):
            return None
        return exps[0].args[0]

    @staticmethod
    def _m_access(name: str, idx) -> sp.Expr:
        """The maximum M called ``name`` at indices ``idx`` (a symbol when it has none)."""
        return sp.IndexedBase(name)[tuple(idx)] if idx else sp.Symbol(name)

    def _unshift(self, expr):
        """Every read of a shifted sum Z as ``exp(M)·Z'`` (``log Z`` as ``M + log Z'``),
        with the exponentials of each product merged: exp(g)·exp(−M) = exp(g − M)."""
        if not self.lse:
            return expr

        by_target = {a.target: a for a in self.d.program.assigns if a.kind != "update"}

        def z_of(node):
            """(M's name, its indices) for a read of a shifted sum or exponential."""
            if isinstance(node, sp.Indexed) and access_name(node) in self.lse:
                return self.lse[access_name(node)], access_indices(node)
            if isinstance(node, sp.Indexed) and access_name(node) in self.lse_exp:
                peak, pos = self.lse_exp[access_name(node)]
                return peak, tuple(i for p, i in enumerate(access_indices(node)) if p != pos)
            # a 0-d shifted sum reads as a symbol of its name; an index of the same name (the
            # adjoint's free index `u` beside a tensor u, docs/fuzzing.md finding 25) does not
            if isinstance(node, sp.Symbol) and node.name in self.lse and \
                    not node.is_integer and node not in self.d.program.ranges:
                return self.lse[node.name], ()
            return None

        def walk(e):
            if isinstance(e, sp.log) and isinstance(e.args[0], sp.Indexed) and \
                    access_name(e.args[0]) in self.lse_exp:  # log e = f
                a = by_target[access_name(e.args[0])]
                return rename(a.body.args[0], dict(zip(a.lhs, access_indices(e.args[0]),
                                                       strict=True)))
            if isinstance(e, sp.log) and z_of(e.args[0]):
                return e + self._m_access(*z_of(e.args[0]))
            if z_of(e):
                return sp.exp(self._m_access(*z_of(e))) * e
            if not e.args or isinstance(e, (sp.Indexed, sp.IndexedBase)):
                return e
            return e.func(*[walk(x) for x in e.args])

        def has_exp(term) -> bool:
            if isinstance(term, sp.Sum):
                return has_exp(term.function)
            return any(isinstance(f, sp.exp) for f in sp.Mul.make_args(term))

        def merge(e):
            """exp(a)·exp(b) as exp(a + b), bottom-up (each node once)."""
            if not e.args or isinstance(e, (sp.Indexed, sp.IndexedBase)):
                return e
            return combine(e.func(*[merge(x) for x in e.args]))

        def combine(e):
            """A product's exponentials (its factors already merged) go into a sum or a
            sum of terms beside it that has exponentials of its own to meet."""
            if not isinstance(e, sp.Mul):
                return e
            exps = [f for f in e.args if isinstance(f, sp.exp)]
            if not exps:
                return e
            rest = [f for f in e.args if not isinstance(f, sp.exp)]
            combined = sp.exp(sp.Add(*[f.args[0] for f in exps]))
            for k, f in enumerate(rest):
                if isinstance(f, sp.Add) and any(has_exp(t) for t in f.args):
                    rest[k] = sp.Add(*[combine(t * combined) for t in f.args])
                    return sp.Mul(*rest)
                if isinstance(f, sp.Sum) and has_exp(f.function):
                    rest[k] = sp.Sum(combine(f.function * combined), *f.limits)
                    return sp.Mul(*rest)
            return sp.Mul(*rest, combined)

        return merge(walk(expr))

    def _scalar_tensors(self, shifts=()) -> frozenset:
        """Names of 0-d tensors in the kernels (not Python numbers: ``math`` cannot take
        them): scalar tensors, a loss's upstream gradient (torch.autograd passes a 0-d
        tensor) and the maxima of shifted exponentials and sums."""
        tensors = self.spec.tensors
        out = {n for n, t in tensors.items() if not t.dims}
        out |= {s for o, s in self.seed_names.items() if not tensors[o].dims}
        out |= {m for z, m in self.lse.items() if not tensors[z].dims}
        out |= {self._exp_peak(e) for e, pos in dict(shifts).items()
                if len(tensors[e].dims) == 1}
        return frozenset(out)

    def _taken(self) -> set[str]:
        """Every name a kernel variable of gradtool's own must not take."""
        from gradtool.codegen.base import RESERVED

        return set(self.names.values()) | set(self.names) | RESERVED | \
            getattr(self, "_made", set())

    def _fresh_name(self, stem: str, claim: bool = False) -> str:
        """``stem``, or ``stem_`` and so on: a kernel variable that no declared name, no
        reserved name and no other variable gradtool made uses (``claim`` records it)."""
        made = getattr(self, "_made", set())
        taken = self._taken()
        name = stem
        while name in taken:
            name += "_"
        if claim:
            self._made = made | {name}
        return name

    def extents(self) -> dict:
        """Tensor name -> the sizes of its axes: declared tensors and forward intermediates
        (what a read through windows checks its view against)."""
        out = {a.target: tuple(self.d.program.ranges[i] for i in a.lhs)
               for a in self.d.program.assigns}
        out.update({name: t.dims for name, t in self.spec.tensors.items()})
        return out

    def derived_sizes(self) -> dict:
        """Derived size symbol (OH) -> its formula in the declared sizes."""
        return {self.spec.dim_symbols[name]: formula
                for name, formula in getattr(self.spec, "derived", {}).items()}

    def tensor_dims(self, name: str) -> tuple:
        """Axes of a forward tensor, or of the max M of a shifted sum (Z's axes)."""
        if name in self.spec.tensors:
            return self.spec.tensors[name].dims
        z = next(z for z, m in self.lse.items() if m == name)
        return self.spec.tensors[z].dims

    def _peak(self, e_name: str, idx, shifts) -> sp.Expr:
        """max_k of e's exponent, at e's indices ``idx`` (less the reduced position)."""
        rest = [i for p, i in enumerate(idx) if p != shifts[e_name]]
        name = self._exp_peak(e_name)
        return sp.IndexedBase(name)[tuple(rest)] if rest else sp.Symbol(name)

    def _exp_peak(self, e_name: str) -> str:
        """The kernel variable holding max_k f of a shifted exponential e = exp(f)."""
        peaks = self.__dict__.setdefault("_exp_peaks", {})
        if e_name not in peaks:
            peaks[e_name] = self._fresh_name(f"{self.names[e_name]}_max", claim=True)
        return peaks[e_name]

    def _logs_of_ratios(self, expr, shifts):
        """log(P) with P = e/Z and e a shifted exponential: (f − max f) − log Z, so that a
        probability that underflows to 0 never reaches log (cross-entropy at large logits).
        Where e and Z are the log-sum-exp's (:meth:`shifted_sums`: the backward reads them),
        log(P) = log e − log Z, which :meth:`_unshift` reads as f − (M + log Z')."""
        if not shifts and not self.lse:
            return expr
        by_target = {a.target: a for a in self.d.program.assigns if a.kind != "update"}

        def expand(node):
            if not (isinstance(node, sp.log) and accesses(node.args[0], self.spec)
                    and node.args[0] == accesses(node.args[0], self.spec)[0]):
                return None
            x = node.args[0]
            a = by_target.get(access_name(x))
            if a is None or a.reduce:
                return None
            body = rename(a.body, dict(zip(a.lhs, access_indices(x), strict=True)))
            terms, shifted = [], False
            for f in sp.Mul.make_args(body):
                base, exp = f.as_base_exp()
                inner = accesses(base, self.spec)
                if not inner or base != inner[0]:
                    return None
                name = access_name(base)
                if name in shifts:
                    e = by_target[name]
                    arg = rename(e.body.args[0], dict(zip(e.lhs, access_indices(base),
                                                          strict=True)))
                    terms.append(exp * (arg - self._peak(name, access_indices(base), shifts)))
                    shifted = True
                elif name in self.lse or name in self.lse_exp:
                    terms.append(exp * sp.log(base))
                    shifted = True
                else:
                    terms.append(exp * sp.log(base))
            return sp.Add(*terms) if shifted else None

        return expr.replace(lambda n: expand(n) is not None, expand)

    def _z_read(self, z, e_idx, pos: int) -> sp.Expr | None:
        """The read of the sum ``z`` (Z = Σ_k e) that normalises e at indices ``e_idx``
        (k at position ``pos``), through Z's own axes: Z[i, b] = Σ_k e[b, i, k] normalises
        e[b, i, j] as Z[i, b]. None where Z has an axis that e's row does not name."""
        rest = [i for p, i in enumerate(z.body.indices) if p != pos]
        axes = dict(zip(rest, [i for p, i in enumerate(e_idx) if p != pos], strict=True))
        if not set(z.lhs) <= set(axes):
            return None
        return self.d.program.access(z.target, [axes[i] for i in z.lhs])

    def _only_ratios(self, e_name, z, pos, skip) -> bool:
        z_name = z.target
        w = sp.Dummy("w")
        for b in self.d.program.assigns:
            if any(b is s for s in skip):
                continue
            names = {access_name(x) for x in accesses(b.body, self.spec)}
            if not names & {e_name, z_name}:
                continue
            subs = {}
            for x in accesses(b.body, self.spec):
                if access_name(x) == e_name:
                    read = self._z_read(z, x.indices, pos)
                    if read is None:
                        return False
                    subs[x] = w * read
            rewritten = b.body.xreplace(subs)
            if any(access_name(x) in (e_name, z_name) for x in accesses(rewritten, self.spec)):
                return False
        return True

    # -- backward ---------------------------------------------------------------------------
    def closed_forms(self, raw: bool = False) -> list[tuple[str, sp.Expr, tuple]]:
        """(input, its gradient as the kernel computes it, its indices); ``raw``: before
        shifted sums and exponentials are read through their maxima."""
        if not raw:
            self.stable_exponentials()  # which exponentials the backward reads as e
        out = []
        for t in self.grads:
            expr = self._kernel_form(t.name)
            for a in getattr(self, "_folded", {}).values():
                expr = self._fold_exponential(expr, a)
            for name, seed in self.d.seeds.items():
                if seed == 1:  # a loss: scale by the upstream gradient of L
                    expr = sp.Symbol(self.seed_names[name]) * expr
            expr = present(self._indicators(expr))
            out.append((t.name, expr if raw else self._unshift(expr), self.d.canon[t.name]))
        return out

    def _kernel_form(self, name: str) -> sp.Expr:
        """The adjoint of ``name`` as the kernels compute it: the closed form, except that
        each padded copy Xp read from it contributes the slice of Xp's own adjoint
        (``Unpad``: a scatter over Xp's axes, then ``[P:P + H]``) instead of that scatter
        shifted by the padding, which would lower to a dense comparison of positions. An
        adjoint that reaches a padded copy only through later tensors (tanh, then padding)
        reads their kernel forms."""
        from gradtool.symbolic.ir import Unpad
        from gradtool.symbolic.reverse import _closed_form

        forms = self.__dict__.setdefault("_kernel_forms", {})
        if name in forms:
            return forms[name]
        d = self.d
        contributions = d.contributions.get(name, [])
        if not self._reaches_pad(name):
            forms[name] = d.closed[name]
            return forms[name]
        terms, others = [], []
        for c in contributions:
            a = c.statement
            if a.reduce != "pad":
                others.append(c.expr)
                continue
            widths = d.program.pad_widths(a)
            padded, source = d.canon[a.target], d.canon[name]
            same = {hp: h for hp, h, (lo, hi) in zip(padded, source, widths, strict=True)
                    if lo == 0 and hi == 0}
            shifts = [sp.Tuple(hp, h, lo) for hp, h, (lo, _) in zip(padded, source, widths,
                                                                     strict=True)
                      if hp not in same]
            terms.append(Unpad(rename(self._kernel_form(a.target), same), *shifts))
        if name in d.seeds:
            others.append(d.seed_access(name))
        if others:  # simplified with the padded adjoints by name: (1 − Z²)·g_Z stays a product
            closed = _closed_form(d, self._inline_kernel_forms(sp.Add(*others), False), True)
            terms.append(self._inline_kernel_forms(closed, True))
        forms[name] = sp.Add(*terms)
        return forms[name]

    def _reaches_pad(self, name: str) -> bool:
        """Does a padded copy's adjoint flow into ``name``'s, directly or through others?"""
        return any(c.statement.reduce == "pad" or self._reaches_pad(c.statement.target)
                   for c in self.d.contributions.get(name, []))

    def _inline_kernel_forms(self, expr, padded: bool):
        """``expr`` with each adjoint access replaced by that adjoint's kernel form: those
        that a padded copy's adjoint reaches (``padded``), or the others."""
        d = self.d
        tensor_of = {g: t for t, g in d.adjoint_names.items()
                     if t in d.closed and self._reaches_pad(t) == padded}
        subs = {}
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Indexed) and node.base.label.name in tensor_of:
                t = tensor_of[node.base.label.name]
                subs[node] = rename(self._kernel_form(t), dict(zip(d.canon[t], node.indices,
                                                                    strict=True)))
            elif isinstance(node, sp.Symbol) and node.name in tensor_of:
                subs[node] = self._kernel_form(tensor_of[node.name])
        return expr.xreplace(subs)

    def label_names(self) -> frozenset:
        """The kernel-independent names of the spec's integer labels (``spec.labels``)."""
        return frozenset(t.name for t in self.spec.tensors.values() if t.is_labels)

    def _picked_indicators(self, expr, printer):
        """``expr`` with each one-hot read ``onehot_y[n, c]`` that is a factor of a sum over
        c replaced by its definition δ(c, y[n]): the printer then takes the term at c = y[n]
        (a gather, :meth:`~gradtool.codegen.base.ArrayPrinter._pick_label`) instead of
        multiplying by a one-hot array."""
        onehot = {a.target: a for a in self.d.program.assigns
                  if self.spec.tensors[a.target].onehot_of}
        if not onehot:
            return expr

        def pick(s):
            over = s.variables
            factors = list(sp.Mul.make_args(s.function))
            for k, f in enumerate(factors):
                a = onehot.get(access_name(f)) if isinstance(f, sp.Indexed) else None
                if a is None:
                    continue
                delta = rename(a.body, dict(zip(a.lhs, access_indices(f), strict=True)))
                if printer.label_delta(delta, over) is not None:
                    factors[k] = delta
                    return sp.Sum(sp.Mul(*factors), *s.limits)
            return s

        return expr.replace(lambda x: isinstance(x, sp.Sum), pick)

    def _unread_onehots(self, rhs: dict) -> set:
        """The one-hot statements no forward statement reads any more (every read became a
        pick at the label), nor an output: the forward builds no one-hot array."""
        outputs = {a.target for a in self.outputs}
        read = {access_name(n) for e in rhs.values() for n in accesses(e, self.spec)}
        return {a.target for a in self.d.program.assigns
                if self.spec.tensors[a.target].onehot_of and a.target not in read
                and a.target not in outputs}

    def _indicators(self, expr):
        """A one-hot tensor read by a gradient becomes its definition δ(c, y[n]): the backward
        then keeps the integer labels, not an N×C float copy (as F.cross_entropy does)."""
        onehot = {a.target: a for a in self.d.program.assigns
                  if self.spec.tensors[a.target].onehot_of}
        subs = {}
        for node in accesses(expr, self.spec):
            a = onehot.get(access_name(node))
            if a is not None:
                subs[node] = rename(a.body, dict(zip(a.lhs, access_indices(node), strict=True)))
        return expr.xreplace(subs) if subs else expr

    def saved(self) -> list[str]:
        """Forward tensors the closed-form backward reads, in forward order."""
        if hasattr(self, "_saved"):
            return self._saved
        used = set()
        peaks = set(self.lse.values())  # a 0-d maximum M is a plain Symbol, not an access
        for _, expr, _ in self.closed_forms():
            used |= {access_name(a) for a in accesses(expr, self.spec)}
            used |= {s.name for s in expr.free_symbols if isinstance(s, sp.Symbol)} & peaks
        order = [t.name for t in self.inputs] + [x for a in self.d.program.assigns
                                                 for x in (a.target, self.lse.get(a.target))
                                                 if x is not None]
        seeds = set(self.seed_names.values())
        dropped = self.dropped()
        sources = {a.target: access_name(a.body.access) for a in self.d.program.assigns
                   if a.target in dropped}
        used = {sources.get(n, n) for n in used}  # a dropped copy's ops read its source
        self._saved = [n for n in dict.fromkeys(order) if n in used and n not in seeds]
        return self._saved

    def folds(self) -> dict:
        """The padded copies offered to the torch printer for ops that pad themselves
        (name -> :class:`~gradtool.codegen.torch_target.Fold`)."""
        if self.target != "torch":
            return {}
        from gradtool.codegen.torch_target import Fold

        return {a.target: Fold(self.names[access_name(a.body.access)],
                               self.d.program.pad_widths(a), a.body.fill)
                for a in self.d.program.assigns if a.reduce == "pad" and
                (self.offered is None or a.target in self.offered)}

    def dropped(self) -> frozenset:
        """The padded copies no kernel line reads (every op that read one pads itself)."""
        return frozenset(self.offered or ())

    def saved_names(self) -> list[str]:
        """The kernel variables the forward returns for the backward: the spec's tensors
        that the closed form reads (:meth:`saved`), then the temporaries the forward's
        lowerings own (max pooling's argmax), which the backward's lowerings may read."""
        return [self.names[s] for s in self.saved()] + list(getattr(self, "owned", {}).values())

    def backward(self) -> list[str]:
        """The closed-form backward, each gradient under its ``need`` flag.

        ``need`` holds one flag per gradient (the order of the returned gradients, as
        ``ctx.needs_input_grad`` does for the inputs); a gradient whose flag is false is None,
        and a common term is computed only when some requested gradient reads it. Sizes are
        read under the same conditions, so a saved tensor that no requested gradient reads
        may be None (the torch Function saves only those it will read)."""
        d, spec = self.d, self.spec
        forms = self.closed_forms()
        exprs = [_canonical_bound(e) for _, e, _ in forms]
        exprs, products = _shared_products(exprs, self._taken())
        replacements, reduced = _cse_whole_masks(exprs)
        replacements, reduced = _inline_index_terms(replacements, reduced)
        seeds = [self.names[self.seed_names[o.target]] for o in self.outputs
                 if o.target in self.seed_names]
        saved = self.saved_names()
        hypers = self._hypers_in(exprs)
        printer, imports = _printer(self.target, self.names, temps={})
        printer.definitions = {}
        printer.owned = dict(getattr(self, "owned", {}))
        printer.fold = self.folds()
        printer.labels = self.label_names()
        # a loss's upstream gradient is a 0-d tensor too (torch.autograd passes one)
        printer.scalar_tensors = self._scalar_tensors()
        # a tensor to take dtype and device from: a full upstream gradient, else a saved tensor
        full_seeds = [s for s, o in zip(seeds, self.outputs, strict=False)
                      if spec.tensors[o.target].dims]
        shaped = [self.names[n] for n in self.saved() if self.tensor_dims(n)
                  and not (n in spec.tensors and spec.tensors[n].is_labels)]
        printer.ref = (full_seeds or shaped or seeds or [None])[0]
        printer.order = list(dict.fromkeys(i for _, _, canon in forms for i in canon))
        printer.ranges = dict(d.program.ranges)
        # a common term can read X[n, Cg·g + q] with g bound by a sum around it: the term is
        # computed first, and builds the positions of g from g's range
        printer.ranges.update(_bound_ranges(exprs + [v for _, v in replacements]))
        printer.extents, printer.derived = self.extents(), self.derived_sizes()
        # statements as (name, code), before the conditions they run under are known
        stmts: list[tuple[str, str]] = []
        taken = self._taken()
        printer.taken = taken
        for name, (value, idx) in products.items():  # G_xhat = G * xhat, shared by two sums
            printer.names[name] = name
            shape = tuple(printer.lower(sp.sympify(d.program.ranges.get(i, 1))).code
                          for i in idx)
            code = printer.assign(value, idx, shape)
            stmts += printer.take_setup()
            stmts.append((name, code))
            taken.add(name)
        for sym, value in replacements:
            # (an index used as a value, 1 + Min(0, d)², is an array over its axis)
            if not value.has(sp.Indexed) and not (value.free_symbols & set(printer.temps)) \
                    and not printer._reads_index(value):
                arr = printer.lower(value)   # a scalar such as 1/D: inline it
                printer.temps[sym] = Arr(f"({arr.code})" if arr.prec < 4 else arr.code, ())
                printer.scalars[sym] = value
                continue
            name = _temp_name(value, taken)
            taken.add(name)
            arr = printer.lower(value)
            stmts += printer.take_setup()
            stmts.append((name, arr.code))
            printer.temps[sym] = Arr(name, arr.axes)
            printer.definitions[sym] = value
        grads = []
        for (tname, _, canon), expr in zip(forms, reduced, strict=True):
            var = self.grad_names[tname]
            shape = tuple(printer.lower(sp.sympify(d.program.ranges[i])).code for i in canon)
            scatter = printer.label_scatter(expr, tuple(canon)) if expr != 0 else None
            if scatter is not None:  # rest + coef·δ(c, y[n]): add coef at the labels only
                rest, positions, coef, position_axes = scatter
                shared = _shared_scale(rest, coef, printer)
                if shared is not None:  # (G / N)·P − (G / N)·δ: the scale G / N once
                    value, rest, coef, sym = shared
                    name = self._fresh_name("scale")
                    while name in taken:
                        name += "_"
                    taken.add(name)
                    stmts += [(name, printer.lower(value).code)]
                    printer.temps[sym] = Arr(name, ())
                    printer.definitions[sym] = value
                code = self._zeros(shape, printer) if rest == 0 else \
                    printer.assign(rest, tuple(canon), shape)
                if rest != 0 and not _fresh(code):
                    code = f"{code}.clone()" if self.target == "torch" else f"{code}.copy()"
                update = InPlace(printer.add_at_labels(positions, coef, position_axes, var))
                stmts += printer.take_setup()
                stmts += [(var, code), (var, update)]
                grads.append(var)
                continue
            code = self._zeros(shape, printer) if expr == 0 else \
                printer.assign(expr, tuple(canon), shape)
            stmts += printer.take_setup()
            stmts.append((var, code))
            grads.append(var)
        self.imports |= {imports[i] for i in printer.imports}
        self.helpers |= printer.helpers
        flags = [self.need_names[t.name] for t in self.grads]
        reads, needed_by = _needed_by(stmts, grads)
        if self.target == "torch":  # a convolution's two gradients in one call
            from gradtool.codegen.torch_target import pair_conv_grads

            def fresh(stem: str) -> str:
                while stem in taken:
                    stem += "_"
                taken.add(stem)
                return stem

            stmts = pair_conv_grads(
                stmts, lambda name: " or ".join(flags[k] for k in sorted(needed_by[name])),
                printer, _names_read, fresh, set(grads))
            self.helpers |= printer.helpers
            reads, needed_by = _needed_by(stmts, grads)
            stmts = [(name, code) for name, code in stmts if needed_by[name]]
        # sizes: read where some statement uses them, off the upstream gradient or a saved
        # tensor; a size no tensor has is passed in
        dim_names = {self.names[str(x)]: x for x in spec.dim_symbols.values()}
        dim_need: dict = {}
        for name, _ in stmts:
            for r in reads[name] & dim_names.keys():
                dim_need.setdefault(r, set()).update(needed_by[name])
        avail = [(self.names[self.seed_names[o.target]], spec.tensors[o.target].dims)
                 for o in self.outputs if o.target in self.seed_names]
        avail += [(self.names[s], self.tensor_dims(s)) for s in self.saved()]
        size_groups, missing = [], []
        for guard in dict.fromkeys(frozenset(v) for v in dim_need.values()):
            dims = {dim_names[r] for r, v in dim_need.items() if frozenset(v) == guard}
            lines, lacking = self.size_lines(dims, avail)
            size_groups.append((guard, lines))
            missing += lacking
        missing = sorted(set(missing), key=str)
        self.backward_dims = [str(m) for m in missing]
        # what each saved tensor is read for, so the torch Function saves it only then
        self.saved_need = {s: set() for s in saved}
        for guard, lines in size_groups:
            for line in lines:
                for r in _names_read(line) & self.saved_need.keys():
                    self.saved_need[r] |= guard
        for name, _ in stmts:
            for r in reads[name] & self.saved_need.keys():
                self.saved_need[r] |= needed_by[name]
        default = "(" + ", ".join(["True"] * len(grads)) + ("," if len(grads) == 1 else "") + ")"
        kw = [self.names[str(m)] for m in missing]
        kw += [f"{self.names[h]}={spec.hypers[h].default!r}" for h in hypers]
        kw += [f"need={default}"]
        sig = ", ".join(seeds + saved + ["*"] + kw)
        every = frozenset(range(len(grads)))

        def condition(guard) -> str | None:
            if guard == every and len(grads) > 1:  # some gradient is always requested
                return None
            return " or ".join(flags[k] for k in sorted(guard))

        blocks: list[tuple[str | None, list[str]]] = []

        def add(guard, line):
            cond = condition(frozenset(guard))
            if blocks and blocks[-1][0] == cond:
                blocks[-1][1].append(line)
            else:
                blocks.append((cond, [line]))

        for guard, lines in size_groups:
            for line in lines:
                add(guard, line)
        for name, code in stmts:
            if needed_by[name]:
                add(needed_by[name], f"{name}{code}" if isinstance(code, InPlace)
                    else f"{name} = {code}")
        body = [f"{', '.join(flags)}{',' if len(flags) == 1 else ''} = need",
                " = ".join(grads) + " = None"] if grads else []
        for cond, lines in blocks:
            if cond is None:
                body += lines
            else:
                body += [f"if {cond}:"] + ["    " + x for x in lines]
        names = ", ".join(f"∂L/∂{t.name}" for t in self.grads)
        doc = ['"""Closed-form gradients ' + names + " from the upstream gradient"
               + ("s" if len(seeds) > 1 else "") + ";",
               "``need`` flags which to compute (in that order); the others are None.\"\"\""]
        # no differentiable input: an empty tuple, so that callers can still unpack it
        ret = "return " + (", ".join(grads) + ("," if len(grads) == 1 else "") or "()")
        return [f"def backward({sig}):", *("    " + x for x in doc + body + [ret])]

    def _zeros(self, shape, printer) -> str:
        if self.target == "torch":
            return f"{printer.ref}.new_zeros(({', '.join(shape)},))"
        self.imports.add("import numpy as np")
        return f"np.zeros(({', '.join(shape)},))"


def _scale_degree(expr, scale):
    """The factor that multiplies ``expr`` when each tensor read x is multiplied by
    ``scale(x)`` (None: left alone), as a product of powers of the scales, or None where
    ``expr`` is not homogeneous in them: a sum whose terms scale differently, a function
    (exp, log, a comparison) of a scaled argument, or a reduction over an index its
    terms' scale depends on (Σ_i λ[i]·e[i] is no multiple of Σ_i e[i])."""
    if isinstance(expr, (sp.Indexed, sp.Symbol)):
        factor = scale(expr)
        return sp.S.One if factor is None else factor
    if not expr.args or isinstance(expr, sp.IndexedBase):
        return sp.S.One
    if isinstance(expr, sp.Sum):
        inner = _scale_degree(expr.function, scale)
        bound = {lim[0] for lim in expr.limits}
        return inner if inner is not None and not inner.free_symbols & bound else None
    if isinstance(expr, sp.Pow) and _scale_degree(expr.exp, scale) == 1:
        base = _scale_degree(expr.base, scale)
        return None if base is None else base ** expr.exp
    parts = [_scale_degree(x, scale) for x in expr.args]
    if any(x is None for x in parts):
        return None
    if isinstance(expr, sp.Mul):
        return sp.Mul(*parts)
    if isinstance(expr, sp.Add):
        return parts[0] if len(set(parts)) == 1 else None
    return sp.S.One if all(x == 1 for x in parts) else None


def _needed_by(stmts: list, grads: list) -> tuple[dict, dict]:
    """(names each statement reads, the gradients (positions in ``grads``) that need each
    statement): a gradient needs its own line and, recursively, every named term that line
    reads."""
    reads: dict[str, set] = {}
    for name, code in stmts:  # an in-place update of a name adds to what that name reads
        reads[name] = reads.get(name, set()) | _names_read(code)
    needed_by: dict[str, set] = {name: set() for name, _ in stmts}
    for k, var in enumerate(grads):
        todo = [var]
        while todo:
            name = todo.pop()
            if k in needed_by[name]:
                continue
            needed_by[name].add(k)
            todo += [r for r in reads[name] if r in needed_by and r != name]
    return reads, needed_by


def _shared_scale(rest, coef, printer) -> tuple | None:
    """(c, rest / c, coef / c, a symbol standing for c) when a label gradient
    ``rest + coef·δ`` has a scalar tensor factor c common to both terms, up to sign:
    ``(G / N)·P − (G / N)·δ`` computes ``scale = G / N`` once and reads ``scale * P`` and
    ``-scale`` (two torch calls fewer than ``(G / N) * P`` and ``(-G / N)``). None when
    coef reads an array or is a plain number (nothing to compute once)."""
    c = -coef if coef.could_extract_minus_sign() else coef
    if rest == 0 or c.has(sp.Indexed) or not printer._is_array(c) or \
            not set(sp.Mul.make_args(c)) <= set(sp.Mul.make_args(rest)):
        return None
    sym = sp.Dummy("scale", real=True)
    return c, sym * (rest / c), sym * (coef / c), sym


class Softmax:
    """A normalised exponential e = exp(f), Z = Σ_k e (k at position ``pos`` of e) that the
    kernel computes as softmax(f): ``prob`` and ``log`` are the bases of its probabilities
    and their logs (``alias``: the let P = e/Z whose name the probabilities take)."""

    def __init__(self, e: str, z: str, pos: int, prob: sp.IndexedBase):
        self.e, self.z, self.pos, self.prob = e, z, pos, prob
        self.alias: str | None = None
        self.log: sp.IndexedBase | None = None


class InPlace(str):
    """The code of an in-place update of a statement's array, written right after its name
    (``[torch.arange(N), y] -= G / N``), not as ``name = code``."""


def _fresh(code) -> bool:
    """Does ``code`` make a new array (arithmetic, a module function, an in-place method of
    a new array: ``((G / N) * P).mul_(w)``), not name or view an existing one (``P``,
    ``P.T``, ``G[:, None]``)? An in-place update may then write into it."""
    import ast

    node = ast.parse(code, mode="eval").body if isinstance(code, str) else code
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return True
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    receiver = node.func.value
    if isinstance(receiver, ast.Name):
        return receiver.id in ("np", "torch")
    return node.func.attr.endswith("_") and _fresh(receiver)


def _setup_lines(printer) -> list[str]:
    """The temporaries the printer bound for the statement it just lowered."""
    return [f"{name} = {code}" for name, code in printer.take_setup()]


def _used_temps(body: list[str], temps: set) -> list[str]:
    """``body`` without the lines that bind one of ``temps`` no later line reads (a view
    bound while trying a lowering that was not taken)."""
    kept: list[str] = []
    read: set = set()
    for line in reversed(body):
        name = line.split(" = ", 1)[0]
        if name in temps and name not in read:
            continue
        read |= _names_read(line.split(" = ", 1)[1] if " = " in line else line)
        kept.append(line)
    return kept[::-1]


def _used_sizes(body: list[str], count: int) -> list[str]:
    """``body`` without those of its first ``count`` lines (``N, D = X.shape``) whose sizes no
    later line reads (a derived size's line reads the sizes before it)."""
    later = set().union(set(), *(_names_read(line) for line in body[count:]))
    kept = []
    for line in reversed(body[:count]):
        names = [x.strip() for x in line.split("=")[0].split(",")]
        used = [k for k, x in enumerate(names) if x in later]
        if not used:
            continue
        value = line.split("=", 1)[1].strip()
        if len(used) < len(names) and value.endswith(".shape"):
            # N, D = X.shape with only D read: D = X.shape[1] (no unused N)
            kept += [f"{names[k]} = {value}[{k}]" for k in reversed(used)]
        else:
            kept.append(line)
        later |= _names_read(value)
    return kept[::-1] + body[count:]


def _formula_code(formula, names) -> str:
    """Python for a derived size, with integer division: ``(H + 2 * P - K) // S + 1``."""
    from sympy.printing.pycode import PythonCodePrinter

    class SizePrinter(PythonCodePrinter):
        def _print_floor(self, e):
            num, den = e.args[0].as_numer_denom()
            return f"({self._print(num)}) // {self.parenthesize(den, 100)}" if den != 1 \
                else self._print(num)

    syms = {s: sp.Symbol(names[str(s)]) for s in formula.free_symbols}
    code = SizePrinter().doprint(formula.xreplace(syms))
    return re.sub(r"(?<=\w)([*+-])(?=\w)", r" \1 ", code)


def _names_read(code: str) -> set[str]:
    """The Python names a line of generated code reads (attributes and strings excluded)."""
    import io
    import tokenize

    names, previous = set(), None
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.NAME and previous != ".":
            names.add(tok.string)
        previous = tok.string
    return names


def _is_position(value) -> bool:
    """An index expression such as Cg·g + q: integer indices and sizes, no tensor."""
    return not value.has(sp.Indexed) and bool(value.free_symbols) and all(
        s.is_integer for s in value.free_symbols) and any(
        not s.is_positive for s in value.free_symbols)


def _inline_index_terms(replacements, reduced):
    """Put back the common terms that hold a Kronecker delta δ(h, B·a + b) or that are a
    position B·a + b.

    A delta is not a value of its own: it says where its sum scatters (a scatter-add into
    h), so it has to stay a factor of the sum that reduces a and b; a position is read as
    an affine index (gamma[Cg·g + q]), not as a tensor of numbers."""
    inline, kept = {}, []
    for sym, value in replacements:
        value = value.xreplace(inline)
        if value.has(sp.KroneckerDelta) or _is_position(value):
            inline[sym] = value
        else:
            kept.append((sym, value))
    return kept, [e.xreplace(inline) for e in reduced]


def _bound_ranges(exprs) -> dict:
    """Index -> its number of values, for every index a sum in ``exprs`` binds."""
    out = {}
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, sp.Sum):
                for var, lo, hi in node.limits:
                    out.setdefault(var, sp.expand(hi - lo + 1))
    return out


def _canonical_bound(expr, depth: int = 0):
    """Bound indices renamed by their range and nesting depth, so that sums equal up to the
    name of their index (Σ_n G·x̂ in dX and Σ_n' G·x̂ in dγ) become one common term."""
    if isinstance(expr, sp.Sum):
        body, limits = expr.function, []
        for var, lo, hi in expr.limits:
            depth += 1
            new = sp.Symbol(f"{var.name.rstrip(chr(39))}_{depth}", integer=True)
            body = body.xreplace({var: new})
            limits.append((new, lo, hi))
        return sp.Sum(_canonical_bound(body, depth), *limits)
    if not expr.args or isinstance(expr, (sp.Indexed, sp.IndexedBase)):
        return expr
    return expr.func(*[_canonical_bound(a, depth) for a in expr.args])


def _cse_whole_masks(exprs) -> tuple[list, list]:
    """``sympy.cse`` of the gradients, each arg-max mask ``[body = max body]`` one unit.

    A mask compares its body with the maximum the forward computed, so the kernel must
    compute the body exactly as the forward did: a common term taken from inside it
    (``3 + s`` out of ``3 + W + s``, shared with another mask) adds in another order, and
    the comparison then fails where it should hold, dropping the arg-max's gradient
    (docs/fuzzing.md, finding 26). A mask may still be shared whole."""
    from gradtool.symbolic.ir import ArgMaxMask

    masks: dict = {}
    for e in exprs:
        for m in sorted(e.atoms(ArgMaxMask), key=sp.default_sort_key):
            masks.setdefault(m, sp.Dummy(f"mask{len(masks)}"))
    hidden = [e.xreplace(masks) for e in exprs] if masks else exprs
    replacements, reduced = sp.cse(hidden, symbols=sp.numbered_symbols("_t"),
                                   optimizations=None, order="none")
    replacements, reduced = _inline_outer_products(replacements, reduced)
    if not masks:
        return replacements, reduced
    back = {v: k for k, v in masks.items()}
    return [(sym, value.xreplace(back)) for sym, value in replacements], \
        [e.xreplace(back) for e in reduced]


def _inline_outer_products(replacements, reduced) -> tuple[list, list]:
    """Put back every common term of ``sympy.cse`` that is an outer product: a product with
    more free indices than any of its factors, such as ``G[n, e']·W1[e', e]`` shared by
    Σ_e' G·W1 and Σ_e' G·W1·h1². Named, it is an N×D×D array (2 GB at N = 256, D = 1024)
    that each sum then reduces; inline, each sum is a contraction the printers lower to a
    matrix product or einsum without it."""
    known: dict = {}  # a common term -> the free indices of its value (terms read others)
    outer = {}
    for sym, value in replacements:
        known[sym] = _free_indices(value, known)
        factors = [f for f in sp.Mul.make_args(value) if _free_indices(f, known)]
        if isinstance(value, sp.Mul) and len(factors) >= 2 and \
                len(known[sym]) > max(len(_free_indices(f, known)) for f in factors):
            outer[sym] = value
    if not outer:
        return replacements, reduced
    kept = []
    for sym, value in replacements:
        value = value.xreplace(outer)
        if sym in outer:
            outer[sym] = value  # later terms read the inlined value
        else:
            kept.append((sym, value))
    return kept, [e.xreplace(outer) for e in reduced]


def _free_indices(expr, known: dict) -> set:
    """The index symbols ``expr`` reads (directly, or through the common terms in ``known``)
    that no sum inside it binds."""
    read = {s for a in expr.atoms(sp.Indexed) for i in a.indices for s in i.free_symbols}
    read |= {i for s in expr.free_symbols if s in known for i in known[s]}
    bound = {v for node in sp.preorder_traversal(expr) if isinstance(node, sp.Sum)
             for v in node.variables}
    return read - bound


def _shared_products(exprs, taken) -> tuple[list, dict]:
    """Name an element-wise product that sums in different gradients share up to the names
    of their indices: Σ_d' G[n,d']·γ[d']·x̂[n,d'] and Σ_n' G[n',d]·x̂[n',d] both read G·x̂,
    which is then computed once (and the first sum becomes a matrix-vector product)."""
    found: dict = {}  # product with positional indices -> {sum that reads it: its indices}
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, sp.Sum):
                for idx, core in _same_index_products(node.function).items():
                    found.setdefault(_positional(core, idx), {}).setdefault(node, idx)
    products, bases = {}, {}
    for key, uses in found.items():
        if len(uses) < 2:  # one sum, maybe repeated: the usual common-term pass covers it
            continue
        idx = next(iter(uses.values()))
        value = key.xreplace({p: s for p, s in zip(_PLACES, idx)})
        name = _temp_name(value, taken)
        taken = taken | {name}
        products[name] = (value, idx)
        bases[key] = sp.IndexedBase(name)
    if not products:
        return exprs, {}

    def rewrite(e):
        if isinstance(e, sp.Sum):
            body = rewrite(e.function)
            for idx, core in _same_index_products(body).items():
                base = bases.get(_positional(core, idx))
                if base is not None:
                    body = body / core * base[idx]
            return sp.Sum(body, *e.limits)
        if not e.args or isinstance(e, sp.Indexed):
            return e
        return e.func(*[rewrite(a) for a in e.args])

    return [rewrite(e) for e in exprs], products


_PLACES = tuple(sp.Symbol(f"_p{k}", integer=True) for k in range(8))


def _positional(core, idx):
    """``G[n,d]·x̂[n,d]`` and ``G[n',d]·x̂[n',d]`` both as ``G[_p0,_p1]·x̂[_p0,_p1]``."""
    return core.xreplace(dict(zip(idx, _PLACES)))


def _same_index_products(body) -> dict:
    """Index tuple -> the product of two or more factors of ``body`` that read a tensor with
    exactly that tuple (of distinct plain indices)."""
    groups: dict = {}
    for f in sp.Mul.make_args(body):
        if isinstance(f, sp.Indexed) and 2 <= len(f.indices) <= len(_PLACES) and \
                len(set(f.indices)) == len(f.indices) and all(i.is_Symbol for i in f.indices):
            groups.setdefault(tuple(f.indices), []).append(f)
    return {idx: sp.Mul(*fs) for idx, fs in groups.items() if len(fs) >= 2}


def _temp_name(value, taken) -> str:
    """Name a common subexpression after its math: ``G_gamma``, ``sum_G_gamma_xhat``."""
    names = [a.base.label.name for a in sorted(value.atoms(sp.Indexed), key=str)]
    stem = "_".join(dict.fromkeys(names)) or "t"
    if isinstance(value, sp.Sum):
        stem = "sum_" + stem
    stem = stem[:30]
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    return name


# -- whole modules -----------------------------------------------------------------------------

def _source_name(spec: Spec) -> str:
    """``specs/<name>.py`` for a built-in (the same on every machine), else the path given."""
    from pathlib import Path

    from gradtool.spec.loader import builtin_dir

    if not spec.file:
        return spec.name
    path = Path(spec.file).resolve()
    if path.parent == builtin_dir().resolve():
        return f"specs/{path.name}"
    return spec.file


def _doc(text: str) -> str:
    """``text`` safe inside a triple-quoted docstring: backslashes and quotes escaped."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _seed_texts(d: Derivation) -> dict[str, str]:
    """Output -> the name of its upstream gradient (none for a loss)."""
    return {out: d.upstream_names[out] for out, seed in d.seeds.items() if seed != 1}


def _header(spec: Spec, d: Derivation, target: str) -> list[str]:
    source = _source_name(spec)
    lines = [f"# @generated from {source} by gradtool {__version__} ({target}); do not edit",
             f'"""{spec.name}: {_doc(spec.description)}', "", "Forward:"]
    lines += ["    " + r["text"] for r in _forward(d)]
    seeds = [f"{s} = ∂L/∂{out}" for out, s in _seed_texts(d).items()]
    lines += ["", f"Backward ({'; '.join(seeds)}):" if seeds else "Backward (L is the output):"]
    lines += ["    " + r["text"] for r in _gradients(d, list(d.named)) + _gradients(d)]
    lines.append('"""')
    return lines


def generate(spec: Spec | str, target: str = "numpy") -> str:
    """Readable, deterministic source for ``spec`` on ``target`` (numpy or torch)."""
    if target not in TARGETS:
        raise CodegenError(f"unknown code target {target!r}", hint="use numpy or torch")
    if isinstance(spec, str):
        from gradtool.spec.loader import load_spec

        spec = load_spec(spec)
    d = derive(spec)
    m = Module(d, target)
    fwd = m.forward()
    bwd = m.backward()
    folds = m.folds()
    if folds:  # again, without the padded copies that no line reads any more
        read = set().union(*(_names_read(line) for line in fwd[1:] + bwd[1:]
                             if not line.strip().startswith(("return ", "def ")) and
                             '"""' not in line and
                             not any(line.strip().startswith(f"{m.names[t]} = ")
                                     for t in folds)))
        m = Module(d, target, frozenset(t for t in folds if m.names[t] not in read))
        fwd = m.forward()
        bwd = m.backward()
    cls = _numpy_class(m) if target == "numpy" else _torch_classes(m)
    imports = set(m.imports)
    if target == "torch":
        imports.add("import torch")
    helpers = []
    if m.helpers:
        from importlib import import_module

        sources = import_module(f"gradtool.codegen.{target}_target").HELPERS
        for h in sorted(m.helpers):
            helpers += sources[h].splitlines() + ["", ""]
    # the module imports what its lines use (the class may draw no random numbers)
    if target == "numpy" and any("np." in line for line in fwd + bwd + cls + helpers):
        imports.add("import numpy as np")
    out = _header(spec, d, target) + [""] + _import_block(imports) + ["", ""] + helpers + fwd \
        + ["", ""] + bwd + ["", ""] + cls
    return "\n".join(_wrap_lines(out)) + "\n"


LINE_LENGTH = 100  # PEP 8's limit for teams that agree on a longer line; the project's own


def _wrap_lines(lines: list[str], width: int = LINE_LENGTH) -> list[str]:
    """Every line within ``width`` characters: docstring text and comments wrapped at spaces,
    statements broken inside their brackets (:func:`_wrap_statement`). Each generated
    statement is one line, and a docstring opens and closes with ``\"\"\"``."""
    import textwrap

    out, in_doc = [], False
    for line in lines:
        quotes = line.count('"""')
        is_text = in_doc or quotes > 0
        if quotes % 2:
            in_doc = not in_doc
        stripped = line.lstrip()
        indent = line[:len(line) - len(stripped)]
        if not is_text and not stripped.startswith("#"):
            line = _drop_extra_parens(line)
            stripped = line.lstrip()
        if len(line) <= width:
            out.append(line)
        elif is_text or stripped.startswith("#"):
            lead = "# " if stripped.startswith("#") and not is_text else ""
            body = stripped[len(lead):]
            # a paragraph opening a docstring goes on at its indent, a formula inside one
            # four spaces further
            more = indent + lead + ("" if lead or stripped.startswith('"""') else "    ")
            out += textwrap.wrap(body, width, initial_indent=indent + lead,
                                 subsequent_indent=more, break_long_words=False,
                                 break_on_hyphens=False)
        else:
            out += _wrap_statement(stripped, indent, width)
    return out


def _drop_extra_parens(line: str) -> str:
    """``f((x))`` as ``f(x)`` and ``((x))`` as ``(x)``: parentheses that hold a call's whole
    and only argument, or a parenthesised operand once more (an operand printed for a product,
    then passed on: ``.mul_((1 - t ** 2))``), add nothing. A tuple ``f((a, b))`` keeps them."""
    import io
    import keyword
    import tokenize

    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(line).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError):
        return line
    match, stack = {}, []
    for k, t in enumerate(tokens):
        if t.type == tokenize.OP and t.string in "([{":
            stack.append(k)
        elif t.type == tokenize.OP and t.string in ")]}" and stack:
            match[stack.pop()] = k
    drop = set()
    for k, t in enumerate(tokens[:-1]):
        inner = k + 1
        if t.string != "(" or tokens[inner].string != "(" or match.get(inner) is None or \
                match.get(k) != match[inner] + 1 or match[inner] == inner + 1:
            continue
        call = k > 0 and (tokens[k - 1].type == tokenize.NAME and not keyword.iskeyword(
            tokens[k - 1].string) or tokens[k - 1].string in ")]")
        depth, comma = 0, False  # a comma directly inside makes a tuple
        for u in tokens[inner + 1:match[inner]]:
            depth += u.string in "([{" and u.type == tokenize.OP
            depth -= u.string in ")]}" and u.type == tokenize.OP
            comma |= depth == 0 and u.string == ","
        if not (call and comma):  # ((x)) is (x); f((a, b)) passes a tuple
            drop |= {inner, match[inner]}
    if not drop:
        return line
    chars = list(line)
    for k in sorted(drop, reverse=True):
        chars[tokens[k].start[1]] = ""
    return "".join(chars)


# binary operators a line may break before, by how loosely they bind (a comma: 0)
_OPERATORS = {"if": 1, "else": 1, "or": 1, "and": 1, "+": 2, "-": 2, "*": 3, "/": 3, "//": 3,
              "@": 3, "%": 3, "**": 4}


def _break_points(text: str) -> list[tuple[int, int, int, int, bool, bool]]:
    """(position, bracket depth, how loosely the operator there binds, position of the
    enclosing bracket, right after it, inside a subscript) for each place where a statement
    may continue on the next line: after an opening bracket, after a comma and before a
    binary operator. Places inside a subscript are a last resort (:func:`_wrap_statement`):
    ``x[:, None]`` stays whole unless a gather's index alone is too long for a line. Depth 0
    holds the operators outside every bracket, where no break is."""
    import io
    import tokenize

    points, stack, previous = [], [], None
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        start, end = tok.start[1], tok.end[1]  # one line: columns are positions
        subscript = any(b == "[" for b, _ in stack)
        if tok.string in _OPERATORS and previous is not None and \
                (previous.type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING)
                 or previous.string in (")", "]", "}")):
            points.append((start, len(stack), _OPERATORS[tok.string],
                           stack[-1][1] if stack else -1, False, subscript))
        if tok.string in "([{" and tok.type == tokenize.OP:
            stack.append((tok.string, start))
            points.append((end, len(stack), 0, start, True,
                           any(b == "[" for b, _ in stack)))
        elif tok.string in ")]}" and tok.type == tokenize.OP and stack:
            stack.pop()
        elif tok.string == "," and stack:
            points.append((end, len(stack), 0, stack[-1][1], False, subscript))
        previous = tok
    return points


def _wrap_statement(text: str, indent: str, width: int) -> list[str]:
    """One statement over several lines within ``width``, broken inside its brackets (a bare
    right-hand side is put in parentheses first), as PEP 8 writes continuation lines: each
    line ends at the farthest break point of the least bracket depth that fits; the next one
    starts under the first character inside the enclosing bracket, or, after a bracket that
    ends a line (or one too far right), four spaces further in per depth."""
    points = _break_points(text)
    head, sep, rhs = text.partition(" = ") if " = " in text else text.partition("return ")
    # a right-hand side that is a sum outside brackets, or with no place to break, in
    # parentheses: its terms then break first
    if sep and rhs and (any(p[1] == 0 and p[2] <= 2 for p in points) or not [
            p for p in points if len(indent) + p[0] <= width and not p[5]]):
        text = f"{head}{sep}({rhs})"
        points = _break_points(text)
    points = [p for p in points if p[1] > 0]
    subscripts = [p for p in points if p[5]]  # a last resort: a gather's long index
    points = [p for p in points if not p[5]]
    lines, start, lead = [], 0, indent
    starts = [(0, len(indent))]  # (position where an output line starts, its indent)
    hanging: dict[int, int] = {}  # bracket that ended a line -> the indent of what follows

    def column(pos: int) -> int:
        line_start, lead_len = max(x for x in starts if x[0] <= pos)
        return lead_len + pos - line_start

    while len(lead) + len(text) - start > width:
        fitting = [p for p in points if start < p[0] < len(text)
                   and len(lead) + p[0] - start <= width
                   and text[start:p[0]].strip()]
        if not fitting:
            fitting = [p for p in subscripts if start < p[0] < len(text)
                       and len(lead) + p[0] - start <= width
                       and text[start:p[0]].strip()]
        if not fitting:
            later = [p for p in points if p[0] > start and text[start:p[0]].strip()]
            if not later:
                break
            fitting = later[:1]
        # the farthest break of the least depth and loosest operator that leaves a line of
        # at least 40% of the room or opens the outermost bracket (else the farthest of the
        # best kind)
        room = width - len(lead)
        kinds = sorted({p[1:3] for p in fitting})
        best = [max(p for p in fitting if p[1:3] == kind) for kind in kinds]
        pos, depth, _, bracket, after_open, _ = next(
            (p for p in best if p[0] - start >= 0.4 * room or (p[4] and p[1] == 1)), best[0])
        lines.append(lead + text[start:pos].rstrip())
        start = pos
        while start < len(text) and text[start] == " ":
            start += 1
        visual = column(bracket) + 1
        if after_open or width - visual < 50:
            col = hanging.setdefault(bracket, len(indent) + 4 * depth)
        else:
            col = hanging.get(bracket, visual)
        lead = " " * col
        starts.append((start, col))
    lines.append(lead + text[start:])
    return lines


def _import_block(imports: set[str]) -> list[str]:
    """The import lines as isort writes them: the standard library, a blank line, then
    third-party modules; in each, ``import x`` before ``from x import y``, by module."""
    import sys

    def module(line: str) -> str:
        return line.split()[1]

    def group(lines) -> list[str]:
        return sorted(lines, key=lambda line: (line.startswith("from"), module(line)))

    std = [x for x in imports if module(x).split(".")[0] in sys.stdlib_module_names]
    rest = [x for x in imports if x not in std]
    return group(std) + ([""] if std and rest else []) + group(rest)


def _saved_note(m: Module) -> str:
    """Which gradients' kernel lines read each saved tensor (a lowering may read fewer than
    the closed form: max pooling's backward reads X and the forward's argmax, not Y)."""
    grads = list(m.grad_names.values())
    parts = []
    for s in m.saved_names():
        readers = [grads[k] for k in sorted(m.saved_need.get(s, ()))]
        parts.append(f"{s} ({', '.join(readers) or 'not read by this backward'})")
    return "saved for backward, by the gradients that read them: " + (", ".join(parts) or
                                                                     "nothing")


def _size_code(dim, names) -> str:
    """Python for a size: ``K`` or, for an axis such as gamma's G·Cg, ``(Cg * G)``."""
    if str(dim) in names:
        return names[str(dim)]
    from sympy.printing.pycode import PythonCodePrinter

    dim = dim.xreplace({s: sp.Symbol(names[str(s)]) for s in dim.free_symbols})
    return f"({PythonCodePrinter().doprint(dim)})"


def _init_code(t, target: str, names) -> str:
    sizes = [_size_code(x, names) for x in t.dims]
    shp = f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"
    fan_in = " * ".join(sizes[1:]) or (sizes[0] if t.dims else "1")
    fan_out = sizes[0] if t.dims else "1"
    fan_in_div = fan_in if fan_in.isidentifier() or fan_in.isdigit() else f"({fan_in})"
    bound = {"uniform": f"1 / math.sqrt({fan_in})",
             "kaiming_uniform": f"math.sqrt(6 / {fan_in_div})",
             "xavier_uniform": f"math.sqrt(6 / ({fan_in} + {fan_out}))"}.get(t.init)
    if target == "torch":
        base = {"zeros": f"torch.zeros({shp}, dtype=dtype)",
                "ones": f"torch.ones({shp}, dtype=dtype)",
                "normal": f"torch.randn({shp}, dtype=dtype)"}.get(t.init)
        return base or f"torch.empty({shp}, dtype=dtype).uniform_(-{bound}, {bound})"
    base = {"zeros": f"np.zeros({shp})", "ones": f"np.ones({shp})",
            "normal": f"rng.standard_normal({shp})"}.get(t.init)
    return base or f"rng.uniform(-{bound}, {bound}, {shp})"


# a hyper-parameter's declared domain as a condition on its variable (none for "real")
_DOMAIN_TESTS = {"positive": "{x} > 0", "nonnegative": "{x} >= 0", "nonzero": "{x} != 0",
                 "unit": "0 <= {x} <= 1"}


def _domain_checks(m: Module, hypers: list[str]) -> list[str]:
    """Constructor lines that refuse a hyper-parameter outside its declared domain, as
    ``Spec.check_hypers`` does for gradtool's own layers: the kernels were derived for values
    in it only (a positive eps lets the simplifier take |eps| as eps)."""
    lines = []
    for h in hypers:
        domain = m.spec.hypers[h].domain
        if domain not in _DOMAIN_TESTS:
            continue
        x = m.names[h]
        test = _DOMAIN_TESTS[domain].format(x=x)
        lines += [f"        if not {test}:  # spec.hyper(\"{h}\", ..., domain=\"{domain}\")",
                  f'            raise ValueError(f"{h} = {{{x}!r}}: these kernels need {test}")']
    return lines


def _ctor_dims(m: Module) -> list[str]:
    """The sizes the layer's constructor takes, in the order the spec declares them (linear's
    ``N I O``: ``Linear(I, O)``, as ``Linear(784, 256)`` in course code; conv2d's
    ``C, O, K, S, P`` as torch's ``Conv2d(in_channels, out_channels, kernel_size, stride,
    padding)``): the parameters' and state's sizes and those the forward cannot read off
    its inputs."""
    owned = [t for t in m.inputs if t.kind in ("param", "state")]
    needed = {str(s) for t in owned for x in t.dims for s in sp.sympify(x).free_symbols}
    needed |= set(m.forward_missing)
    return [m.names[name] for name in m.spec.dim_symbols if name in needed]


def _size_source(m: Module, dim: str, tensor=None, given=None) -> str:
    """Where the layer's forward finds a size the backward needs: an input's shape, else the
    size it was given. ``tensor`` and ``given`` write a tensor and a given size as the caller
    reads them (the NumPy class: ``self.params["W"]``, ``self.S``); default their names."""
    sym = m.spec.dim_symbols[dim]
    for t in m.inputs:
        if sym in t.dims:
            code = tensor(t) if tensor else m.names[t.name]
            return f"{code}.shape[{t.dims.index(sym)}]"
    return given(dim) if given else m.names[dim]


def _unpack(grads: list[str]) -> str:
    """``dX, dW = `` before a call of the generated backward; nothing when it returns ()."""
    return f"{', '.join(grads)}{',' if len(grads) == 1 else ''} = " if grads else ""


def _numpy_class(m: Module) -> list[str]:
    spec, names = m.spec, m.names
    cname = class_name(spec)
    params = [t for t in m.inputs if t.kind == "param"]
    states = [t for t in m.inputs if t.kind == "state"]
    data = [t for t in m.inputs if t.kind == "input"]
    hypers = list(spec.hypers)
    # sizes and hyper-parameters by position or by name; the generator only by name
    ctor = ["self"] + _ctor_dims(m) + [f"{names[h]}={spec.hypers[h].default!r}"
                                       for h in hypers] + ["*", "rng=None"]
    given = [names[x] for x in m.forward_missing]
    lines = [f"class {cname}:",
             f'    """{_doc(spec.description)} (NumPy, forward/backward in the style of course '
             "assignments). Parameters live in ``params``, their gradients in ``grads`` after "
             '``backward``; state buffers in ``state``."""', "",
             f"    def __init__({', '.join(ctor)}):"]
    lines += _domain_checks(m, hypers)
    if any(t.init not in ("zeros", "ones") for t in params + states):  # a random draw
        lines.append("        rng = np.random.default_rng() if rng is None else rng")
    if any(t.init in ("uniform", "kaiming_uniform", "xavier_uniform") for t in params + states):
        m.imports.add("import math")
    for h in hypers + m.forward_missing:
        lines.append(f"        self.{names[h]} = {names[h]}")
    lines.append("        self.params = {" + ", ".join(
        f'"{t.name}": {_init_code(t, "numpy", names)}' for t in params) + "}")
    lines.append("        self.state = {" + ", ".join(
        f'"{t.name}": {_init_code(t, "numpy", names)}' for t in states) + "}")
    lines.append("        self.grads = {" + ", ".join(
        f'"{t.name}": np.zeros_like(self.params["{t.name}"])' for t in params) + "}")
    lines += ["        self._saved = None", ""]
    args = [names[t.name] for t in data]
    call = []
    for t in m.inputs:
        if t.kind == "input":
            call.append(names[t.name])
        elif t.kind == "param":
            call.append(f'self.params["{t.name}"]')
        else:
            call.append(f'self.state["{t.name}"]')
    fwd_kw = [f"{x}=self.{x}" for x in given] + [f"{names[h]}=self.{names[h]}" for h in
                                                    m._hypers_in([a.rhs(m.d.program)
                                                                  for a in m.d.program.assigns])]
    lines.append(f"    def forward(self, {', '.join(args)}):")
    res = "out, self._saved" + (", new_state" if m.updates else "")
    lines.append(f"        {res} = forward({', '.join(call + fwd_kw)})")
    if m.backward_dims:
        def tensor(t) -> str:  # as the class's forward reads it
            if t.kind == "input":
                return names[t.name]
            return f'self.{"params" if t.kind == "param" else "state"}["{t.name}"]'

        sizes = ", ".join(f'"{x}": ' + _size_source(m, x, tensor, lambda dim: f"self.{names[dim]}")
                          for x in m.backward_dims)
        lines.append(f"        self._sizes = {{{sizes}}}")
    if m.updates:
        for k, a in enumerate(m.updates):
            lines.append(f'        self.state["{a.target}"] = new_state[{k}]')
    lines += ["        return out", ""]
    seeds = [names[m.seed_names[o.target]] for o in m.outputs if o.target in m.seed_names]
    scalar = all(m.d.seeds[o.target] == 1 for o in m.outputs if o.target in m.d.seeds)
    sig = ", ".join(f"{s}=1.0" if scalar else s for s in seeds)
    bwd_kw = [f"{names[h]}=self.{names[h]}" for h in m._hypers_in(
        [e for _, e, _ in m.closed_forms()])]
    bwd_kw += [f'{names[x]}=self._sizes["{x}"]' for x in m.backward_dims]
    lines.append(f"    def backward(self, {sig}, *, need=None):")
    pg = [t for t in m.grads if t.kind == "param"]
    ig = [m.grad_names[t.name] for t in m.grads if t.kind == "input"]
    lines += [f'        """The gradients of the input{"s" if len(ig) > 1 else ""} (returned) '
              "and of the parameters (in ``grads``).",
              "        ``need``: names of the inputs and parameters whose gradients to compute "
              "(default all);",
              '        the others are not computed: None for an input, left out of ``grads``."""']
    grads = [m.grad_names[t.name] for t in m.grads]
    order = ", ".join(f'"{t.name}"' for t in m.grads) + ("," if len(m.grads) == 1 else "")
    m.helpers.add("need_flags")
    lines.append(f"        {_unpack(grads)}"
                 f"backward({', '.join(seeds + ['*self._saved'] + bwd_kw)}, "
                 f"need=need_flags(need, ({order})))")
    if pg:
        pairs = ", ".join(f'("{t.name}", {m.grad_names[t.name]})' for t in pg) + \
            ("," if len(pg) == 1 else "")
        lines.append(f"        self.grads = {{name: grad for name, grad in ({pairs}) "
                     "if grad is not None}")
    else:
        lines.append("        self.grads = {}")
    lines.append("        return " + (", ".join(ig) if ig else "None"))
    return lines


def _higher_order_guard(m: Module) -> list[str]:
    """The lines that open a torch Function's backward whose own gradient would be wrong: it
    reads forward intermediates (``let`` tensors such as layer norm's x̂ and rstd), which the
    Function saves as constants, so differentiating the backward (``create_graph=True``:
    gradient penalties, Hessians) would miss every term through them and give silently wrong
    second derivatives. Under ``create_graph=True`` torch runs backward with grad mode on; the
    guard then raises. A backward that reads only inputs, parameters, state and outputs (which
    autograd connects to the graph), and intermediates only through piecewise-constant
    functions (:func:`_read_smoothly`), gets none: its higher-order gradients are exact."""
    kinds = {name: t.kind for name, t in m.spec.tensors.items()}
    forms = [e for _, e, _ in m.closed_forms()]
    lets = [s for s in m.saved() if kinds.get(s) not in ("input", "param", "state", "output")
            and any(_read_smoothly(e, s) for e in forms)]
    if not lets:
        return []
    read = ", ".join(m.names[s] for s in lets)
    text = (f"{m.spec.name}'s generated backward cannot be differentiated again "
            f"(create_graph=True): it reads {read} from the forward as constants, so the "
            "gradient of this gradient would be wrong; for higher-order gradients use torch's "
            "own layer, or torch.autograd through the generated module-level forward()")
    parts = textwrap.wrap(text, 72, drop_whitespace=False)
    return ["        if torch.is_grad_enabled():  # create_graph=True: backward is differentiated",
            "            raise RuntimeError(",
            *[f"                {json.dumps(part)}" for part in parts[:-1]],
            f"                {json.dumps(parts[-1])})"]


def _read_smoothly(expr, name: str) -> bool:
    """Does ``expr`` read the tensor ``name`` where its value moves the result: anywhere but
    inside a piecewise-constant function of it (max pooling's ``ArgMaxMask``, a Kronecker δ,
    Heaviside, sign, floor, ceiling, a comparison, a Piecewise condition), whose derivative is
    zero wherever it exists? A let read only so (max pooling's padded input, read through
    the argmax) makes the backward's own derivative no less exact when it is a constant."""
    from gradtool.symbolic.ir import ArgMaxMask

    if isinstance(expr, (ArgMaxMask, sp.KroneckerDelta, sp.Heaviside, sp.sign, sp.floor,
                         sp.ceiling, sp.core.relational.Relational)):
        return False
    if isinstance(expr, sp.Indexed):
        return access_name(expr) == name or any(_read_smoothly(i, name) for i in expr.indices)
    if isinstance(expr, sp.Symbol):
        return expr.name == name  # a 0-d let (softmax's peak)
    if isinstance(expr, sp.Piecewise):
        return any(_read_smoothly(value, name) for value, _ in expr.args)
    return any(_read_smoothly(a, name) for a in expr.args)


def _torch_classes(m: Module) -> list[str]:
    spec, names = m.spec, m.names
    cname = class_name(spec)
    hypers = list(spec.hypers)
    fwd_args = [names[t.name] for t in m.inputs] + [names[h] for h in hypers] \
        + [names[x] for x in m.forward_missing]
    fwd_hyp = m._hypers_in([a.rhs(m.d.program) for a in m.d.program.assigns])
    bwd_hyp = m._hypers_in([e for _, e, _ in m.closed_forms()])
    lines = ["def use_torch_compile(**options):",
             '    """Fuse forward and backward with torch.compile (optional; on CPU it needs a C++',
             "    compiler). The autograd.Function and the module below use the compiled versions",
             '    from then on."""',
             "    global forward, backward",
             "    forward = torch.compile(forward, **options)",
             "    backward = torch.compile(backward, **options)", "", "",
             f"class {cname}Function(torch.autograd.Function):",
             f'    """autograd.Function for {spec.name}: backward is gradtool\'s closed form."""',
             "", "    @staticmethod", f"    def forward(ctx, {', '.join(fwd_args)}):"]
    call = [names[t.name] for t in m.inputs] + [f"{names[h]}={names[h]}" for h in fwd_hyp] \
        + [f"{names[x]}={names[x]}" for x in m.forward_missing]
    res = "out, saved" + (", new_state" if m.updates else "")
    lines.append(f"        {res} = forward({', '.join(call)})")
    for k, a in enumerate(m.updates):
        lines.append(f"        {names[a.target]}.copy_(new_state[{k}])")
    lines.append(f"        # {_saved_note(m)}")
    positions = [m.inputs.index(t) for t in m.grads]
    every = set(range(len(m.grads)))
    keep = ["True" if m.saved_need[s] == every else
            " or ".join(f"need[{positions[k]}]" for k in sorted(m.saved_need[s]))
            or "False" for s in m.saved_names()]
    if all(k == "True" for k in keep):
        lines.append("        ctx.save_for_backward(*saved)")
    else:  # a tensor only an unrequested gradient reads is not kept alive
        if any("need[" in k for k in keep):
            lines.append("        need = ctx.needs_input_grad")
        lines += [f"        keep = ({', '.join(keep)}{',' if len(keep) == 1 else ''})",
                  "        ctx.save_for_backward(*[t if k else None for t, k in zip(saved, keep)])"]
    for h in bwd_hyp:
        lines.append(f"        ctx.{names[h]} = {names[h]}")
    for x in m.backward_dims:
        lines.append(f"        ctx.{names[x]} = {_size_source(m, x)}")
    lines += ["        return out", ""]
    seeds = [names[m.seed_names[o.target]] for o in m.outputs if o.target in m.seed_names]
    lines += ["    @staticmethod", f"    def backward(ctx, {', '.join(seeds)}):"]
    lines += _higher_order_guard(m)
    kw = [f"{names[h]}=ctx.{names[h]}" for h in bwd_hyp] + \
        [f"{names[x]}=ctx.{names[x]}" for x in m.backward_dims]
    grads = [m.grad_names[t.name] for t in m.grads]
    if positions == list(range(len(positions))):
        need = f"ctx.needs_input_grad[:{len(positions)}]"
    else:
        need = "(" + ", ".join(f"ctx.needs_input_grad[{p}]" for p in positions) + \
            ("," if len(positions) == 1 else "") + ")"
    lines.append(f"        {_unpack(grads)}"
                 f"backward({', '.join(seeds + ['*ctx.saved_tensors'] + kw)}, need={need})")
    ret = []
    for t in m.inputs:
        ret.append(m.grad_names[t.name] if t in m.grads else "None")
    ret += ["None"] * (len(hypers) + len(m.forward_missing))
    lines.append(f"        return {', '.join(ret)}")
    lines += ["", ""]
    # the module
    params = [t for t in m.inputs if t.kind == "param"]
    states = [t for t in m.inputs if t.kind == "state"]
    data = [t for t in m.inputs if t.kind == "input"]
    ctor = ["self"] + _ctor_dims(m) + [f"{names[h]}={spec.hypers[h].default!r}"
                                       for h in hypers] + ["*", "dtype=torch.float32"]
    if any(t.init in ("uniform", "kaiming_uniform", "xavier_uniform") for t in params + states):
        m.imports.add("import math")
    lines += [f"class {cname}(torch.nn.Module):",
              f'    """{_doc(spec.description)}: parameters initialised as the spec says."""', "",
              f"    def __init__({', '.join(ctor)}):", "        super().__init__()"]
    lines += _domain_checks(m, hypers)
    for h in hypers + m.forward_missing:
        lines.append(f"        self.{names[h]} = {names[h]}")
    for t in params:
        lines.append(f"        self.{names[t.name]} = torch.nn.Parameter("
                     f"{_init_code(t, 'torch', names)})")
    for t in states:
        lines.append(f'        self.register_buffer("{names[t.name]}", '
                     f"{_init_code(t, 'torch', names)})")
    lines += ["", f"    def forward(self, {', '.join(names[t.name] for t in data)}):"]
    args = [names[t.name] if t.kind == "input" else f"self.{names[t.name]}" for t in m.inputs]
    args += [f"self.{names[h]}" for h in hypers + m.forward_missing]
    lines.append(f"        return {cname}Function.apply({', '.join(args)})")
    return lines
