"""The Benchmarks page's quality-for-speed picture, with and without `reports/eval.json`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import ui
from dashboard.render import pareto_line, quality_chart_spec, quality_table
from slimserve.reports import Table, new_report, write_report

pytestmark = pytest.mark.timeout(120)
APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
COLUMNS = ["variant", "runtime", "acc", "tok_s_16", "e2e_p50_ms_16", "mb_on_disk", "pareto"]
ROWS = [
    ["teacher", "torch", 0.81, 900.0, 700.0, 16.5, True],
    ["student", "torch", 0.74, 1500.0, 600.0, 10.4, False],
    ["student-onnx", "onnxruntime", 0.75, 2100.0, 450.0, 10.4, True],
    ["student-slim-int8", "onnxruntime", 0.62, 3900.0, 250.0, 1.2, True],
]


@pytest.fixture
def page(fake_ingress, monkeypatch, tmp_path):
    monkeypatch.setattr(ui, "TRANSPORT", httpx.MockTransport(fake_ingress.handler))
    monkeypatch.setenv("SLIMSERVE_REPORTS_DIR", str(tmp_path / "reports"))

    def open_page() -> AppTest:
        at = AppTest.from_file(APP, default_timeout=30).run()
        at.switch_page("views/benchmarks.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return open_page


def write_eval(folder: Path, tables: list[Table]) -> None:
    report = new_report(
        "eval", kind="eval", title="Quality through the API", tables=tables, command="make eval",
        machine={"cpu": "Test CPU", "cores": 2, "gpu": "none"},
    )  # fmt: skip
    write_report(report, folder, png=False)


def test_without_eval_json_the_page_says_how_to_make_it(page):
    at = page()
    assert any("`make eval`" in i.value for i in at.info)
    assert not at.dataframe and not at.get("vega_lite_chart")


def test_with_eval_json_the_picture_and_its_table_are_drawn(page, tmp_path):
    sources = Table(title="where", columns=["column", "source"], rows=[["acc", "lm-eval"]])
    write_eval(tmp_path / "reports", [Table(title="q", columns=COLUMNS, rows=ROWS), sources])
    at = page()
    assert not any("`make eval`" in i.value for i in at.info)
    assert len(at.get("vega_lite_chart")) == 1  # the picture (this report has no charts)
    frames = [d.value for d in at.dataframe]
    assert list(frames[0]["variant"]) == [r[0] for r in ROWS]
    assert list(frames[1]["source"]) == ["lm-eval"]


def test_an_eval_json_without_the_quality_table_is_named_not_raised(page, tmp_path):
    write_eval(tmp_path / "reports", [Table(title="other", columns=["x"], rows=[[1]])])
    at = page()
    assert any("eval.json" in w.value and "cannot be drawn" in w.value for w in at.warning)


def test_chart_spec_draws_every_point_and_joins_the_front_by_speed():
    records = Table(title="q", columns=COLUMNS, rows=ROWS).records()
    records.append({**records[0], "variant": "unmeasured", "tok_s_16": None, "pareto": False})
    spec = quality_chart_spec(records)
    line, points, labels = spec["layer"]
    assert [p["variant"] for p in points["data"]["values"]] == [r[0] for r in ROWS]
    assert [p["variant"] for p in line["data"]["values"]] == [
        "teacher",
        "student-onnx",
        "student-slim-int8",
    ]
    assert points["encoding"]["size"]["field"] == "mb_on_disk"
    assert labels["encoding"]["text"]["field"] == "variant"
    assert pareto_line([]) == []
    assert quality_table([Table(title="x", columns=["variant"], rows=[])]) is None
