"""The ``gradtool`` command line: thin typer commands over library functions.

Heavy modules (sympy, numpy, torch) are imported inside the commands so that ``gradtool --help``
starts fast.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from gradtool import __version__

# The schema of every --json output (docs/json.md, gradtool/schemas/*.schema.json): raised
# when a field is removed or changes meaning, not when one is added.
JSON_SCHEMA_VERSION = 1


def json_version() -> dict:
    """The ``version`` field of every ``--json`` output."""
    return {"schema": JSON_SCHEMA_VERSION, "gradtool": __version__}


def _error_json(exc: BaseException, exit_code: int) -> dict:
    """An error as the one JSON object ``--json`` prints on stdout (``error.schema.json``)."""
    from gradtool.errors import GradtoolError

    where = {"file": None, "line": None, "hint": None}
    if isinstance(exc, GradtoolError):
        kind, message = "error", exc.message
        where = {"file": None if exc.file is None else str(exc.file), "line": exc.line,
                 "hint": exc.hint}
    elif isinstance(exc, typer.TyperException):  # click's usage errors (typer's own click)
        kind, message = "usage", exc.format_message()
    else:
        kind, message = "internal", f"{type(exc).__name__}: {exc}"
    return {"version": json_version(),
            "error": {"kind": kind, "type": type(exc).__name__, "message": message,
                      "text": message if kind != "error" else str(exc),
                      "exit_code": exit_code, **where}}


class _JsonErrors(TyperGroup):
    """With ``--json`` among the arguments, a usage error (``--order 3``, an unknown option)
    is one JSON object on stdout, as the commands' own errors are; the exit code stays
    click's (2)."""

    def main(self, args=None, *rest, **kwargs):
        import sys

        words = list(sys.argv[1:] if args is None else args)
        self.json_errors = "--json" in words[:words.index("--")] if "--" in words \
            else "--json" in words
        return super().main(words, *rest, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except typer.TyperException as exc:  # base of click's ClickException in typer
            if not getattr(self, "json_errors", False):
                raise
            _print_json(_error_json(exc, exc.exit_code))
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_JsonErrors,
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


def run() -> None:
    """The command-line process (``gradtool``, ``python -m gradtool``): as :data:`app`, and a
    command that runs user code may end the process itself with its report's exit status
    (``gradtool check``; see gradtool/usercode.py). Tests call :data:`app` in-process."""
    _state["process"] = True
    app(prog_name="gradtool")


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
    from gradtool.terminal import ascii_fallback_streams

    ascii_fallback_streams()


def _print_json(value) -> None:
    """JSON on stdout: Unicode as it is where stdout can show it, else \\u escapes. While a
    command runs user code, "stdout" is the report stream of its containment (the real
    standard output; ``sys.stdout`` then goes to stderr)."""
    import sys

    from gradtool.terminal import can_encode

    out = _state.get("report") or sys.stdout
    print(json.dumps(value, indent=2, ensure_ascii=not can_encode(out)), file=out, flush=True)


def _fail(exc: BaseException, debug: bool, as_json: bool = False) -> None:
    """Report ``exc`` and exit 1: one rich line on stderr, or with ``as_json`` one JSON
    object on stdout (``{"version": ..., "error": {...}}``)."""
    debug = debug or _state["debug"]
    rank = _distributed_rank()
    if rank is None:
        _print_error(exc, debug, as_json)
    # a process of a distributed run: the launcher's report gets the message (error file);
    # rank 0 prints its own errors, the other ranks (which fail the same way on the same
    # input) stay silent, and so does a rank that only lost its peers: the rank that failed
    # first has the reason. --debug shows every rank's traceback.
    from gradtool.errors import GradtoolError
    from gradtool.train import distributed

    peer = distributed.is_peer_loss(exc)
    message = str(exc) if isinstance(exc, GradtoolError) else f"{type(exc).__name__}: {exc}"
    if not debug and (peer or rank != 0):
        distributed.record_failure(message, root=not peer)
        raise typer.Exit(1) from None
    try:
        _print_error(exc, debug, as_json)
    finally:
        distributed.record_failure(message, root=not peer, printed=True)


def _print_error(exc: BaseException, debug: bool, as_json: bool = False) -> None:
    from gradtool.errors import GradtoolError

    if debug:
        raise exc
    if as_json or isinstance(exc, GradtoolError):
        _report_error(exc, as_json)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    from rich.markup import escape

    err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: "
                      f"{escape(str(exc))} (run again with --debug for the traceback)",
                      soft_wrap=True)
    raise typer.Exit(1) from None


