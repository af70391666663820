"""Validate ``--json`` outputs against gradtool/schemas/*.schema.json with ``jsonschema``
(the dev extra), and read a ``--json`` error."""

from __future__ import annotations

import json

import jsonschema

from gradtool.schemas import load


def valid(name: str, text: str) -> dict:
    """Parse ``text`` (one command's stdout) and validate it against schema ``name``."""
    data = json.loads(text)
    jsonschema.Draft202012Validator(load(name)).validate(data)
    return data


def rows(text: str) -> list[dict]:
    """The rows of a ``check --json`` output, validated."""
    return valid("check", text)["rows"]


def error(result) -> dict:
    """The ``error`` object of a failed ``--json`` run: one JSON object on stdout, nothing
    on stderr but what user code printed."""
    assert "Traceback" not in result.output, result.output
    return valid("error", result.stdout)["error"]
