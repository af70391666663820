"""Fixtures shared by several test files."""

from __future__ import annotations

import sys

import pytest


def kernel_modules() -> dict:
    """The generated kernel modules imported so far (``gradtool_kernels.*``)."""
    return {k: v for k, v in sys.modules.items() if k.startswith("gradtool_kernels.")}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh kernel cache in tmp_path and no imported kernels; the imported ones are put back
    afterwards, so that no other test sees a kernel generated (or edited) here."""
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path))
    saved = kernel_modules()
    for k in saved:
        del sys.modules[k]
    yield tmp_path
    for k in kernel_modules():
        del sys.modules[k]
    sys.modules.update(saved)
