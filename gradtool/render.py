"""Rich terminal rendering of a derivation report (see :func:`gradtool.report.derive_report`)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def _lines(rows, key: str) -> Text:
    out = Text()
    for k, r in enumerate(rows):
        if k:
            out.append("\n")
        out.append(r[key])
    return out


def render_latex(console: Console, report: dict) -> None:
    """Plain LaTeX lines, one equation each, ready to paste into a document."""
    out = [f"% {report['spec']}: {report['description']}", "% forward"]
    out += [r["latex"] for r in report["forward"]]
    out.append("% backward")
    out += [g["latex"] for g in report.get("intermediates", []) + report["gradients"]]
    for jac in report.get("jacobians", []):
        out.append(f"% Jacobian d{jac['output']}/d{jac['wrt']}")
        out.append(jac["latex"])
        if "matrix_latex" in jac:
            out.append(jac["matrix_latex"])
    if report.get("steps"):
        out.append("% chain rule, from the outputs back")
    for step in report.get("steps", []):
        out.append(step["latex"])
    for line in out:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def render_derivation(console: Console, report: dict, latex: bool = False) -> None:
    if latex:
        render_latex(console, report)
        return
    key = "text"
    title = f"[bold cyan]{escape(report['spec'])}[/] — {escape(report['description'])}"
    console.print(title)
    console.print(f"[dim]{escape(str(report['file']))}[/]")
    console.print(Panel(_lines(report["forward"], key), title="forward", title_align="left",
                        border_style="blue"))

    seeds = ", ".join(f"{s} = ∂L/∂{out}" for out, s in report["seeds"].items() if s != "1")
    note = "dX = ∂L/∂X" + (f"; {seeds}" if seeds else "; L is the output itself")
    body = Text()
    for k, g in enumerate(report.get("intermediates", []) + report["gradients"]):
        if k:
            body.append("\n")
        body.append(g[key], style="bold")
        if g["matrix"]:
            body.append("\n    matrix: ", style="dim")
            body.append(g["matrix"])
    console.print(Panel(body, title=f"backward  [dim]({escape(note)})[/]", title_align="left",
                        border_style="green"))

    for jac in report.get("jacobians", []):
        head = f"Jacobian ∂{jac['output']}/∂{jac['wrt']}"
        content = Text(jac["text"])
        console.print(Panel(content, title=head, title_align="left", border_style="magenta"))
        if "matrix" in jac:
            table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
            table.add_column("")
            for col in jac["columns"]:
                table.add_column(col, justify="center")
            for name, row in zip(jac["rows"], jac["matrix"], strict=True):
                table.add_row(name, *row)
            console.print(table)

    if "steps" in report:
        table = Table(title="chain rule, from the outputs back", title_justify="left",
                      show_lines=True)
        table.add_column("adjoint", style="bold")
        table.add_column("contributions (rule)")
        for step in report["steps"]:
            parts = Text()
            if step["seed"]:
                parts.append("upstream gradient of an output\n", style="dim")
            for c in step["contributions"]:
                parts.append(f"from {c['from']}: ", style="cyan")
                parts.append(c["local"] + "\n")
                parts.append(f"  {c['rule']}\n", style="dim")
            table.add_row(Text(step[key]), parts)
        console.print(table)


def _num(x) -> str:
    if x is None:
        return ""
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    return f"{x:.3g}"


def _pair(a, b) -> tuple[str, str]:
    """``a`` and ``b`` with enough significant figures to tell them apart (3 to 17)."""
    if a is None or b is None or a != a or b != b:
        return _num(a), _num(b)
    for digits in range(3, 18):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb or a == b:
            return sa, sb
    return sa, sb


def render_check(console: Console, rows: list, show: str = "all") -> None:
    """The check table: one row per (spec, shape, input, oracle); failures in red."""
    failed = [r for r in rows if not r.passed]
    if show != "summary":
        chosen = failed if show == "failed" else rows
        # a log file or a pipe gets every column at full width; a narrow terminal gets the
        # columns that fit (the failures are spelled out in full below the table anyway)
        width = console.width if console.is_terminal else max(console.width, 220)
        compact = width < 150
        table = Table(show_lines=False)
        columns = [("spec", {"style": "cyan"}), ("shape", {}), ("input", {}), ("oracle", {}),
                   ("max abs err", {"justify": "right"}), ("max rel err", {"justify": "right"}),
                   ("worst element", {}), ("ours", {"justify": "right"}),
                   ("oracle value", {"justify": "right"}), ("allowed", {"justify": "right"}),
                   ("", {}), ("note", {"style": "dim"})]
        keep = {"spec", "shape", "input", "oracle", "max rel err", "worst element", ""} \
            if compact else {c for c, _ in columns}
        for col, kw in columns:
            if col in keep:
                table.add_column(col, **kw)
        for r in chosen:
            mark = Text("pass", style="green") if r.passed else Text("FAIL", style="bold red")
            index = "" if r.index is None else "[" + ",".join(map(str, r.index)) + "]"
            ours, theirs = _pair(r.analytic, r.numeric)
            cells = dict(zip((c for c, _ in columns), (
                r.spec, r.shape, r.input, r.oracle, _num(r.max_abs), _num(r.max_rel), index,
                ours, theirs, _num(r.allowed), mark, Text(r.note)),
                strict=True))
            table.add_row(*[cells[c] for c, _ in columns if c in keep])
        if not chosen:
            pass
        elif width != console.width:
            saved = console.width
            console.width = width
            try:
                console.print(table)
            finally:
                console.width = saved
        else:
            console.print(table)
    specs = sorted({r.spec for r in rows})
    bad = sorted({r.spec for r in failed})
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(rows)} comparisons failed[/] in "
                      f"{', '.join(bad)}.")
        for r in failed[:10]:
            head = f"  {r.spec} {r.input} vs {r.oracle} ({r.shape})"
            if r.analytic is None:
                console.print(Text(f"{head}: {r.note}", style="red"))
                continue
            where = "" if r.index is None else f" at {r.input}[{','.join(map(str, r.index))}]"
            ours, theirs = _pair(r.analytic, r.numeric)
            console.print(Text(f"{head}{where}: ours {ours}, expected "
                               f"{theirs}, allowed error {_num(r.allowed)}"
                               + (f" — {r.note}" if r.note else ""), style="red"))
        if len(failed) > 10:
            console.print(Text(f"  ... and {len(failed) - 10} more failures not shown "
                               "(--show failed lists them all)", style="red"))
    else:
        console.print(f"[bold green]all {len(rows)} comparisons passed[/] "
                      f"({len(specs)} spec{'s' if len(specs) != 1 else ''}).")
