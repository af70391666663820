"""The ``gradtool`` command line: thin typer commands over library functions.

Heavy modules (sympy, numpy, torch) are imported inside the commands so that ``gradtool --help``
starts fast.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from gradtool import __version__

app = typer.Typer(
    name="gradtool",
    help="Derive, check and train on backward passes written once as math in SymPy.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"gradtool {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Debug = False,
) -> None:
    """Derive, check and train on backward passes written once as math in SymPy."""
    _state["debug"] = debug


def _fail(exc: BaseException, debug: bool) -> None:
    from gradtool.errors import GradtoolError

    if debug or _state["debug"]:
        raise exc
    from rich.markup import escape

    if isinstance(exc, GradtoolError):
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    else:
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: "
                          f"{escape(str(exc))} (run again with --debug for the traceback)",
                          soft_wrap=True)
    raise typer.Exit(1) from None


@app.command("specs")
def specs_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    debug: Debug = False,
) -> None:
    """List the built-in specs with a one-line description."""
    try:
        from gradtool.spec.loader import builtin_specs, load_spec

        rows = []
        for name, path in builtin_specs().items():
            spec = load_spec(path)
            rows.append({"name": name, "description": spec.description,
                         "reference": spec.reference, "file": str(path),
                         "inputs": [t.name for t in spec.grad_inputs],
                         "outputs": [t.name for t in spec.outputs]})
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        _fail(exc, debug)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(title="Built-in specs", title_justify="left")
    table.add_column("spec", style="bold cyan")
    table.add_column("description")
    table.add_column("differentiable", style="green")
    for r in rows:
        table.add_row(r["name"], r["description"], ", ".join(r["inputs"]))
    console.print(table)
    console.print("Derive one with [bold]gradtool derive NAME[/], or write your own spec "
                  "file (docs/spec-language.md).")


class _Working:
    """A spinner on stderr naming the current step, shown once a command has run for
    ``DELAY`` seconds (a quick derivation prints nothing extra) and only on a terminal, so
    piped output and ``--json`` stay as they are."""

    DELAY = 1.0

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err_console.is_terminal
        self.status = None

    def __enter__(self):
        import time

        self.start = time.monotonic()
        return self

    def step(self, text: str) -> None:
        if not self.enabled:
            return
        from rich.markup import escape

        if self.status is None:
            import time

            if time.monotonic() - self.start < self.DELAY:
                return
            self.status = err_console.status("", spinner="dots")
            self.status.start()
        self.status.update(f"[dim]deriving:[/] {escape(text)}")

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.stop()


@app.command("derive")
def derive_cmd(
    spec: Annotated[str, typer.Argument(help="A built-in spec name (see `gradtool specs`) "
                                             "or the path of a spec file.")],
    jacobian: Annotated[bool, typer.Option("--jacobian", "-j",
                                           help="Show ∂output/∂input in index form.")] = False,
    shape: Annotated[str | None, typer.Option(
        "--shape", "-s", metavar="N=2,D=3",
        help="Concrete sizes: also show each Jacobian as an explicit matrix.")] = None,
    steps: Annotated[bool, typer.Option("--steps", help="Show the chain rule step by step "
                                                        "through the intermediates.")] = False,
    latex_out: Annotated[bool, typer.Option("--latex", help="Print LaTeX.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    code: Annotated[str | None, typer.Option(
        "--code", metavar="numpy|torch",
        help="Print the generated kernels: a NumPy layer class, or a torch.autograd.Function "
             "and nn.Module.")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="FILE", help="With --code: write the source to FILE.")] = None,
    debug: Debug = False,
) -> None:
    """Print the forward, the simplified backward and, on request, Jacobians and steps."""
    if code is not None or output is not None:
        _emit_code(spec, code, output, debug)
        return
    try:
        from gradtool.report import derive_report, parse_shape

        with _Working(enabled=not as_json) as working:
            report = derive_report(spec, jacobians=jacobian, shape=parse_shape(shape),
                                   steps=steps, progress=working.step)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if as_json:
        for g in report["gradients"] + report["intermediates"]:
            g.pop("sympy", None)
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    from gradtool.render import render_derivation

    render_derivation(console, report, latex=latex_out)


@app.command("check")
def check_cmd(
    specs: Annotated[list[str] | None, typer.Argument(
        help="Built-in spec names or spec files; all built-in specs when none is given.")] = None,
    impl: Annotated[str | None, typer.Option(
        "--impl", metavar="FILE.py:NAME",
        help="Check your own layer (a NumPy class with forward/backward, or a "
             "torch.autograd.Function) against the spec.")] = None,
    mapping: Annotated[list[str] | None, typer.Option(
        "--map", metavar="SPEC=YOURS",
        help="With --impl: your name for a spec tensor, e.g. --map gamma=weight.")] = None,
    tol: Annotated[float | None, typer.Option(
        "--tol", help="Relative tolerance (default: 1e-6 against finite differences, 1e-9 "
                      "against exact oracles, 1e-4 in float32 mode).")] = None,
    float32: Annotated[bool, typer.Option(
        "--float32", help="Also run the kernels in float32 against the float64 oracles.")]
    = False,
    order: Annotated[int, typer.Option("--order", min=1, max=2,
                                       help="2: also check gradients of gradients.")] = 1,
    shapes: Annotated[int, typer.Option("--shapes", min=1, max=20,
                                        help="How many random shapes (the first has N=1).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    show: Annotated[str, typer.Option("--show", metavar="all|failed|summary",
                                      help="Which rows to print.")] = "all",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
    debug: Debug = False,
) -> None:
    """Verify derived backwards (or your own layer) against finite differences,
    torch.autograd, reference ops and the other backend. Exits 1 on any failure."""
    try:
        if show not in ("all", "failed", "summary"):
            from gradtool.errors import GradtoolError

            raise GradtoolError(f"--show {show!r} is not one of all, failed, summary")
        rows = _run_checks(specs or [], impl, mapping or [], tol, float32, order, shapes, seed,
                           quiet=as_json)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    failed = [r for r in rows if not r.passed]
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2, ensure_ascii=False))
    else:
        from gradtool.render import render_check

        render_check(console, rows, show)
    if failed:
        raise typer.Exit(1)


def _run_checks(names, impl, mapping, tol, float32, order, shapes, seed, quiet):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gradtool.check.impl import load_impl, make_subject
    from gradtool.check.runner import CheckOptions, check_spec
    from gradtool.errors import GradtoolError
    from gradtool.spec.loader import builtin_specs, load_spec

    if impl and len(names) != 1:
        raise GradtoolError("--impl checks one layer against one spec",
                            hint="name exactly one spec: gradtool check layernorm --impl f.py:LN")
    if impl and (float32 or order > 1):
        raise GradtoolError("--float32 and --order 2 check gradtool's generated kernels",
                            hint="drop them when checking your own layer with --impl")
    pairs = {}
    for item in mapping:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise GradtoolError(f"cannot read --map {item!r}", hint="write SPEC_NAME=YOUR_NAME")
        pairs[key] = value
    specs = [load_spec(n) for n in (names or list(builtin_specs()))]
    options = CheckOptions(tol=tol, dtype="float32" if float32 else "float64",
                           cases=shapes, seed=seed, order=order)
    subject = make_subject(specs[0], load_impl(impl), pairs) if impl else None
    rows = []
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err_console, transient=True,
                  disable=quiet or not err_console.is_terminal) as bar:
        task = bar.add_task("checking", total=len(specs) * shapes)
        for spec in specs:
            rows += check_spec(spec, options, subject=subject,
                               progress=lambda text: bar.update(task, advance=1,
                                                                description=text))
    return rows


def _emit_code(spec: str, target: str | None, output: str | None, debug: bool) -> None:
    try:
        from pathlib import Path

        from gradtool.codegen.cache import write_atomic
        from gradtool.codegen.emit import TARGETS, generate
        from gradtool.errors import GradtoolError

        if target not in TARGETS:
            what = "--code needs a target" if target is None else f"unknown code target {target!r}"
            raise GradtoolError(what, hint="use --code numpy or --code torch")
        source = generate(spec, target)
        if output:
            write_atomic(Path(output), source)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if output:
        err_console.print(f"wrote {output} ({target}, {source.count(chr(10))} lines)")
    else:
        print(source, end="")
