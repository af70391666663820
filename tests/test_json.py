"""Every ``--json`` output against its JSON Schema (gradtool/schemas, docs/json.md): derive,
check (rows with kinds, shapes as objects, diagnoses as codes), errors, usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradtool import __version__
from gradtool.cli import app
from tests.json_schemas import error, rows, valid

runner = CliRunner()
ZOO = Path(__file__).parent / "bug_zoo"
VERSION = {"schema": 1, "gradtool": __version__}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args", [
    ("layernorm",), ("linear", "--steps"), ("softmax", "--jacobian", "--shape", "N=1,C=3"),
    ("matmul",)])
def test_derive_json_matches_its_schema(args):
    result = run("derive", *args, "--json")
    assert result.exit_code == 0, result.output
    assert valid("derive", result.stdout)["version"] == VERSION


def test_check_json_rows_have_kind_tensor_and_shape_object():
    result = run("check", "batchnorm", "--shapes", "1", "--no-batch-one", "--json")
    assert result.exit_code == 0, result.output
    data = valid("check", result.stdout)
    assert data["version"] == VERSION and data["passed"] is True
    assert data["comparisons"] == len(data["rows"]) and data["failed"] == 0
    kinds = {(r["kind"], r["tensor"]) for r in data["rows"]}
    assert {("gradient", "X"), ("gradient", "gamma"), ("forward", "Y"),
            ("state_update", "running_mean"), ("state_update", "running_var")} <= kinds
    for r in data["rows"]:
        assert set(r["shape"]) == {"N", "C"} and all(v >= 1 for v in r["shape"].values())
        assert r["input"].startswith(r["tensor"])


def _wrong_relu(tmp_path, backward: str) -> Path:
    path = tmp_path / "my_relu.py"
    path.write_text(
        "import numpy as np\n\n"
        "class ReLU:\n"
        "    def forward(self, X):\n"
        "        self.X = X\n"
        "        return np.maximum(X, 0)\n\n"
        "    def backward(self, G):\n"
        f"        return {backward}\n")
    return path


@pytest.mark.parametrize("backward, code", [
    ("-G * (self.X > 0)", "wrong_sign"),
    ("2 * G * (self.X > 0)", "global_scale"),
])
def test_check_json_diagnosis_is_a_code_beside_its_sentence(tmp_path, backward, code):
    path = _wrong_relu(tmp_path, backward)
    result = run("check", "relu", "--impl", f"{path}:ReLU", "--json")
    assert result.exit_code == 1, result.output
    data = valid("check", result.stdout)
    assert data["passed"] is False and data["failed_specs"] == ["relu"]
    bad = [r for r in data["rows"] if not r["passed"]]
    assert bad and all(r["kind"] == "gradient" and r["tensor"] == "X" for r in bad)
    for r in bad:
        assert r["diagnoses"][-1]["code"] == code
        assert r["diagnoses"][-1]["text"] in r["note"]


def test_check_json_contract_rows(tmp_path):
    """A backward that changes grad_out in place: a contract row with its own kind and
    code (the row's gradient is still right, so only the contract fails)."""
    path = _wrong_relu(tmp_path, "np.multiply(G, self.X > 0, out=G)")
    result = run("check", "relu", "--impl", f"{path}:ReLU", "--json")
    assert result.exit_code == 1, result.output
    bad = [r for r in rows(result.stdout) if not r["passed"]]
    assert [(r["kind"], r["tensor"]) for r in bad] == [("contract", None)]
    assert bad[0]["diagnoses"][0]["code"] == "contract_grad_out_not_mutated"


@pytest.mark.parametrize("args, kind, code", [
    (("derive", "no_such_spec"), "error", 1),
    (("check", "no_such_spec"), "error", 1),
    (("check", "relu", "--order", "3"), "usage", 2),
    (("derive", "relu", "--no-such-option"), "usage", 2),
    (("train", "--hidden", "a,b"), "error", 1),
])
def test_errors_with_json_are_one_object_on_stdout(args, kind, code):
    result = run(*args, "--json")
    assert result.exit_code == code, result.output
    err = error(result)
    assert err["kind"] == kind and err["exit_code"] == code and err["message"]
    assert result.stderr == ""


def test_spec_error_with_json_names_file_line_and_hint(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from gradtool.lang import Spec\nspec = Spec('bad', 'x')\n"
                    "N = spec.dims('N')\nX = spec.input('X', N)\nspec.output('Y', [], X[k])\n")
    result = run("derive", path, "--json")
    err = error(result)
    assert err["file"] == str(path) and isinstance(err["line"], int) and err["hint"]
    assert err["text"].startswith(f"{path}:{err['line']}: {err['message']}")


def test_without_json_errors_stay_one_line_on_stderr():
    result = run("check", "no_such_spec")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error:")
    json.dumps(result.stderr)  # plain text, not JSON