def _distributed_rank() -> int | None:
    """This process's rank when it is one of several of a distributed run (``WORLD_SIZE`` > 1,
    set by torchrun), else None."""
    import os

    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
            else None
    except ValueError:
        return None


def _positive_finite(value: float | None) -> float | None:
    """Option callback: a tolerance must be a finite number above zero (``--tol inf`` would
    pass every wrong layer, ``--tol nan`` fail every right one)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above zero "
                                 "(e.g. --tol 1e-6)")
    return value


_DERIVE_EXAMPLES = """Examples (the backward; softmax's Jacobian as a matrix; a NumPy layer file):

  $ gradtool derive layernorm

  $ gradtool derive softmax --jacobian --shape N=1,C=3

  $ gradtool derive my_rmsnorm.py --code numpy -o rmsnorm_layer.py

Docs: docs/spec-language.md, docs/tutorial.md"""

_CHECK_EXAMPLES = """Examples (every built-in; second order and float32; your own layer as JSON):

  $ gradtool check

  $ gradtool check layernorm --order 2 --float32

  $ gradtool check layernorm --impl my_ln.py:LayerNorm --json

Docs: docs/checking-your-layer.md"""

_SPECS_EXAMPLES = """Examples:

  $ gradtool specs --json

Docs: docs/spec-language.md (write your own spec)"""


@app.command("specs", epilog=_SPECS_EXAMPLES)
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
        _print_json(rows)
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
    piped output, logs, one-line errors and ``--json`` stay as they are.

    A watcher thread starts the spinner even while one step runs long without reporting
    (importing torch, building an explicit Jacobian); :meth:`step` names the next step."""

    DELAY = 1.0

    def __init__(self, enabled: bool = True, what: str = "deriving"):
        self.enabled = enabled and err_console.is_terminal
        self.what = what
        self.text = ""
        self.status = None

    def __enter__(self):
        import threading
        import time

        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        if self.enabled:
            self.watcher = threading.Thread(target=self._watch, daemon=True)
            self.watcher.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.1):
            self._show()

    def _show(self) -> None:
        import time

        from rich.markup import escape

        with self.lock:
            if self.done.is_set() or time.monotonic() - self.start < self.DELAY:
                return
            text = f"[dim]{self.what}:[/] {escape(self.text)}"
            if self.status is None:  # drawn at once; then redrawn 12.5 times a second
                from rich.live import Live
                from rich.spinner import Spinner

                self.spinner = Spinner("dots", text)
                self.status = Live(self.spinner, console=err_console, transient=True,
                                   refresh_per_second=12.5)
                self.status.start(refresh=True)
            else:
                self.spinner.update(text=text)

    def step(self, text: str) -> None:
        self.text = text
        if self.enabled:
            self._show()

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done.set()
            if self.status is not None:
                self.status.stop()
                self.status = None
        self.watcher.join()


@app.command("derive", epilog=_DERIVE_EXAMPLES)
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
        ignored = [name for name, given in (("--jacobian", jacobian), ("--shape", shape),
                                            ("--steps", steps), ("--latex", latex_out),
                                            ("--json", as_json)) if given]
        if ignored:
            from gradtool.errors import GradtoolError

            _fail(GradtoolError(f"--code prints source code; {', '.join(ignored)} cannot be "
                                "combined with it",
                                hint="run the two separately"), debug, as_json)
        _emit_code(spec, code, output, debug)
        return
    try:
        from gradtool.report import derive_report, parse_shape

        with _Working(enabled=not as_json) as working:
            report = derive_report(spec, jacobians=jacobian, shape=parse_shape(shape),
                                   steps=steps, progress=working.step)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug, as_json)
    if as_json:
        for g in report["gradients"] + report["intermediates"]:
            g.pop("sympy", None)
        _print_json({"version": json_version(), **report})
        return
    from gradtool.render import render_derivation

    render_derivation(console, report, latex=latex_out)


