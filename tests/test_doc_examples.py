"""Every console block of README.md and docs/*.md is what the tool prints now (see
tests/doc_examples.py; ``python3 -m tests.doc_examples --update`` rewrites them)."""

from __future__ import annotations

import pytest

from tests import doc_examples as de

BLOCKS = [b for doc in de.documents() for b in de.blocks(doc)]
RUNNABLE = [b for b in BLOCKS if not b.illustrative]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_console_block_is_what_the_tool_prints(block):
    outcome = de.check_block(block)
    assert not outcome.differences, (
        f"{block.name} differs from what gradtool prints now; rewrite it with "
        "`python3 -m tests.doc_examples --update` (an abridged block by hand):\n"
        + "\n".join(outcome.differences))


def test_every_console_block_runs_or_says_why_not():
    """A block is run unless marked illustrative; the runnable ones are most of them."""
    assert RUNNABLE and len(RUNNABLE) >= len(BLOCKS) // 2
    for block in RUNNABLE:
        for command, _ in de.steps(block):
            words = de.command_words(command)
            assert words[0] == "gradtool" or words == ["echo", "$?"], block.name


def test_abridged_blocks_match_around_the_ellipsis():
    actual = ["a", "b", "c", "d"]
    assert de.match(["a", "…", "d"], actual) == [0, -1, 3]
    assert de.match(["a", "...", "c", "…"], actual) == [0, -1, 2, -1]
    assert de.match(["a", "c"], actual) is None
    assert de.match(["b", "…"], actual) is None


def test_times_and_run_folders_do_not_count():
    assert de.normal("verified linear (30 comparisons, 0.2 s)") == \
        de.normal("verified linear (30 comparisons, 12.5 s)")
    assert de.normal("run folder runs/digits-mlp-20261130-081541 on cpu") == \
        de.normal("run folder runs/digits-mlp-20270101-000000 on cpu")
    assert de.normal("│ 0.856 │") != de.normal("│ 0.857 │")


def test_update_rewrites_a_block_in_place(tmp_path, monkeypatch):
    doc = tmp_path / "page.md"
    doc.write_text("Intro\n\n```console\n$ gradtool derive relu\nstale output\n```\n\nEnd\n")
    monkeypatch.setattr(de, "ROOT", tmp_path)
    for name in ("docs", "specs", "tests"):
        (tmp_path / name).mkdir()
    (block,) = de.blocks(doc)
    outcome = de.check_block(block)
    assert outcome.differences
    de.update(doc, [outcome])
    text = doc.read_text()
    assert "stale output" not in text and "dX[n,d] = " in text
    assert text.startswith("Intro\n\n```console\n$ gradtool derive relu\n") and \
        text.endswith("```\n\nEnd\n")
    (block,) = de.blocks(doc)
    assert not de.check_block(block).differences
