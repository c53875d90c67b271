"""The report schema: what benchmarks and sweeps write under `reports/`, and the dashboard reads.

One report is one JSON file, `reports/<name>.json`, schema ``"slimserve.report/1"``::

    {
      "schema": "slimserve.report/1",
      "name": "prune-sweep",                 # file stem; a later run of the same name replaces it
      "kind": "prune-sweep",                 # free text: "prune-sweep", "latency", "throughput", ...
      "title": "L1 pruning sweep (tiny)",
      "created": "2025-01-31T12:00:00+00:00",  # ISO 8601, UTC
      "machine": {"cpu": "...", "cores": 2, "gpu": "none", "platform": "..."},
      "versions": {"python": "3.11.9", "torch": "2.13.0", ...},
      "commit": "d086855" | null,            # git HEAD (+ "-dirty"), null outside a checkout
      "command": "slimserve bench ..." | null,
      "tables": [{"title": "...", "columns": ["sparsity", "perplexity"], "rows": [[0.5, 41.2]]}],
      "charts": [{"title": "...", "type": "line", "table": 0, "x": "sparsity",
                  "y": ["perplexity"]}],
      "notes": ["one finding per line", ...]
    }

Why a schema instead of one page per benchmark: the dashboard's Benchmarks page draws every
table and chart of every valid report it finds, so a new benchmark appears there without a page
change. A chart only names columns of one of the report's own tables (``table`` is an index,
``x`` one column, ``y`` one or more numeric columns), so the JSON holds each number once.

Writing one (the whole API a benchmark needs)::

    from slimserve.reports import Chart, Table, new_report, write_report

    table = Table.from_records("perplexity vs sparsity", [{"sparsity": 0.5, "ppl": 41.2}, ...])
    report = new_report(
        "prune-sweep", kind="prune-sweep", title="L1 pruning sweep",
        tables=[table], charts=[Chart(title="ppl", type="line", table=0, x="sparsity", y=["ppl"])],
        notes=["50% sparsity costs 3% perplexity"],
    )
    write_report(report, "reports")  # -> [reports/prune-sweep.json, .md, .png]

`new_report` stamps the machine (CPU, cores, GPU), package versions, the git commit and the
command line, so a figure never travels without the machine it was measured on. Every check
(row widths, chart columns, numeric y values) runs when the model is built: a bad report fails
in the benchmark that writes it, not in the dashboard. `read_reports` never raises for one bad
file: it returns the file with its problem, and the dashboard lists it as skipped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from slimserve.strict import Strict

SCHEMA = "slimserve.report/1"
Cell = str | int | float | bool | None
_VERSIONED = ("slimserve", "torch", "transformers", "onnxruntime", "ray", "tensorrt")


class Table(Strict):
    """A rectangular table: `rows[i][j]` is the value of `columns[j]` (None = not measured)."""

    title: str
    columns: list[str] = Field(min_length=1)
    rows: list[list[Cell]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rectangular(self) -> Table:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"table {self.title!r}: duplicate column names {self.columns}")
        bad = [i for i, row in enumerate(self.rows) if len(row) != len(self.columns)]
        if bad:
            raise ValueError(
                f"table {self.title!r}: rows {bad} do not have {len(self.columns)} cells"
            )
        return self

    @classmethod
    def from_records(cls, title: str, records: list[dict[str, Cell]]) -> Table:
        """Build from dicts; columns are the union of keys in first-seen order, gaps are None."""
        columns: list[str] = []
        for record in records:
            columns.extend(k for k in record if k not in columns)
        rows = [[record.get(c) for c in columns] for record in records]
        return cls(title=title, columns=columns, rows=rows)

    def column(self, name: str) -> list[Cell]:
        j = self.columns.index(name)
        return [row[j] for row in self.rows]

    def records(self) -> list[dict[str, Cell]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class Chart(Strict):
    """A plot of one table: `x` is a column, `y` the numeric columns drawn against it."""

    title: str
    type: Literal["bar", "line"] = "bar"
    table: int = Field(0, ge=0, description="index into the report's tables")
    x: str
    y: list[str] = Field(min_length=1)
    x_label: str | None = None
    y_label: str | None = None


class Report(Strict):
    """One benchmark or sweep result; see the module docstring for the file format."""

    model_config = ConfigDict(populate_by_name=True)  # `schema_id=` as well as `schema`

    schema_id: Literal["slimserve.report/1"] = Field(SCHEMA, alias="schema")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    kind: str = Field(min_length=1, max_length=64)
    title: str = Field(min_length=1)
    created: datetime
    machine: dict[str, Cell] = Field(min_length=1, description="where it ran: cpu, cores, gpu")
    versions: dict[str, str] = Field(default_factory=dict)
    commit: str | None = None
    command: str | None = None
    tables: list[Table] = Field(default_factory=list)
    charts: list[Chart] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @field_validator("created")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        # naive times are taken as UTC, so reports from different writers sort together
        return v if v.tzinfo else v.replace(tzinfo=UTC)

    @field_validator("notes", mode="before")
    @classmethod
    def _notes_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _charts_match_tables(self) -> Report:
        problems: list[str] = []
        for i, chart in enumerate(self.charts):
            if chart.table >= len(self.tables):
                problems.append(f"charts[{i}]: table {chart.table} does not exist")
                continue
            table = self.tables[chart.table]
            for col in [chart.x, *chart.y]:
                if col not in table.columns:
                    problems.append(f"charts[{i}]: {col!r} is not a column of {table.title!r}")
            for col in chart.y:
                if col in table.columns and not all(_is_number(v) for v in table.column(col)):
                    problems.append(f"charts[{i}]: column {col!r} holds non-numbers")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def _is_number(v: Cell) -> bool:
    return v is None or (
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    )


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that decide a figure (from metadata: no imports)."""
    versions = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(cwd: str | Path | None = None) -> str | None:
    """Short HEAD hash, with "-dirty" when tracked files outside reports/ changed; None outside
    a git checkout."""
    try:
        run = {"cwd": cwd, "capture_output": True, "text": True, "timeout": 5, "check": True}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        # Reports are outputs: one run writing several of them must not stamp the later ones
        # "-dirty" because of the earlier ones. Only changes outside reports/ count.
        status = ["git", "status", "--porcelain", "-uno", "--", ".", ":(exclude)reports"]
        dirty = subprocess.run(status, **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def new_report(
    name: str,
    *,
    kind: str,
    title: str,
    tables: list[Table],
    charts: list[Chart] | None = None,
    notes: list[str] | None = None,
    machine: dict[str, Cell] | None = None,
    command: str | None = None,
) -> Report:
    """A report stamped with now, this machine, package versions, git commit and command line.

    `machine` defaults to `slimserve.hardware.machine()` (imported here, not at module level,
    because the dashboard imports this module and must not pull in torch).
    """
    if machine is None:
        from slimserve.hardware import machine as detect_machine

        machine = dict(detect_machine())
    return Report(
        name=name,
        kind=kind,
        title=title,
        created=datetime.now(UTC),
        machine=machine,
        versions=package_versions(),
        commit=git_commit(),
        command=command
        if command is not None
        else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        tables=tables,
        charts=charts or [],
        notes=notes or [],
    )


def _fmt(v: Cell) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def render_markdown(report: Report, png: str | None = None) -> str:
    """The report as Markdown (for reading on GitHub and pasting into the README)."""
    machine = ", ".join(f"{k}: {v}" for k, v in report.machine.items())
    lines = [f"# {report.title}", "", f"- kind: `{report.kind}`"]
    lines.append(f"- created: {report.created.isoformat(timespec='seconds')}")
    lines.append(f"- machine: {machine}")
    if report.commit:
        lines.append(f"- commit: `{report.commit}`")
    if report.command:
        lines.append(f"- command: `{report.command}`")
    if report.versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    for table in report.tables:
        lines += ["", f"## {table.title}", "", "| " + " | ".join(table.columns) + " |"]
        lines.append("|" + "---|" * len(table.columns))
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.rows]
    if png:
        lines += ["", f"![{report.title}]({png})"]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def render_png(report: Report, path: Path) -> None:
    """Every chart of the report as one figure (one panel per chart), via matplotlib's Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.charts)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, chart in zip(axes[0], report.charts, strict=True):
        table = report.tables[chart.table]
        xs = [str(x) if chart.type == "bar" else x for x in table.column(chart.x)]
        width = 0.8 / len(chart.y)
        for k, col in enumerate(chart.y):
            ys = [math.nan if v is None else float(v) for v in table.column(col)]  # type: ignore[arg-type]
            if chart.type == "line":
                ax.plot(xs, ys, marker="o", label=col)
            else:
                pos = [i + (k - (len(chart.y) - 1) / 2) * width for i in range(len(xs))]
                ax.bar(pos, ys, width=width, label=col)
                ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
        ax.set_title(chart.title)
        ax.set_xlabel(chart.x_label or chart.x)
        ax.set_ylabel(chart.y_label or (chart.y[0] if len(chart.y) == 1 else ""))
        if len(chart.y) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    gpu = report.machine.get("gpu", "none")
    fig.suptitle(f"{report.title}  ({report.machine.get('cpu', '?')}, gpu: {gpu})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(
    report: Report, reports_dir: str | Path = "reports", *, png: bool = True
) -> list[Path]:
    """Write `<name>.json` (the data), `<name>.md` and, when it has charts, `<name>.png`.

    Returns the paths written. Files are replaced atomically, so the dashboard never reads a
    half-written report. `png=False` skips matplotlib (e.g. in tests).
    """
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{report.name}.json", out / f"{report.name}.md"]
    picture = out / f"{report.name}.png" if png and report.charts else None
    if picture is not None:
        tmp = picture.with_name(f".{picture.name}.tmp-{os.getpid()}.png")
        render_png(report, tmp)
        os.replace(tmp, picture)
        paths.append(picture)
    _atomic_write(paths[0], report.to_json() + "\n")
    _atomic_write(paths[1], render_markdown(report, picture.name if picture else None))
    return paths


@dataclass(frozen=True)
class LoadedReport:
    """One `*.json` file under the reports folder: its report, or why it could not be read."""

    path: Path
    report: Report | None
    problem: str | None = None


def read_report(path: str | Path) -> LoadedReport:
    """Parse one file; never raises for bad content (the problem is returned instead)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return LoadedReport(path, None, f"not readable JSON: {e}")
    if not isinstance(data, dict) or "schema" not in data:
        return LoadedReport(path, None, 'not a slimserve report (no "schema" field)')
    if data["schema"] != SCHEMA:
        return LoadedReport(path, None, f"unsupported schema {data['schema']!r} (want {SCHEMA})")
    try:
        return LoadedReport(path, Report.model_validate(data))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'report'}: {err['msg']}"
            for err in e.errors()
        )
        return LoadedReport(path, None, f"invalid report: {problems}")


def read_reports(reports_dir: str | Path = "reports") -> list[LoadedReport]:
    """Every `*.json` directly under `reports_dir`: valid ones newest first, then bad ones.

    A missing folder is an empty list (nothing has been benchmarked yet).
    """
    folder = Path(reports_dir)
    if not folder.is_dir():
        return []
    loaded = [read_report(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".")]
    good = sorted((r for r in loaded if r.report), key=lambda r: r.report.created, reverse=True)  # type: ignore[union-attr]
    return good + [r for r in loaded if r.report is None]
