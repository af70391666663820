"""Executable docs: every console block of README.md and docs/*.md, run again and compared.

A console block is a fenced block with a line starting with ``$ ``. Each ``$ gradtool …``
command in it is run in-process (sympy and torch are imported once for all of them) and its
terminal output, stdout and stderr as a terminal shows them, must equal the lines that follow
it in the block. ``$ echo $?`` prints the previous command's exit code.

What a block needs is said in an HTML comment on the line right above its opening fence::

    <!-- doc-example: columns=120 file=my_layernorm.py file=fixed.py=tests/bug_zoo/ln.py -->

* ``illustrative``: not run (a command for a path only the reader has, a long fuzzing run);
  an unmarked block whose command is not ``gradtool`` or ``echo $?`` fails the test;
* ``columns=N``: the terminal width (default 80);
* ``file=NAME``: before the block runs, ``NAME`` is written from the same page's ```` ```python ````
  block whose first line is ``# NAME``; ``file=NAME=PATH`` copies PATH of the repository.

Commands run in a scratch folder that links ``docs``, ``specs`` and ``tests``, so paths such as
``docs/examples/gelu.py`` work. Before comparing, the repository's and the scratch folder's
absolute paths are dropped from the output; times (``0.2 s``, ``7,171 samples/s``) and
run-folder stamps (``digits-mlp-20261130-081541``) are masked, and runs of padding and table
rules collapsed, so that a different time does not fail a table.

An output line ``…`` (or ``...``) in a block stands for any number of lines: the block is
abridged, and the lines around it must appear in that order.

Rewrite the blocks from what the tool prints now::

    python3 -m tests.doc_examples --update [README.md docs/tutorial.md ...]

An abridged block is rewritten only where its lines still match (times refreshed); one that no
longer matches is listed for a hand edit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^<!--\s*doc-example:(.*)-->\s*$")
ELLIPSIS = ("…", "...")
DEFAULT_COLUMNS = 80


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class NotRunnableError(Exception):
    """A command the runner does not run: mark its block ``illustrative``."""


@dataclass
class Block:
    doc: Path
    fence: int            # index of the opening fence line
    lines: list[str]      # the lines between the fences
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.fence + 1}"

    @property
    def illustrative(self) -> bool:
        return "illustrative" in self.options

    @property
    def abridged(self) -> bool:
        return any(line.strip() in ELLIPSIS for line in self.lines)


def _options(line: str) -> dict:
    m = DIRECTIVE.match(line.strip())
    if not m:
        return {}
    out: dict = {"file": []}
    for word in shlex.split(m.group(1)):
        key, sep, value = word.partition("=")
        if key == "file":
            out["file"].append(value)
        else:
            out[key] = value if sep else True
    return out


def blocks(doc: Path) -> list[Block]:
    """The console blocks of ``doc``, with the options of their directive."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    found, start = [], None
    for k, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = k
            continue
        body = lines[start + 1:k]
        if any(b.startswith("$ ") for b in body):
            options = _options(lines[start - 1]) if start else {}
            found.append(Block(doc, start, body, options))
        start = None
    return found


def steps(block: Block) -> list[tuple[list[str], list[str]]]:
    """(command lines, expected output lines) for each ``$`` command of the block."""
    out: list = []
    k = 0
    lines = block.lines
    while k < len(lines):
        if not lines[k].startswith("$ "):
            raise ValueError(f"{block.name}: output before the first $ command")
        command = [lines[k]]
        while command[-1].endswith("\\") and k + 1 < len(lines):
            k += 1
            command.append(lines[k])
        k += 1
        output = []
        while k < len(lines) and not lines[k].startswith("$ "):
            output.append(lines[k])
            k += 1
        out.append((command, output))
    return out


def command_words(command: list[str]) -> list[str]:
    text = " ".join(line.removesuffix("\\") for line in command)[2:]
    return shlex.split(text, comments=True)


# -- running --------------------------------------------------------------------------------

@dataclass
class Session:
    """A scratch folder and the previous command's exit code."""

    folder: Path
    columns: int = DEFAULT_COLUMNS
    last_code: int = 0


def _python_block(doc: Path, name: str) -> str:
    text = doc.read_text(encoding="utf-8")
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        body = m.group(1)
        if body.splitlines()[0].strip() == f"# {name}":
            return body
    raise NotRunnableError(f"{doc.name} has no ```python block starting with '# {name}'")


