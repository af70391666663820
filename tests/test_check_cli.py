"""``gradtool check`` through typer's CliRunner: JSON rows, a bug injected into a generated
kernel, ``--impl`` error messages, ``--float32``, ``--order 2`` and ``--map``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradtool.cli import app
from tests.conftest import kernel_modules
from tests.json_schemas import rows as json_rows

runner = CliRunner()
ZOO = Path(__file__).parent / "bug_zoo"
BROKEN = ZOO / "broken.py"
ROW_KEYS = {"spec", "kind", "tensor", "input", "oracle", "shape", "input_scale", "max_abs",
            "max_rel", "index", "analytic", "numeric", "allowed", "passed", "diagnoses", "note"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


def rows_of(*args, exit_code: int = 0) -> list[dict]:
    result = invoke(*args, "--json")
    assert result.exit_code == exit_code, result.output
    rows = json_rows(result.stdout)
    assert rows and all(set(r) == ROW_KEYS and isinstance(r["passed"], bool) for r in rows)
    return rows


def fails_cleanly(*args) -> str:
    """Exit 1 with one ``error:`` line on stderr and no traceback; returns that line."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def fails_with_table(*args) -> str:
    """Exit 1 with failed rows in the table (not an error line); returns stdout."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "error:" not in result.stderr, result.output
    assert "comparisons failed" in result.stdout
    return result.stdout


# -- plain checks -----------------------------------------------------------------------------

def test_check_layernorm_passes():
    assert "all" in ok("check", "layernorm") and "comparisons passed" in ok("check", "layernorm")


def test_check_table_in_a_log_keeps_every_column_whole():
    """Output to a pipe or a CI log is not cut to 80 columns: every header and oracle name is
    printed in full."""
    out = ok("check", "relu", "--show", "all")
    for text in ("max abs err", "oracle value", "allowed", "finite differences",
                 "numpy vs torch kernels", "kinks avoided"):
        assert text in out, text


def test_check_default_is_one_line_per_spec_and_input():
    """The default view: a line per (spec, input) with its verdict; the full table only with
    --show all."""
    out = ok("check", "batchnorm", "--shapes", "2")
    lines = [line for line in out.splitlines() if line.startswith("│")]
    labels = [" ".join(line.strip("│ ").split(" │ ")[:2]) for line in lines]
    # batchnorm: Y, two state updates, X, gamma, beta; its eval form: Y, X, gamma, beta
    assert len(lines) == 10, out
    assert sum("running_mean (state update)" in x for x in labels) == 1
    assert all(line.rstrip("│ ").endswith("pass") for line in lines), out
    assert "max abs err" not in out and "comparisons passed" in out


@pytest.mark.parametrize("show", ["inputs", "all", "failed"])
@pytest.mark.parametrize("width", [50, 80])
def test_names_are_never_cut_on_a_narrow_terminal(show, width):
    from rich.console import Console

    from gradtool.check.runner import Row
    from gradtool.render import render_check

    rows = [Row("batchnorm", f"running_{s} (state update)", "finite differences (random "
                "probes)", "C=3,N=2", 0.5, 0.5, [1], 1.0, 2.0, 1e-6, s == "mean", "")
            for s in ("mean", "var")]
    console = Console(width=width, record=True, force_terminal=True)
    render_check(console, rows, show=show)
    text = console.export_text()
    table = [line for line in text.splitlines() if line.startswith("│")]
    assert "…" not in text
    assert any("running_var (state update)" in line for line in table)
    assert show == "failed" or any("running_mean (state update)" in line for line in table)
    if show == "all" or width >= 80 and show != "inputs":
        assert any("finite differences (random probes)" in line for line in table)
    assert "running_var[1]: ours 1, expected 2" in text  # the failure spelled out below


def test_default_view_spells_out_each_failed_input():
    out = fails_with_table("check", "layernorm", "--impl",
                           f"{ZOO / 'layernorm.py'}:LayerNormNoMeanTerm", "--shapes", "2")
    x_line = next(line for line in out.splitlines() if line.startswith("│ layernorm │ X "))
    assert "FAIL" in x_line
    assert "layernorm X: 7 of 7 comparisons failed" in out  # 2 shapes × 3 oracles, zeros
    assert "wrong almost everywhere" in out


def test_check_json_rows():
    rows = rows_of("check", "layernorm", "softmax")
    assert {r["spec"] for r in rows} == {"layernorm", "softmax"}
    assert all(r["passed"] for r in rows)
    assert {"finite differences", "torch.autograd", "reference"} <= {r["oracle"] for r in rows}


@pytest.mark.parametrize("flags", [["--float32"], ["--order", "2"]], ids=lambda f: f[0])
def test_float32_and_second_order_pass(flags):
    rows = rows_of("check", "layernorm", *flags)
    oracle = "float32 kernels vs float64" if flags[0] == "--float32" else "2nd order (probes)"
    assert any(r["oracle"] == oracle for r in rows)
    assert all(r["passed"] for r in rows)


# -- a bug injected into a generated kernel ---------------------------------------------------

def _flip_first_minus_in_dX(lines):
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("dX = ")
             and not line.rstrip().endswith("None"))  # not `dX = dgamma = dbeta = None`
    # the statement may go on over continuation lines (generated lines stay within 100
    # characters): flip the first subtraction in it, wherever its line breaks
    indent = len(lines[i]) - len(lines[i].lstrip())
    end = next((j for j in range(i + 1, len(lines))
                if len(lines[j]) - len(lines[j].lstrip()) <= indent), len(lines))
    j = next(j for j in range(i, end) if " - " in lines[j] or lines[j].lstrip().startswith("- "))
    if " - " in lines[j]:
        lines[j] = lines[j].replace(" - ", " + ", 1)
    else:
        lines[j] = lines[j].replace("- ", "+ ", 1)


def _scale_one_dgamma(lines):
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("dgamma = "))
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    lines.insert(i + 1, f"{indent}dgamma[0] *= 1.001")


@pytest.mark.parametrize("wrong, edit", [("X", _flip_first_minus_in_dX),
                                         ("gamma", _scale_one_dgamma)], ids=["dX", "dgamma"])
def test_bug_injected_into_generated_kernel_is_caught(private_cache, wrong, edit):
    from gradtool.codegen.cache import _with_checksum, compile_spec

    module = compile_spec("layernorm", "numpy")
    path = Path(module.__file__)
    assert path.parent == private_cache
    lines = [line for line in path.read_text().splitlines()
             if not line.startswith("# gradtool-checksum: ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("def backward("))
    body = lines[start:]
    edit(body)
    # a consistent checksum, or the cache would see a damaged file and regenerate it
    path.write_text(_with_checksum("\n".join(lines[:start] + body) + "\n"))
    for k in kernel_modules():
        del sys.modules[k]  # re-import the edited file

    rows = rows_of("check", "layernorm", exit_code=1)
    bad = [r for r in rows if not r["passed"]]
    assert {r["input"] for r in bad} == {wrong}, bad
    assert "finite differences" in {r["oracle"] for r in bad}
    if wrong == "gamma":
        assert all(r["index"] == [0] for r in bad)


# -- --impl ---------------------------------------------------------------------------------

IMPL_ERRORS = {
    "missing_file": (ZOO / "nope.py", "Nope", "does not exist"),
    "missing_class": (BROKEN, "Missing", "no `Missing` in this file"),
    "not_a_layer": (BROKEN, "NoBackward", "neither a class with forward and backward"),
    "unknown_init_argument": (BROKEN, "NeedsHiddenSize", "no value for `hidden_size`"),
    "forward_raises": (BROKEN, "ForwardRaises",
                       "broken.py:50: ForwardRaises.forward(X) raised ValueError"),
    "backward_signature": (BROKEN, "BackwardWrongSignature", "backward raised TypeError"),
}


@pytest.mark.parametrize("case", IMPL_ERRORS.values(), ids=IMPL_ERRORS.keys())
def test_impl_error(case):
    path, name, message = case
    assert message in fails_cleanly("check", "layernorm", "--impl", f"{path}:{name}")


def test_impl_error_is_exactly_one_line():
    """No blank line before ``error:`` when the layer fails inside the progress bar."""
    result = invoke("check", "layernorm", "--impl", f"{BROKEN}:ForwardRaises")
    assert result.exit_code == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, \
        repr(result.stderr)


def test_impl_without_colon():
    assert "FILE.py:NAME" in fails_cleanly("check", "layernorm", "--impl", BROKEN)


def test_impl_wrong_output_shape():
    out = fails_with_table("check", "layernorm", "--impl", f"{BROKEN}:TransposedOutput")
    assert re.search(r"shape \((\d+), (\d+)\) but expected \(\2, \1\)", out), out


def test_impl_nan_backward():
    out = fails_with_table("check", "layernorm", "--impl", f"{BROKEN}:NaNBackward",
                           "--show", "failed")
    assert "non-finite values (NaN or inf) in the gradient" in out


def test_impl_correct_layer_passes():
    assert "comparisons passed" in ok("check", "layernorm", "--impl",
                                      f"{ZOO / 'layernorm.py'}:LayerNorm")


def test_impl_buggy_layer_fails_on_X():
    rows = rows_of("check", "layernorm", "--impl", f"{ZOO / 'layernorm.py'}:LayerNormNoMeanTerm",
                   exit_code=1)
    assert {r["input"] for r in rows if not r["passed"]} == {"X"}


def test_map_names_parameters():
    target = f"{ZOO / 'layernorm.py'}:LayerNormWeightBias"
    assert "no gradient for `gamma`" in fails_cleanly("check", "layernorm", "--impl", target)
    ok("check", "layernorm", "--impl", target, "--map", "gamma=weight", "--map", "beta=bias")


def test_map_malformed():
    assert "--map" in fails_cleanly("check", "layernorm", "--impl",
                                    f"{ZOO / 'layernorm.py'}:LayerNorm", "--map", "gamma")


def test_a_forward_undefined_at_the_sampled_inputs_asks_for_a_domain(tmp_path):
    """log of an input declared without a domain is NaN at negative samples: the failure
    says to declare the domain, and names no derivation or code-generation fault (the oracle
    is NaN, so it cannot tell whose fault anything is)."""
    path = tmp_path / "logx.py"
    path.write_text('from gradtool.lang import Spec, log\n'
                    'spec = Spec("logx", "log of an input without a domain")\n'
                    'N, D = spec.dims("N D")\nn, d = spec.indices(n=N, d=D)\n'
                    'X = spec.input("X", N, D)\n'
                    'spec.output("Y", [n, d], log(X[n, d]) * 2)\n')
    out = " ".join(fails_with_table("check", str(path), "--show", "failed").split())
    assert 'declare the input\'s domain (spec.input(..., domain="positive"))' in out
    assert "derived formula" not in out and "code-generation fault" not in out
    path.write_text(path.read_text().replace('("X", N, D)', '("X", N, D, domain="positive")'))
    assert "comparisons passed" in ok("check", str(path))


@pytest.mark.parametrize("kind", ["numpy", "function"])
def test_a_layer_for_another_spec_is_named_by_its_output_shape(tmp_path, kind):
    """relu checked as linear: its output has I columns where linear's has O, which is said
    before its backward is called with an upstream gradient it cannot take."""
    path = tmp_path / "relu.py"
    path.write_text(
        "import numpy as np\nimport torch\n\n\nclass Relu:\n"
        "    def forward(self, X):\n        self.X = X\n        return np.maximum(X, 0)\n\n"
        "    def backward(self, G):\n        return G * (self.X > 0)\n\n\n"
        "class ReluFn(torch.autograd.Function):\n    @staticmethod\n"
        "    def forward(ctx, X, W, b):\n        ctx.save_for_backward(X)\n"
        "        return X.clamp(min=0)\n\n    @staticmethod\n    def backward(ctx, G):\n"
        "        X, = ctx.saved_tensors\n        return G * (X > 0), None, None\n")
    name = "Relu" if kind == "numpy" else "ReluFn"
    err = fails_cleanly("check", "linear", "--impl", f"{path}:{name}", "--shape", "I=4,O=2")
    assert f"{name}.forward returned `Y` of shape (1, 4), but linear's `Y` has shape (1, 2)" \
        in " ".join(err.split()), err


def test_diagnoses_name_the_precision_and_print_a_scale_that_is_not_one():
    """A gradient of float16 numbers is float16 precision (not float32, though each float16 is
    a float32 too); a gradient 1.0001 × the expected one reads "1.0001 ×", not "1 ×"."""
    import numpy as np

    from gradtool.check.runner import diagnose

    rng = np.random.default_rng(0)
    r = rng.standard_normal((4, 5))
    for narrow, code in ((np.float16, "float16_precision"), (np.float32, "float32_precision")):
        a = r.astype(narrow).astype(np.float64)
        assert diagnose(a, r, np.abs(a - r) > 1e-12)[0] == code
    a = 1.0001 * r
    got = diagnose(a, r, np.abs(a - r) > 1e-12)
    assert got[0] == "global_scale" and "1.0001 ×" in got[1], got
    assert "2 ×" in diagnose(2 * r, r, np.ones_like(r, dtype=bool))[1]