@app.command("check", epilog=_CHECK_EXAMPLES)
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
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="NAME=VALUE",
        help="With --impl: a hyper-parameter for your layer and every oracle, e.g. "
             "--set eps=1e-8 (by default it is read from your layer).")] = None,
    one_hot: Annotated[list[str] | None, typer.Option(
        "--one-hot", metavar="INPUT",
        help="Draw INPUT (targets T) as one-hot rows, for a loss valid only for one-hot "
             "targets.")] = None,
    sizes: Annotated[str | None, typer.Option(
        "--shape", metavar="N=8,D=64",
        help="Pin sizes for every shape checked (pinning N also skips N = 1).")] = None,
    batch_one: Annotated[bool, typer.Option(
        "--batch-one/--no-batch-one",
        help="Whether the first shape has N = 1.")] = True,
    tol: Annotated[float | None, typer.Option(
        "--tol", callback=_positive_finite,
        help="Relative tolerance (default: 1e-6 against finite differences, 1e-9 against exact "
             "oracles, 1e-5 for everything with --impl, 1e-4 in float32 mode).")] = None,
    float32: Annotated[bool, typer.Option(
        "--float32", help="Also run the kernels in float32 against the float64 oracles.")]
    = False,
    order: Annotated[int, typer.Option("--order", min=1, max=2,
                                       help="2: also check gradients of gradients.")] = 1,
    shapes: Annotated[int, typer.Option("--shapes", min=1, max=20,
                                        help="How many random shapes (the first has N=1).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    show: Annotated[str, typer.Option(
        "--show", metavar="inputs|all|failed|summary",
        help="inputs: one line per spec and input (worst error, verdict), failures below; "
             "all: every comparison (shape × input × oracle); failed: only failed "
             "comparisons; summary: the closing line and the failures.")] = "inputs",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
    debug: Debug = False,
) -> None:
    """Verify derived backwards (or your own layer) against finite differences,
    torch.autograd, reference ops and the other backend. Exits 1 on any failure."""
    from gradtool.usercode import contained

    # the code checked (spec files, --impl) runs contained from its import to the report: it
    # cannot end the process, change its exit status or write into the report, and as the
    # process itself gradtool ends with the report's status before any of its finalizers,
    # exit handlers or threads can run (gradtool/usercode.py)
    process = _state.get("process", False)
    with contained(process=process,
                   on_timeout=lambda exc: _report_error(exc, as_json)) as session:
        _state["report"] = session.report
        try:
            status = _check_contained(session, specs, impl, mapping, settings, one_hot, sizes,
                                      batch_one, tol, float32, order, shapes, seed, show,
                                      as_json, debug)
        except typer.Exit as exc:
            status = exc.exit_code
        finally:
            _state.pop("report", None)
        if process:
            session.finish(status)
    if status:
        raise typer.Exit(status)


def _check_contained(session, specs, impl, mapping, settings, one_hot, sizes, batch_one, tol,
                     float32, order, shapes, seed, show, as_json, debug) -> int:
    """The body of ``gradtool check`` inside its containment; returns the exit status (a
    failed check or an error: 1)."""
    import gc

    try:
        from gradtool.render import SHOW

        if show not in SHOW:
            from gradtool.errors import GradtoolError

            raise GradtoolError(f"--show {show!r} is not one of {', '.join(SHOW)}")
        extra = {"settings": settings or [], "one_hot": one_hot or [], "sizes": sizes,
                 "batch_one": batch_one}
        rows = _run_checks(specs or [], impl, mapping or [], tol, float32, order, shapes, seed,
                           quiet=as_json, **extra)
        gc.collect()  # the finalizers of the layers checked run here, still contained
        if session.strays:
            from gradtool.check.impl import stray_row

            rows.append(stray_row(rows, session.strays))
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug, as_json)
    failed = [r for r in rows if not r.passed]
    if as_json:
        _print_json({"version": json_version(), "passed": not failed,
                     "comparisons": len(rows), "failed": len(failed),
                     "specs": sorted({r.spec for r in rows}),
                     "failed_specs": sorted({r.spec for r in failed}),
                     "rows": [r.to_json() for r in rows]})
    else:
        from gradtool.render import render_check

        render_check(Console(file=session.report, highlight=False), rows, show)
        session.report.flush()
    return 1 if failed else 0


def _report_error(exc: BaseException, as_json: bool) -> None:
    """``exc`` as :func:`_print_error` reports it, without exiting (the watchdog of a
    contained check reports its error before it ends the process)."""
    from rich.markup import escape

    if as_json:
        _print_json(_error_json(exc, getattr(exc, "exit_code", 1)))
    else:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)


def _pairs(items: list[str], option: str, example: str) -> dict[str, str]:
    from gradtool.errors import GradtoolError

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise GradtoolError(f"cannot read {option} {item!r}", hint=f"write {example}")
        pairs[key] = value
    return pairs


