"""Files on disk: ``-o`` never replaces what is not a regular file, files get the user's umask,
the kernel cache survives damage and unusable folders, and names never become paths."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.codegen import cache
from gradtool.errors import GradtoolError
from gradtool.fileio import write_user_file

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_fallback", [])
    # each test compiles afresh: forget modules another test imported under the same key
    for name in [n for n in sys.modules if n.startswith("gradtool_kernels.")]:
        monkeypatch.delitem(sys.modules, name)


def _derive_o(path) -> tuple[int, str]:
    result = runner.invoke(app, ["derive", "relu", "--code", "numpy", "-o", str(path)])
    return result.exit_code, result.output


def test_output_file_gets_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        code, _ = _derive_o(tmp_path / "relu.py")
    finally:
        os.umask(old)
    assert code == 0
    assert stat.S_IMODE((tmp_path / "relu.py").stat().st_mode) == 0o640


@pytest.mark.parametrize("kind", ["folder", "symlink", "device", "missing-parent"])
def test_output_refuses_what_is_not_a_regular_file(tmp_path, kind):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    path = {"folder": tmp_path, "symlink": tmp_path / "link.py", "device": Path("/dev/null"),
            "missing-parent": tmp_path / "nowhere" / "x.py"}[kind]
    if kind == "symlink":
        path.symlink_to(target)
    code, out = _derive_o(path)
    assert code == 1 and f"cannot write {path}" in out and "Traceback" not in out
    assert target.read_text() == "keep me"
    assert not list(tmp_path.glob(".*.tmp"))
    if kind == "symlink":
        assert path.is_symlink()


def test_unwritable_output_names_the_users_path(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("gradtool.fileio.write_atomic", refuse)
    with pytest.raises(GradtoolError, match=r"cannot write out\.py: Permission denied"):
        write_user_file("out.py", "x = 1\n")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "folder"])
def test_damaged_cache_file_is_regenerated(tmp_path, damage, capsys):
    first = cache.compile_spec("relu", "numpy")
    path = Path(first.__file__)
    del sys.modules[first.__name__]
    text = path.read_text()
    if damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00#!@ not python",
                         "empty": ""}[damage])
    mod = cache.compile_spec("relu", "numpy")
    x = np.array([[-1.0, 2.0]])
    y, _ = mod.forward(x)
    assert np.array_equal(y, [[0.0, 2.0]])
    err = capsys.readouterr().err
    assert "damaged; regenerated" in err or "cannot use the kernel cache" in err
    if damage != "folder":
        assert cache._intact(path)


@pytest.mark.parametrize("where", ["a-file", "under-proc"])
def test_unusable_cache_folder_falls_back_with_a_warning(tmp_path, where, monkeypatch, capsys):
    if where == "a-file":
        folder = tmp_path / "not-a-folder"
        folder.write_text("x")
    else:
        folder = Path("/proc/gradtool-cache")
    monkeypatch.setenv("GRADTOOL_CACHE", str(folder))
    mod = cache.compile_spec("relu", "numpy")
    assert not Path(mod.__file__).is_relative_to(folder)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GRADTOOL_CACHE" in err and str(folder) in err


@pytest.mark.parametrize("error", [OSError("generator failed"), TimeoutError("time limit")])
def test_an_error_while_generating_is_not_taken_for_an_unusable_cache(error, monkeypatch,
                                                                       capsys):
    """Only the file operations fall back to a private folder: an OSError raised while the
    kernel is generated (TimeoutError is one) propagates, and the kernel is generated once
    (finding 18: a time limit's TimeoutError was swallowed here and derivation started over)."""
    calls = []

    def failing(spec, target):
        calls.append(target)
        raise error

    monkeypatch.setattr(cache, "generate", failing)
    with pytest.raises(type(error)):
        cache.compile_spec("relu", "numpy")
    assert calls == ["numpy"] and "GRADTOOL_CACHE" not in capsys.readouterr().err


def _spec_file(tmp_path, header: str, extra: str = "") -> Path:
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent(f"""\
        from gradtool.lang import Spec
        spec = {header}
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        {extra}
        spec.output("Y", [n, d], X[n, d] ** 2)
        """))
    return path


@pytest.mark.parametrize("header, message", [
    ('Spec("../../x", "escape")', "the spec's name '../../x' is not a valid name"),
    ('Spec("my layer", "d")', "is not a valid name"),
    ('Spec("2layer", "d")', "is not a valid name"),
    ('Spec("layer.v2", "d")', "is not a valid name"),
    ('Spec(42, "d")', "the spec's name 42 is not a valid name"),
    ('Spec("ok", 5)', "the spec's description must be text"),
])
def test_spec_names_are_refused_at_the_declaring_line(tmp_path, header, message):
    path = _spec_file(tmp_path, header)
    result = runner.invoke(app, ["derive", str(path), "--code", "torch"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{path}:2:" in result.output and message in result.output
    assert not list(tmp_path.parent.glob("*.py")) and not (tmp_path / "cache").exists()


def test_non_finite_hyper_default_is_refused(tmp_path):
    path = _spec_file(tmp_path, 'Spec("ok", "d")', 'h = spec.hyper("h", float("inf"))')
    result = runner.invoke(app, ["derive", str(path)])
    assert result.exit_code == 1 and f"{path}:6:" in result.output
    assert "default inf" in result.output


def test_description_with_quotes_and_backslashes_generates_valid_code(tmp_path):
    path = _spec_file(tmp_path, 'Spec("quoted", r\'three """ quotes and \\sigma\')')
    for target in ("numpy", "torch"):
        mod = cache.compile_spec(str(path), target)
        assert '""" quotes and \\sigma' in mod.__doc__


@pytest.mark.parametrize("tol", ["inf", "nan", "-1", "0"])
def test_tolerance_must_be_finite_and_positive(tol):
    result = runner.invoke(app, ["check", "relu", "--tol", tol])
    assert result.exit_code == 2 and "not a finite number above zero" in result.output


@pytest.mark.parametrize("shape, message", [
    ("N=100000,D=100000", "would have 10000000000×10000000000 entries"),
    ("D=99999999999999999999", "too large"),
    ("N=²", "cannot read --shape part 'N=²'"),
    ("N=1,N=2", "gives N twice"),
    ("", "cannot read --shape part ''"),
])
def test_bad_shapes_fail_at_once(shape, message):
    result = runner.invoke(app, ["derive", "layernorm", "--shape", shape])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_four_processes_share_one_cache_for_several_rounds(tmp_path):
    """Four processes compiling the same specs at once, twice over, all succeed and leave one
    intact file per kernel (atomic writes; a reader never sees half a file)."""
    import subprocess

    script = textwrap.dedent("""
        from gradtool.codegen.cache import compile_spec
        for name in ("relu", "tanh", "sigmoid"):
            compile_spec(name, "numpy")
    """)
    env = {**os.environ, "GRADTOOL_CACHE": str(tmp_path / "shared")}
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-c", script], env=env,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
        assert not any("damaged" in e or "cannot use" in e for e in errors), errors
    files = sorted((tmp_path / "shared").glob("*.py"))
    assert len(files) == 3 and all(cache._intact(f) for f in files)
    assert not list((tmp_path / "shared").glob(".*.tmp"))
