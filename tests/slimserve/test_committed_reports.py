"""The reports a fresh clone ships: every report the README cites is committed as JSON, reads
back, and is stamped with a commit, so the dashboard's Benchmarks page is never empty."""

from __future__ import annotations

import re
from pathlib import Path

from slimserve.reports import read_reports

ROOT = Path(__file__).resolve().parents[2]
# Markdown documents under reports/ that are not benchmark reports: the README's results
# section generated from the reports, and the py-spy write-up of the serving path.
MARKDOWN_ONLY = {"bench_results", "profile_serving"}


def cited_reports() -> set[str]:
    """Stems of `reports/<stem>.{md,png,json}` named in the README."""
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"reports/([a-z0-9_]+)\.(?:md|png|json)", text))


def test_every_cited_report_is_committed_as_json():
    loaded = {r.path.stem: r for r in read_reports(ROOT / "reports")}
    missing = sorted(stem for stem in cited_reports() - MARKDOWN_ONLY if stem not in loaded)
    assert not missing, f"cited by the README but not committed as reports/<name>.json: {missing}"
    problems = {stem: r.problem for stem, r in loaded.items() if r.report is None}
    assert not problems, problems


def test_committed_reports_are_stamped_with_a_clean_commit():
    for r in read_reports(ROOT / "reports"):
        assert r.report is not None, r.problem
        commit = r.report.commit or ""
        assert re.fullmatch(r"[0-9a-f]{7,12}", commit), f"{r.path.name}: commit {commit!r}"
