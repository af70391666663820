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
    for g in report.get("intermediates", []) + report["gradients"]:
        out.append(g["latex"])
        if g.get("matrix_latex"):
            out.append(f"% d{g['wrt']} in matrix form"
                       + (" (\\odot: element-wise product)" if "odot" in g["matrix_latex"] else ""))
            out.append(g["matrix_latex"])
    for jac in report.get("jacobians", []):
        out.append(f"% Jacobian d{jac['output']}/d{jac['wrt']}")
        out.append(jac["latex"])
        if "matrix_latex" in jac:
            out.append(jac["matrix_latex"])
    if report.get("steps"):
        out.append("% chain rule, from the outputs back")
    for step in report.get("steps", []):
        out.append(step["latex"])
        if step["seed"]:
            out.append("% the upstream gradient of an output")
        for c in step["contributions"]:
            out.append(f"% from {c['from']}: {c['rule']}")
            out.append(c["local_latex"])
    for line in out:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def shown_path(file) -> str:
    """A spec file as people refer to it: a built-in one as ``specs/<name>.py`` wherever
    gradtool is installed, a file under the working folder relative to it, others as given."""
    from pathlib import Path

    from gradtool.spec.loader import builtin_dir

    path = Path(str(file))
    try:
        return str(Path(builtin_dir().name) / path.resolve().relative_to(builtin_dir().resolve()))
    except ValueError:
        pass
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(file)


def render_derivation(console: Console, report: dict, latex: bool = False) -> None:
    if latex:
        render_latex(console, report)
        return
    key = "text"
    title = f"[bold cyan]{escape(report['spec'])}[/] — {escape(report['description'])}"
    console.print(title)
    console.print(f"[dim]{escape(shown_path(report['file']))}[/]")
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


SHOW = ("inputs", "all", "failed", "summary")


def _label(r) -> str:
    """What a row is about, as the per-input view names it: the tensor with its kind
    (``Y (forward)``), ``backward (contract)``, ``settings`` or ``reference (skipped)``."""
    if r.kind == "contract":
        return f"{r.input} (contract)"
    if r.kind == "skipped":  # an oracle that could not run (a reference refusing N = 1)
        return f"{r.oracle} (skipped)"
    return r.input


def _worst_row(rows: list):
    """The row to show for a group: the failed one with the largest relative error, else
    the passing one with the largest relative error."""
    failed = [r for r in rows if not r.passed]

    def err(r):
        return -1.0 if r.max_rel is None or r.max_rel != r.max_rel else r.max_rel

    return max(failed or rows, key=err)


def _least_widths(columns: list, rows: list, wrap: dict) -> list[int]:
    """Each column's width with no cell cut: its longest cell (or, for a column in ``wrap``,
    the width given there, as its cells may wrap between words)."""
    out = []
    for k, (header, _) in enumerate(columns):
        if header in wrap:
            out.append(max(wrap[header], max((len(w) for w in header.split()), default=0)))
            continue
        cells = [Text(c) if isinstance(c, str) else c for c in (row[k] for row in rows)]
        out.append(max([len(header)] + [c.cell_len for c in cells]))
    return out


def _table_width(widths: list[int]) -> int:
    return 1 + sum(w + 3 for w in widths)  # a border and one space of padding each side


def _whole_table(console: Console, width: int, columns: list, rows: list,
                 wrap: dict | None = None) -> None:
    """Print a table whose cells are never cut: each column is as wide as its longest cell
    (columns in ``wrap``, {header: minimum width}, may wrap between words instead). On a
    narrow terminal the table is printed wider than the screen, so its lines wrap rather
    than a name losing its end (``running_…`` for both running_mean and running_var)."""
    wrap = wrap or {}
    widths = _least_widths(columns, rows, wrap)
    table = Table(show_lines=False)
    for (header, kw), least in zip(columns, widths, strict=True):
        table.add_column(header, min_width=least, no_wrap=header not in wrap, **kw)
    for row in rows:
        table.add_row(*row)
    width = max(width, _table_width(widths))
    if width == console.width:
        console.print(table)
        return
    saved = console.width
    console.width = width
    try:
        console.print(table)
    finally:
        console.width = saved


def _failure_line(r) -> Text:
    head = f"  {r.spec} {r.input} vs {r.oracle} ({r.shape})"
    if r.analytic is None:
        return Text(f"{head}: {r.note}", style="red")
    where = "" if r.index is None else \
        f" at {r.tensor or r.input}[{','.join(map(str, r.index))}]"
    ours, theirs = _pair(r.analytic, r.numeric)
    return Text(f"{head}{where}: ours {ours}, expected {theirs}, allowed error "
                f"{_num(r.allowed)}" + (f" — {r.note}" if r.note else ""), style="red")