def _run_checks(names, impl, mapping, tol, float32, order, shapes, seed, quiet,
                settings=(), one_hot=(), sizes=None, batch_one=True):
    """The checks behind ``gradtool check``: a spinner while torch is imported and the specs
    are loaded, then a bar per (spec, shape); both on a terminal's stderr only."""
    with _Working(enabled=not quiet, what="preparing the check") as working:
        working.step("importing torch")
        import torch  # noqa: F401 - seconds on first use: imported here, under the spinner

        working.step("loading the specs")
        specs, options, subject = _check_plan(names, impl, mapping, tol, float32, order,
                                              shapes, seed, settings, one_hot, sizes,
                                              batch_one)
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gradtool.check.runner import check_spec

    rows = []
    with Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                  BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True,
                  disable=quiet or not err_console.is_terminal) as bar:
        task = bar.add_task(f"checking {specs[0].name}", total=len(specs) * shapes)
        for spec in specs:
            bar.update(task, description=f"checking {spec.name}")
            rows += check_spec(spec, options, subject=subject,
                               progress=lambda text: bar.update(task, advance=1,
                                                                description=text))
    return rows


def _check_plan(names, impl, mapping, tol, float32, order, shapes, seed, settings, one_hot,
                sizes, batch_one):
    """The specs to check (with eval forms), the options and, with ``--impl``, the layer."""

    from gradtool.check.impl import load_impl, make_subject
    from gradtool.check.runner import CheckOptions
    from gradtool.errors import GradtoolError
    from gradtool.spec.loader import builtin_specs, load_spec

    if impl and len(names) != 1:
        raise GradtoolError("--impl checks one layer against one spec",
                            hint="name exactly one spec: gradtool check layernorm --impl f.py:LN")
    if impl and (float32 or order > 1):
        raise GradtoolError("--float32 and --order 2 check gradtool's generated kernels",
                            hint="drop them when checking your own layer with --impl")
    from gradtool.report import parse_shape

    pairs = _pairs(mapping, "--map", "SPEC_NAME=YOUR_NAME")
    values = {}
    for key, text in _pairs(settings, "--set", "NAME=NUMBER, e.g. --set eps=1e-8").items():
        try:
            values[key] = float(text)
        except ValueError:
            raise GradtoolError(f"--set {key}={text}: {text!r} is not a number",
                                hint="e.g. --set eps=1e-8") from None
    if (values or one_hot) and not impl:
        raise GradtoolError("--set and --one-hot apply to a layer checked with --impl")
    specs = [load_spec(n) for n in (names or list(builtin_specs()))]
    fixed = parse_shape(sizes) or {}
    # a derived size (a conv's OH) follows from the others: it is not set
    unknown = [k for k in fixed if not any(k in s.base_dims for s in specs)]
    if unknown:
        raise GradtoolError(f"--shape names {', '.join(unknown)}, not a size of "
                            f"{', '.join(s.name for s in specs)} that can be set",
                            hint="sizes: " + ", ".join(sorted({k for s in specs
                                                               for k in s.base_dims})))
    for s in specs:
        s.check_given_sizes({k: v for k, v in fixed.items() if k in s.base_dims})
    for name in one_hot:
        if impl and (name not in specs[0].tensors or specs[0].tensors[name].kind != "input"):
            raise GradtoolError(f"--one-hot {name}: not an input of {specs[0].name}",
                                hint="inputs: " + ", ".join(t.name for t in
                                                            specs[0].of_kind("input")))
    if not impl:  # a layer's eval form (batch norm's running statistics) is checked as well
        specs += [s.eval_form() for s in specs if s.eval_form() is not None]
    options = CheckOptions(tol=tol, dtype="float32" if float32 else "float64",
                           cases=shapes, seed=seed, order=order, fixed=fixed,
                           one_hot=tuple(one_hot), batch_one=batch_one)
    subject = make_subject(specs[0], load_impl(impl), pairs, values) if impl else None
    return specs, options, subject


def _emit_code(spec: str, target: str | None, output: str | None, debug: bool) -> None:
    try:
        from gradtool.codegen.emit import TARGETS, generate
        from gradtool.errors import GradtoolError
        from gradtool.fileio import write_user_file

        if target not in TARGETS:
            what = "--code needs a target" if target is None else f"unknown code target {target!r}"
            raise GradtoolError(what, hint="use --code numpy or --code torch")
        with _Working(what=f"generating {target} code") as working:
            working.step(spec)
            source = generate(spec, target)
        if output:
            write_user_file(output, source)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if output:
        err_console.print(f"wrote {output} ({target}, {source.count(chr(10))} lines)")
    else:
        print(source, end="")


