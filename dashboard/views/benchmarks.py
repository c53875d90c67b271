"""Benchmarks: every report under `reports/` (schema in `slimserve.reports`), newest first.

The page knows no benchmark by name: it draws each report's charts and tables, so a new
benchmark shows up here as soon as it writes a report. One picture comes first: quality for
speed, from `reports/eval.json` (`make eval`), every served variant one point.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.render import escape_markdown, quality_chart_spec, quality_table
from slimserve.reports import Report, read_report, read_reports

EVAL_REPORT = "eval.json"
# the quality table's columns shown beside the picture (the report's expander has them all)
BESIDE = (
    "variant", "acc", "token_perplexity", "agreement", "mb_on_disk", "tok_s_16", "e2e_p50_ms_16",
)  # fmt: skip


def reports_dir() -> Path:
    return Path(os.environ.get("SLIMSERVE_REPORTS_DIR") or "reports")


def frame(report: Report, index: int) -> pd.DataFrame:
    table = report.tables[index]
    return pd.DataFrame(table.rows, columns=table.columns)


def show(report: Report) -> None:
    machine = report.machine
    where = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, GPU {machine.get('gpu', '?')}"
    bits = [f"`{report.kind}`", report.created.strftime("%Y-%m-%d %H:%M UTC"), where]
    if report.commit:
        bits.append(f"commit `{report.commit}`")
    st.caption(" · ".join(bits))
    if report.command:
        st.code(report.command, language="bash", wrap_lines=True)
    charts = st.columns(min(2, len(report.charts))) if report.charts else []
    for i, chart in enumerate(report.charts):
        data = frame(report, chart.table)
        labels = {"x_label": chart.x_label or chart.x, "y_label": chart.y_label}
        with charts[i % len(charts)]:
            st.markdown(f"**{chart.title}**")
            if chart.type == "line":
                st.line_chart(data, x=chart.x, y=chart.y, **labels)
            else:  # bars in the report's row order (a sweep's order is meaningful)
                st.bar_chart(data, x=chart.x, y=chart.y, sort=False, **labels)
    for i, table in enumerate(report.tables):
        st.markdown(f"**{table.title}**")
        st.dataframe(frame(report, i), hide_index=True)
    for note in report.notes:
        st.markdown(f"- {note}")


def quality_for_speed(folder: Path) -> None:
    """Accuracy against served tokens/s per variant, with the table it is drawn from."""
    st.subheader("Quality for speed")
    path = folder / EVAL_REPORT
    if not path.is_file():
        st.info(
            f"No quality report yet: `make eval` runs lm-evaluation-harness on every served "
            f"variant and writes `{folder}/{EVAL_REPORT}`.",
            icon=":material/info:",
        )
        return
    loaded = read_report(path)
    table = quality_table(loaded.report.tables) if loaded.report else None
    if loaded.report is None or table is None:
        problem = loaded.problem or "no quality-for-speed table"
        st.warning(f"`{path.name}` cannot be drawn: {escape_markdown(problem)}")
        return
    st.caption(
        f"x: served tokens/s at 16 clients, y: task accuracy through the API, area: bytes on "
        f"disk; orange: the Pareto front. Commit `{loaded.report.commit}`."
    )
    chart, numbers = st.columns(2)
    with chart:
        st.vega_lite_chart(quality_chart_spec(table.records()), use_container_width=True)
    with numbers:
        frame = pd.DataFrame(table.rows, columns=table.columns)
        shown = [c for c in BESIDE if c in frame.columns]
        st.dataframe(frame[shown], hide_index=True)
        sources = next(
            (t for t in loaded.report.tables if t.columns[:2] == ["column", "source"]), None
        )
        if sources is not None:
            st.dataframe(pd.DataFrame(sources.rows, columns=sources.columns), hide_index=True)


def page() -> None:
    st.title("Benchmarks")
    folder = reports_dir()
    quality_for_speed(folder)
    loaded = read_reports(folder)
    good = [r.report for r in loaded if r.report is not None]
    bad = [r for r in loaded if r.report is None]
    if not good:
        st.info(
            f"No results yet: run `make bench` (reports are read from `{folder}/`).",
            icon=":material/info:",
        )
    for i, report in enumerate(good):
        with st.expander(report.title, expanded=i < 3):
            show(report)
    if bad:
        lines = "\n".join(f"- `{r.path.name}`: {escape_markdown(r.problem or '')}" for r in bad)
        st.warning(
            f"Skipped {len(bad)} file(s) in `{folder}/` that are not valid reports:\n{lines}"
        )


page()