def _render_inputs(console: Console, rows: list, width: int) -> None:
    """One line per spec and input: what was compared (shapes × oracles), the worst
    relative error over all of it and where it was (on a terminal too narrow for that
    column, only for failures, below), the verdict; then each failed input's worst failure
    spelled out."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.spec, _label(r)), []).append(r)
    cells = []
    for (spec, label), group in groups.items():
        worst = _worst_row(group)
        bad = sum(not r.passed for r in group)
        mark = Text("pass", style="green") if not bad else \
            Text(f"FAIL ({bad})", style="bold red")
        shapes = len({r.shape for r in group})
        oracles = len({r.oracle for r in group})
        against = worst.oracle + (f" ({worst.shape})" if worst.shape else "")
        cells.append([spec, label, f"{shapes}×{oracles}",
                      _num(worst.max_rel) if worst.analytic is not None or not worst.passed
                      else "", against, mark])
    columns = [("spec", {"style": "cyan"}), ("input", {}), ("shapes×oracles", {"justify": "right"}),
               ("worst rel err", {"justify": "right"}), ("worst against", {}), ("", {})]
    # the oracle's name whole; its shape may go on the next line
    wrap = {"worst against": max(len(r.oracle) for r in rows)}
    if _table_width(_least_widths(columns, cells, wrap)) > width:
        # a narrow terminal: where the worst error was is spelled out below for failures
        columns.pop(4)
        cells = [row[:4] + row[5:] for row in cells]
    _whole_table(console, width, columns, cells, wrap=wrap)
    failed = [(key, g) for key, g in groups.items() if any(not r.passed for r in g)]
    if failed:
        console.print(Text("Failures (the worst comparison of each input; --show failed "
                           "lists every one):", style="red"))
    for (spec, label), group in failed:
        bad = [r for r in group if not r.passed]
        oracles = ", ".join(dict.fromkeys(r.oracle for r in bad))
        console.print(Text(f"  {spec} {label}: {len(bad)} of {len(group)} comparisons "
                           f"failed ({oracles})", style="bold red"))
        console.print(_failure_line(_worst_row(bad)))


def render_check(console: Console, rows: list, show: str = "inputs") -> None:
    """The check report. ``show``: ``inputs`` (the default) one line per spec and input,
    each failed input's worst failure spelled out below; ``all`` one row per (spec, shape,
    input, oracle); ``failed`` only the failed rows of that table; ``summary`` the closing
    line and the failures alone. Names (specs, tensors, oracles) are never cut."""
    failed = [r for r in rows if not r.passed]
    # a log file or a pipe gets every column at full width; a narrow terminal gets the
    # columns that fit (the failures are spelled out in full below the table anyway)
    width = console.width if console.is_terminal else max(console.width, 220)
    if show == "inputs" and rows:
        _render_inputs(console, rows, width)
    elif show in ("all", "failed"):
        chosen = failed if show == "failed" else rows
        compact = width < 150
        columns = [("spec", {"style": "cyan"}), ("shape", {}), ("input", {}), ("oracle", {}),
                   ("max abs err", {"justify": "right"}), ("max rel err", {"justify": "right"}),
                   ("worst element", {}), ("ours", {"justify": "right"}),
                   ("oracle value", {"justify": "right"}), ("allowed", {"justify": "right"}),
                   ("", {}), ("note", {"style": "dim"})]
        keep = {"spec", "shape", "input", "oracle", "max rel err", "worst element", ""} \
            if compact else {c for c, _ in columns}
        cells = []
        for r in chosen:
            mark = Text("pass", style="green") if r.passed else Text("FAIL", style="bold red")
            index = "" if r.index is None else "[" + ",".join(map(str, r.index)) + "]"
            ours, theirs = _pair(r.analytic, r.numeric)
            row = dict(zip((c for c, _ in columns), (
                r.spec, r.shape, r.input, r.oracle, _num(r.max_abs), _num(r.max_rel), index,
                ours, theirs, _num(r.allowed), mark, Text(r.note)),
                strict=True))
            cells.append([row[c] for c, _ in columns if c in keep])
        if chosen:
            _whole_table(console, width, [c for c in columns if c[0] in keep], cells,
                         wrap={"note": 20})
    specs = sorted({r.spec for r in rows})
    bad = sorted({r.spec for r in failed})
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(rows)} comparisons failed[/] in "
                      f"{', '.join(bad)}.")
        if show == "inputs":
            return
        for r in failed[:10]:
            console.print(_failure_line(r))
        if len(failed) > 10:
            console.print(Text(f"  ... and {len(failed) - 10} more failures not shown "
                               "(--show failed lists them all)", style="red"))
    else:
        console.print(f"[bold green]all {len(rows)} comparisons passed[/] "
                      f"({len(specs)} spec{'s' if len(specs) != 1 else ''}).")