TRAIN_EXAMPLES = """Examples:

  gradtool train                                  # digits, MLP, torch backend (≥ 97 %)

  gradtool train --backend numpy --hidden 64,64 --norm layernorm --dropout 0.1

  gradtool train --model cnn                      # digits, a small CNN (≥ 98.5 %)

  gradtool train --model my_model.toml --optimizer sgd --lr 0.05 --schedule cosine

  gradtool train --model vu-mnist-cnn --data mnist --batch-size 128 --epochs 10

  gradtool train --data mnist --data-dir ../shared/data/mnist --epochs 10

  gradtool train --resume runs/digits-mlp-20260101-120000

  gradtool train --nproc-per-node 2 --batch-size 64   # data parallel (torch.distributed)

  gradtool train --model vu-mnist-cnn --data mnist --device cuda --compile   # torch.compile
"""


def _model_help() -> str:
    from gradtool.model_files import shipped_models, summary

    lines = ["mlp (--hidden, --norm, --activation, --dropout); cnn (3×3 conv, batchnorm2d, "
             "max-pool, global average; --activation, --dropout); a TOML model file; or a "
             "model file shipped with gradtool:"]
    lines += [f"{name}: {summary(path)}" for name, path in shipped_models().items()]
    return "\n\n".join(lines)


