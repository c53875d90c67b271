"""The report schema: what benchmarks write and the Benchmarks page reads back."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from slimserve.reports import (
    SCHEMA,
    Chart,
    Report,
    Table,
    new_report,
    read_report,
    read_reports,
    render_markdown,
    write_report,
)

MACHINE = {"cpu": "test cpu", "cores": 2, "gpu": "none"}


def sweep(name: str = "prune-sweep", created: datetime | None = None) -> Report:
    table = Table.from_records(
        "perplexity vs sparsity",
        [
            {"sparsity": 0.0, "perplexity": 40.0},
            {"sparsity": 0.5, "perplexity": 41.5, "note": "kept head"},
            {"sparsity": 0.9, "perplexity": None},
        ],
    )
    report = new_report(
        name,
        kind="prune-sweep",
        title="L1 sweep",
        tables=[table],
        charts=[Chart(title="ppl", type="line", x="sparsity", y=["perplexity"])],
        notes="one finding",
        machine=MACHINE,
        command="pytest",
    )
    if created is not None:
        report = report.model_copy(update={"created": created})
    return report


def test_from_records_unions_columns_and_fills_gaps():
    table = sweep().tables[0]
    assert table.columns == ["sparsity", "perplexity", "note"]
    assert table.rows[0] == [0.0, 40.0, None]
    assert table.records()[1]["note"] == "kept head"


def test_new_report_stamps_machine_versions_and_command():
    report = sweep()
    assert report.schema_id == SCHEMA
    assert report.machine == MACHINE
    assert report.versions["python"].count(".") == 2
    assert "pydantic" not in report.versions  # only what decides a figure
    assert report.command == "pytest"
    assert report.notes == ["one finding"]
    assert report.created.tzinfo is not None


def test_new_report_detects_machine_when_not_given():
    report = new_report("x", kind="k", title="t", tables=[], command="c")
    assert {"cpu", "cores", "gpu"} <= set(report.machine)


def test_write_then_read_round_trips(tmp_path):
    paths = write_report(sweep(), tmp_path, png=False)
    assert [p.name for p in paths] == ["prune-sweep.json", "prune-sweep.md"]
    data = json.loads(paths[0].read_text())
    assert data["schema"] == SCHEMA and "schema_id" not in data
    loaded = read_reports(tmp_path)
    assert len(loaded) == 1 and loaded[0].problem is None
    assert loaded[0].report == sweep().model_copy(update={"created": loaded[0].report.created})
    assert "| 0.5 | 41.5 | kept head |" in paths[1].read_text()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_write_png_when_charts(tmp_path):
    paths = write_report(sweep(), tmp_path)
    png = tmp_path / "prune-sweep.png"
    assert png in paths and png.read_bytes()[:4] == b"\x89PNG"
    assert "![L1 sweep](prune-sweep.png)" in (tmp_path / "prune-sweep.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"charts": [Chart(title="c", x="sparsity", y=["nope"])]}, "'nope' is not a column"),
        ({"charts": [Chart(title="c", table=3, x="a", y=["b"])]}, "table 3 does not exist"),
        ({"charts": [Chart(title="c", x="sparsity", y=["note"])]}, "holds non-numbers"),
        ({"name": "../escape"}, "name"),
        ({"machine": {}}, "machine"),
    ],
)
def test_invalid_reports_are_rejected_when_built(kwargs, message):
    data = sweep().model_dump(by_alias=True)
    data.update(kwargs)
    with pytest.raises(ValidationError, match=message):
        Report.model_validate(data)


def test_ragged_table_and_typo_are_rejected():
    with pytest.raises(ValidationError, match="do not have 2 cells"):
        Table(title="t", columns=["a", "b"], rows=[[1, 2], [3]])
    with pytest.raises(ValidationError, match="colums"):
        Table(title="t", columns=["a"], colums=["b"])


def test_read_reports_flags_bad_files_and_sorts_newest_first(tmp_path):
    write_report(sweep("old", datetime(2024, 1, 1, tzinfo=UTC)), tmp_path, png=False)
    write_report(sweep("new", datetime(2025, 1, 1)), tmp_path, png=False)  # naive = UTC
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"results": []}')
    (tmp_path / "future.json").write_text('{"schema": "slimserve.report/9"}')
    bad = json.loads((tmp_path / "old.json").read_text())
    del bad["machine"]
    (tmp_path / "nomachine.json").write_text(json.dumps(bad))
    loaded = read_reports(tmp_path)
    assert [r.report.name for r in loaded if r.report] == ["new", "old"]
    problems = {r.path.name: r.problem for r in loaded if r.report is None}
    assert set(problems) == {"broken.json", "other.json", "future.json", "nomachine.json"}
    assert problems["broken.json"].startswith("not readable JSON")
    assert 'no "schema" field' in problems["other.json"]
    assert "unsupported schema" in problems["future.json"]
    assert "machine" in problems["nomachine.json"]


def test_read_reports_missing_folder_is_empty(tmp_path):
    assert read_reports(tmp_path / "absent") == []


def test_read_report_non_object_json(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert read_report(path).problem is not None


def test_markdown_escapes_pipes():
    report = sweep()
    report.tables[0].rows[1][2] = "a|b"
    assert "a\\|b" in render_markdown(report)


def test_commit_stamp_ignores_reports_but_not_code(tmp_path):
    import subprocess

    from slimserve.reports import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "a.md").write_text("one\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = git_commit(tmp_path)
    assert head is not None and not head.endswith("-dirty")
    (tmp_path / "reports" / "a.md").write_text("two\n")  # a report rewritten by a run
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")  # code changed: the figures are not HEAD's
    assert git_commit(tmp_path) == f"{head}-dirty"
