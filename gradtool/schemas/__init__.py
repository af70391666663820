"""JSON Schemas (draft 2020-12) of every ``--json`` output; docs/json.md explains them.

>>> sorted(SCHEMAS)
['check', 'derive', 'error', 'train']
>>> load("check")["properties"]["version"]["$ref"]
'#/$defs/version'
"""

from __future__ import annotations

import json
from importlib import resources

SCHEMAS = ("check", "derive", "error", "train")


def load(name: str) -> dict:
    """The schema of ``gradtool NAME --json`` (``error``: what any command prints with
    ``--json`` when it fails). Raises ``KeyError`` for another name."""
    if name not in SCHEMAS:
        raise KeyError(f"no JSON schema named {name!r}; there are {', '.join(SCHEMAS)}")
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)