@app.command("train", epilog=TRAIN_EXAMPLES)
def train_cmd(
    ctx: typer.Context,
    data: Annotated[str, typer.Option("--data", help="Data set: digits (embedded), mnist, "
                                                     "fashion-mnist, cifar10, npz.")] = "digits",
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="Where the data set's "
                                                                    "files are.")] = None,
    model: Annotated[str, typer.Option("--model", metavar="mlp|cnn|NAME|FILE.toml",
                                       help=_model_help())]
    = "mlp",
    hidden: Annotated[str, typer.Option("--hidden", metavar="H1,H2",
                                        help="MLP hidden sizes.")] = "256,128",
    activation: Annotated[str, typer.Option("--activation", help="MLP/CNN activation spec "
                                                                 "(name or file).")] = "relu",
    norm: Annotated[str | None, typer.Option("--norm", help="MLP normalisation spec after each "
                                                            "hidden linear (batchnorm, "
                                                            "layernorm, a file).")] = None,
    dropout: Annotated[float, typer.Option("--dropout", help="MLP/CNN dropout probability.")] = 0.0,
    backend: Annotated[str, typer.Option("--backend", metavar="torch|numpy",
                                         help="Generated torch Functions, or NumPy kernels "
                                              "with no autograd.")] = "torch",
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs (default 30; with "
                                                                "--resume: the run's, or more "
                                                                "to run longer).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", metavar="sgd|adam|adamw",
                                           help="A torch.optim optimiser.")] = "adam",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="SGD with Nesterov momentum.")]
    = False,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", help="Weight decay (default 0; adamw: 0.01, torch's default).")]
    = None,
    schedule: Annotated[str, typer.Option("--schedule", metavar="none|step|cosine",
                                          help="Learning-rate schedule "
                                               "(torch.optim.lr_scheduler).")] = "cosine",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", metavar="float32|float64")] = "float32",
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda",
                                        help="auto: cuda where present.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch and "
                                                                  "NumPy (default 1; with "
                                                                  "--resume: the run's; 0: the "
                                                                  "libraries' default).")]
    = None,
    out: Annotated[str | None, typer.Option("--out", help="Run folder (default "
                                                          "runs/DATA-MODEL-TIME).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", metavar="RUN_DIR",
                                               help="Continue a run from its last checkpoint, "
                                                    "with its options; only --epochs (to run "
                                                    "longer), --threads, --json and "
                                                    "--nproc-per-node may be given too."
                                               )] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Train without checking the "
                                                                "specs (recorded).")] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Use only the first LIMIT "
                                                              "training samples.")] = None,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="Run the training steps through torch.compile (fuses the generated "
                          "kernels' element-wise ops; compiles for a while at the start; on "
                          "a CPU it needs a C++ compiler). Torch backend.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON "
                                                         "object on stdout.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", metavar="K", help="Data parallel on this machine: K processes "
                                              "started by torch.distributed.run (one per GPU, "
                                              "or CPU processes with gloo).")] = None,
    debug: Debug = False,
) -> None:
    """Train a model built from specs; every spec is verified first (cached).

    Writes a run folder: config.json, metrics.csv, curves.png, confusion matrix, checkpoints,
    model.pt. Progress goes to stderr.

    Data parallel under torchrun or with --nproc-per-node: rank 0 prints and writes."""
    try:
        from gradtool.train import TrainConfig, train
        from gradtool.train.present import RichProgress, result_table

        if resume is not None:
            _refuse_options_on_resume(ctx, resume)
        try:
            sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            from gradtool.errors import GradtoolError

            raise GradtoolError(f"--hidden {hidden!r} is not a list of sizes",
                                hint="write e.g. --hidden 128,64") from None
        config = TrainConfig(data=data, data_dir=data_dir, model=model, hidden=sizes,
                             activation=activation, norm=norm, dropout=dropout,
                             backend=backend, epochs=epochs, batch_size=batch_size,
                             optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay, schedule=schedule, seed=seed,
                             dtype=dtype, device=device, threads=threads, out=out,
                             resume=resume,
                             verify=not no_verify, limit=limit, compile=compile_model)
        if resume is None:  # an option typed but ignored by the run's choices is refused
            config.refuse_unused([p.name for p in ctx.command.params if getattr(
                ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"])
        if nproc_per_node is not None:
            _launch_train(ctx, config, nproc_per_node)
            return
        with RichProgress(err_console, quiet=as_json or _is_other_rank()) as progress:
            result = train(config, progress=progress)
    except typer.Exit:
        raise
    except KeyboardInterrupt:  # before the epochs (verifying, loading): nothing to keep yet
        from gradtool.train.loop import TrainingInterruptedError

        _fail(TrainingInterruptedError("interrupted before training started",
                                  hint="start the run again"), debug, as_json)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug, as_json)
    if _is_other_rank():
        return
    if as_json:
        print(json.dumps({"version": json_version(), **result.to_json()}))
    else:
        err_console.print(result_table(result))


# what --resume may be given: the rest comes from the run's config.json
_RESUME_OPTIONS = ("resume", "epochs", "threads", "as_json", "nproc_per_node", "debug")


def _refuse_options_on_resume(ctx: typer.Context, resume: str) -> None:
    """Raise ``ConfigError`` when ``--resume`` comes with an option a resumed run does not
    take (it keeps the run's own, from its config.json), whatever the option's value."""
    from pathlib import Path

    from gradtool.train.config import RESUME_HINT, ConfigError

    given = [p.opts[0] for p in ctx.command.params
             if p.param_type_name == "option" and p.name not in _RESUME_OPTIONS
             and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]
    if given:
        raise ConfigError(f"{', '.join(given)} given with --resume: a resumed run keeps the "
                          f"options in {Path(resume) / 'config.json'}", hint=RESUME_HINT)


def _is_other_rank() -> bool:
    """A process of a distributed run other than rank 0 (which alone prints)."""
    return _distributed_rank() not in (None, 0)


def _launch_train(ctx: typer.Context, config, nproc: int) -> None:
    """``gradtool train --nproc-per-node K ...``: the same command, minus that option, in K
    processes started by ``torch.distributed.run`` (see
    :func:`gradtool.train.distributed.launch`), once the options have passed the checks every
    rank would make (so that a bad option is one message, not K). Raises ``typer.Exit(1)``
    when rank 0 failed (it has printed its error), :class:`LaunchError` for another rank's."""
    from gradtool.train import distributed

    distributed.check_launch(config, nproc)
    argv = (["--debug"] if _state["debug"] else []) + ["train"] + _given_options(
        ctx, exclude=("nproc_per_node",))
    try:
        distributed.launch(nproc, argv, quiet=not _state["debug"] and not ctx.params["debug"])
    except SystemExit:  # rank 0 failed and printed its error
        raise typer.Exit(1) from None


def _given_options(ctx: typer.Context, exclude: tuple[str, ...]) -> list[str]:
    """The options of the running command as given on its command line (their values as
    parsed), except those named in ``exclude``: what the command's other processes are
    started with."""
    argv = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in exclude or param.param_type_name != "option" or \
                getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif value is not None:
            argv += [param.opts[0], str(value)]
    return argv
