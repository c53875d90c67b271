"""Pure helpers that turn ingress answers into safe page content (no Streamlit import here).

Model output is untrusted text. Streamlit renders `st.write_stream` chunks and `st.markdown`
as Markdown, where `![x](http://...)` fetches an image, `[x](javascript:...)` makes a link and
`:red[...]` or `$...$` restyle text. So every model string that reaches Markdown goes through
`escape_markdown` first (HTML is never enabled at all); settled text is shown with `st.text`.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Iterable, Iterator

from slimserve.protocol import ModelCard
from slimserve.reports import Table

_PUNCT = set(string.punctuation)  # CommonMark lets a backslash escape any ASCII punctuation
_NBSP = "\u00a0"
_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


class MarkdownEscaper:
    """Escapes a text that arrives in pieces (a token stream) so its Markdown shows literally.

    Why stateful: indentation at the start of a line would open a code block, and whether a
    space is at a line start depends on the previous chunk.
    """

    def __init__(self) -> None:
        self._line_start = True

    def __call__(self, chunk: str) -> str:
        out: list[str] = []
        for ch in chunk:
            if ch == "\n":
                out.append("  \n")  # a hard line break: the model's newlines stay newlines
                self._line_start = True
                continue
            if ch in " \t" and self._line_start:
                out.append(_NBSP * (4 if ch == "\t" else 1))  # keep indentation, no code block
                continue
            self._line_start = False
            out.append("\\" + ch if ch in _PUNCT else ch)
        return "".join(out)


def escape_markdown(text: str) -> str:
    """`text` as Markdown source that renders as exactly that text."""
    return MarkdownEscaper()(text)


def escaped_stream(chunks: Iterable[str]) -> Iterator[str]:
    """Escape a stream of text deltas for `st.write_stream`."""
    escape = MarkdownEscaper()
    for chunk in chunks:
        yield escape(chunk)


def diff_words(reference: str, text: str) -> list[tuple[str, bool]]:
    """`text` split into (piece, differs-from-reference) runs, by a word-level diff."""
    ref, out = _WORDS.findall(reference), _WORDS.findall(text)
    runs: list[tuple[str, bool]] = []
    matcher = difflib.SequenceMatcher(a=ref, b=out, autojunk=False)
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        piece = "".join(out[j1:j2])
        if piece:
            runs.append((piece, tag != "equal"))
    return runs


def marked_markdown(reference: str, text: str) -> str:
    """Escaped Markdown of `text` with the runs that differ from `reference` highlighted."""
    escape = MarkdownEscaper()
    parts: list[str] = []
    for piece, differs in diff_words(reference, text):
        if differs and piece.strip():
            # the directive label is parsed as Markdown, so the escaped text stays literal
            lead = piece[: len(piece) - len(piece.lstrip())]
            core = piece.strip()
            tail = piece[len(lead) + len(core) :]
            parts.append(escape(lead) + ":orange-background[" + escape(core) + "]" + escape(tail))
        else:
            parts.append(escape(piece))
    return "".join(parts)


def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def lineage_dot(cards: list[ModelCard]) -> str:
    """Graphviz DOT of the catalogue: parent -> child edges; deployed variants filled green."""
    lines = [
        "digraph lineage {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
    ]
    ids = {c.id for c in cards}
    for c in cards:
        facts = [f for f in (c.runtime, c.params_total and human_count(c.params_total)) if f]
        label = c.id + ("\n" + " · ".join(facts) if facts else "")
        color = "#c8e6c9" if c.deployed else "#eeeeee"
        style = '"rounded,filled"' if c.deployed else '"rounded,filled,dashed"'
        tip = "deployed" if c.deployed else f"not deployed: {c.reason or 'unknown'}"
        lines.append(
            f"  {_dot_quote(c.id)} [label={_dot_quote(label)}, fillcolor={_dot_quote(color)},"
            f" style={style}, tooltip={_dot_quote(tip)}];"
        )
    for c in cards:
        if c.parent and c.parent in ids:
            step = _dot_quote(c.step or "")
            lines.append(f"  {_dot_quote(c.parent)} -> {_dot_quote(c.id)} [label={step}];")
    lines.append("}")
    return "\n".join(lines)


def human_count(n: int | None) -> str:
    """1234567 -> '1.23M' (parameter counts)."""
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def seconds(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


QUALITY_COLUMNS = ("variant", "acc", "tok_s_16", "mb_on_disk", "pareto")
"""What a table of `reports/eval.json` needs for the quality-for-speed picture."""


def quality_table(tables: list[Table]) -> Table | None:
    """The eval report's quality-for-speed table (the first holding QUALITY_COLUMNS)."""
    return next((t for t in tables if set(QUALITY_COLUMNS) <= set(t.columns)), None)


def pareto_line(records: list[dict]) -> list[dict]:
    """The front's points in order of tokens/s, to be joined by a line."""
    front = [r for r in records if r.get("pareto") and r.get("tok_s_16") is not None]
    return sorted(front, key=lambda r: r["tok_s_16"])


def quality_chart_spec(records: list[dict]) -> dict:
    """A Vega-Lite spec: one point per variant (x tokens/s at 16 clients, y accuracy, area
    by MB on disk, orange on the Pareto front), the front as a dashed line, names beside."""
    points = [r for r in records if r.get("tok_s_16") is not None and r.get("acc") is not None]
    room = {"zero": False, "padding": 24}  # no point or label cut at the plot's edge
    x = {
        "field": "tok_s_16",
        "type": "quantitative",
        "title": "served tokens/s, 16 clients",
        "scale": room,
    }
    y = {
        "field": "acc",
        "type": "quantitative",
        "title": "next-words accuracy (API)",
        "scale": room,
    }
    colour = {
        "field": "pareto",
        "type": "nominal",
        "title": "Pareto front",
        "scale": {"domain": [True, False], "range": ["#f58518", "#4c78a8"]},
    }
    tooltip = [{"field": c, "type": "nominal"} for c in ("variant", "acc", "tok_s_16")]
    tooltip.append({"field": "mb_on_disk", "type": "quantitative", "title": "MB on disk"})
    return {
        "layer": [
            {
                "data": {"values": pareto_line(points)},
                "mark": {"type": "line", "strokeDash": [6, 4], "color": "#f58518"},
                "encoding": {"x": x, "y": y},
            },
            {
                "data": {"values": points},
                "mark": {"type": "circle", "opacity": 0.7, "stroke": "black"},
                "encoding": {
                    "x": x,
                    "y": y,
                    "size": {
                        "field": "mb_on_disk",
                        "type": "quantitative",
                        "title": "MB on disk",
                        "scale": {"zero": True, "range": [40, 1200]},
                    },
                    "color": colour,
                    "tooltip": tooltip,
                },
            },
            {
                "data": {"values": points},
                "mark": {"type": "text", "align": "left", "dx": 8, "dy": -8, "fontSize": 11},
                "encoding": {"x": x, "y": y, "text": {"field": "variant"}},
            },
        ],
    }
