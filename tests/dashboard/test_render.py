"""Pure rendering helpers: Markdown escaping of model text, diff marking, the lineage graph."""

from __future__ import annotations

import re

from dashboard.render import (
    MarkdownEscaper,
    diff_words,
    escape_markdown,
    escaped_stream,
    human_bytes,
    human_count,
    lineage_dot,
    marked_markdown,
    seconds,
)
from slimserve.protocol import ModelCard

NBSP = "\u00a0"


def test_every_markdown_character_is_escaped():
    text = "# h\n* a [l](javascript:x) ![i](http://e/x.png) <b>b</b> $x$ :red[r] `c` _u_ 1."
    escaped = escape_markdown(text)
    assert not re.search(r"(?<!\\)[#*\[\]()!<>$:`_.]", escaped)
    assert escaped.replace("\\", "").replace("  \n", "\n") == text


def test_newlines_and_indentation_survive():
    assert escape_markdown("a\n    b") == f"a  \n{NBSP * 4}b"
    assert escape_markdown("\tx y") == f"{NBSP * 4}x y"  # inner spaces untouched


def test_stream_escaping_tracks_line_starts_across_chunks():
    chunks = ["def f():\n", "  ", "  return 1"]
    assert "".join(escaped_stream(chunks)) == escape_markdown("".join(chunks))
    escape = MarkdownEscaper()
    assert escape("x ") + escape(" y") == "x  y"  # not at a line start: plain spaces


def test_diff_words_marks_only_changes():
    runs = diff_words("the cat sat on the mat", "the dog sat on the mat")
    assert "".join(p for p, _ in runs) == "the dog sat on the mat"
    assert [p for p, d in runs if d] == ["dog"]
    assert diff_words("same", "same") == [("same", False)]
    assert diff_words("x", "") == []


def test_marked_markdown_wraps_escaped_changes():
    md = marked_markdown("a b c", "a [x] c")
    assert md == "a :orange-background[\\[x\\]] c"
    assert marked_markdown("a b", "a b") == "a b"


def test_lineage_dot_quotes_ids_and_draws_edges():
    cards = [
        ModelCard(id="teacher", runtime="torch", deployed=True, params_total=1_500_000),
        ModelCard(id='we"ird', parent="teacher", step="distill", deployed=False, reason="x"),
        ModelCard(id="orphan", parent="missing"),
    ]
    dot = lineage_dot(cards)
    assert '"teacher" -> "we\\"ird" [label="distill"];' in dot
    assert "missing" not in dot  # no edge to a variant that is not listed
    assert 'tooltip="not deployed: x"' in dot and "1.5M" in dot
    assert dot.startswith("digraph lineage {") and dot.endswith("}")


def test_human_numbers():
    assert [human_count(n) for n in (None, 999, 1_500, 82_000_000, 2 * 10**9)] == [
        "–", "999", "1.5k", "82M", "2B",
    ]  # fmt: skip
    assert human_bytes(512) == "512 B" and human_bytes(3 << 20) == "3 MB"
    assert seconds(None) == "–" and seconds(0.0123) == "12 ms" and seconds(2.5) == "2.50 s"