@contextlib.contextmanager
def session(block: Block):
    folder = Path(tempfile.mkdtemp(prefix="gradtool-doc-"))
    try:
        for name in ("docs", "specs", "tests"):
            (folder / name).symlink_to(ROOT / name, target_is_directory=True)
        for spec in block.options.get("file", []):
            name, sep, path = spec.partition("=")
            text = (ROOT / path).read_text(encoding="utf-8") if sep \
                else _python_block(block.doc, name)
            (folder / name).write_text(text, encoding="utf-8")
        yield Session(folder, int(block.options.get("columns", DEFAULT_COLUMNS)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(words: list[str], s: Session) -> list[str]:
    """The terminal output of one command, paths made relative."""
    if words == ["echo", "$?"]:
        return [str(s.last_code)]
    if not words or words[0] != "gradtool":
        raise NotRunnableError(f"only gradtool commands run here, not {' '.join(words)!r}: "
                               "mark the block <!-- doc-example: illustrative -->")
    from rich.console import Console
    from typer.testing import CliRunner

    import gradtool.cli as cli

    saved = cli.console, cli.err_console, os.getcwd()
    cli.console = Console(highlight=False, width=s.columns)
    cli.err_console = Console(stderr=True, highlight=False, width=s.columns)
    os.chdir(s.folder)
    try:
        result = CliRunner().invoke(cli.app, words[1:], env={"COLUMNS": str(s.columns)})
    finally:
        cli.console, cli.err_console = saved[:2]
        os.chdir(saved[2])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    s.last_code = result.exit_code
    text = result.output
    for path in (str(s.folder), str(s.folder.resolve()), str(ROOT)):
        text = text.replace(path + os.sep, "")
    return [line.rstrip() for line in text.splitlines()]


# -- comparing ------------------------------------------------------------------------------

_MASKS = [
    (re.compile(r"\d[\d,]*(\.\d+)?(?= ?(s|ms|µs|samples/s)\b)"), "#"),  # times and rates
    (re.compile(r"\d{8}-\d{6}"), "YYYYMMDD-HHMMSS"),                     # run-folder stamps
    (re.compile(r"([ ─━═┄-])\1+"), r"\1"),                               # padding and rules
]


def normal(line: str) -> str:
    """A line as it is compared: times masked, padding collapsed."""
    line = line.rstrip()
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line


def match(expected: list[str], actual: list[str]) -> list[int] | None:
    """Where each expected line is in ``actual`` (an ``…`` line matches any run of lines),
    or None when they do not match."""
    memo: dict = {}

    def go(i: int, j: int):
        if (i, j) in memo:
            return memo[(i, j)]
        if i == len(expected):
            found = [] if j == len(actual) else None
        elif expected[i].strip() in ELLIPSIS:
            found = None
            for jj in range(j, len(actual) + 1):
                rest = go(i + 1, jj)
                if rest is not None:
                    found = [-1] + rest
                    break
        elif j < len(actual) and normal(expected[i]) == normal(actual[j]):
            rest = go(i + 1, j + 1)
            found = None if rest is None else [j] + rest
        else:
            found = None
        memo[(i, j)] = found
        return found

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    return go(0, 0)


@dataclass
class Outcome:
    block: Block
    new_lines: list[str] | None   # the block as the tool prints it now (None: cannot say)
    differences: list[str]


def check_block(block: Block) -> Outcome:
    """Run ``block`` and compare; ``new_lines`` is its text from the current output."""
    new, diffs = [], []
    with session(block) as s:
        for command, expected in steps(block):
            actual = run(command_words(command), s)
            new += command
            where = match(expected, actual)
            if where is None:
                diffs.append(_diff(command, expected, actual))
                if block.abridged:
                    return Outcome(block, None, diffs)
                new += actual
            elif block.abridged:
                new += [line if j < 0 else actual[j] for line, j in
                        zip(expected, where, strict=True)]
            else:
                new += actual
    return Outcome(block, new, diffs)


def _diff(command, expected, actual) -> str:
    import difflib

    lines = difflib.unified_diff(expected, actual, "in the doc", "printed now", lineterm="",
                                 n=1)
    return f"{command[0]}\n" + "\n".join(lines)


# -- the command line ---------------------------------------------------------------------

def update(doc: Path, outcomes: list[Outcome]) -> None:
    lines = doc.read_text(encoding="utf-8").splitlines()
    for o in sorted(outcomes, key=lambda o: -o.block.fence):
        if o.new_lines is None:
            continue
        start = o.block.fence + 1
        lines[start:start + len(o.block.lines)] = o.new_lines
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.doc_examples",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="*", help="markdown files (default: README.md, docs/*.md)")
    parser.add_argument("--update", action="store_true", help="rewrite the blocks in place")
    args = parser.parse_args(argv)
    docs = [Path(d).resolve() for d in args.docs] or documents()
    failed, by_hand = 0, []
    for doc in docs:
        outcomes = []
        for block in blocks(doc):
            if block.illustrative:
                continue
            outcome = check_block(block)
            outcomes.append(outcome)
            if outcome.differences:
                failed += 1
                print(f"{block.name}: differs\n" + "\n".join(outcome.differences) + "\n")
                if outcome.new_lines is None:
                    by_hand.append(block.name)
        if args.update:
            update(doc, outcomes)
    if args.update and by_hand:
        print("abridged blocks that no longer match, to edit by hand: " + ", ".join(by_hand))
    if not failed:
        print("every console block matches")
    return 1 if failed and not args.update else 0


if __name__ == "__main__":
    sys.exit(main())
