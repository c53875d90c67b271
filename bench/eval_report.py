"""`reports/eval.*`: lm-eval quality per variant, API vs in-process, and quality for speed.

The report's first table is the picture users want, one row per served variant: the task
score (multiple-choice accuracy through the API), perplexities, the manifest's agreement and
bytes on disk, served tokens/s and p50 latency at 16 clients, and whether the variant is on
the Pareto front of (tokens/s, accuracy). A "sources" table names where each column comes
from. The dashboard's Benchmarks page draws the same table as a scatter plot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.eval_run import Scores
from slimserve.reports import Chart, Report, Table, new_report, render_markdown, write_report

NAME = "eval"
PPL_TOLERANCE = 0.001  # API and in-process perplexities agree within 0.1 %
QUALITY_TITLE = "Quality for speed (one row per served variant)"
COMMITTED = "bench_peers.json"
COMMITTED_TABLE = "student (tiny): every level"
# bench_peers' server labels on the tiny profile -> the variant each one served
COMMITTED_SERVERS = {"slimserve": "student", "slimserve-onnx": "student-onnx"}


def pareto_front(points: Mapping[str, tuple[float | None, float | None]]) -> set[str]:
    """Names of the points no other point dominates, both coordinates higher-is-better.

    A point is dominated when another is at least as good on both and strictly better on one;
    equal points are all on the front. Points with a missing coordinate are never on it.
    """
    known = {k: (x, y) for k, (x, y) in points.items() if x is not None and y is not None}
    front = set()
    for name, (x, y) in known.items():
        if not any(
            ox >= x and oy >= y and (ox > x or oy > y)
            for other, (ox, oy) in known.items()
            if other != name
        ):
            front.add(name)
    return front


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else float("inf")


def compare(api: Scores, local: Scores) -> dict[str, Any]:
    """API vs in-process on one variant: same accuracy, same picks, perplexities within 0.1 %."""
    same = sum(a == b for a, b in zip(api.picks(), local.picks(), strict=True))
    ll_diff = max(
        (
            abs(x - y)
            for la, lb in zip(api.choice_lls, local.choice_lls, strict=True)
            for x, y in zip(la, lb, strict=True)
        ),
        default=0.0,
    )
    rel = max(
        _rel(api.word_perplexity, local.word_perplexity),
        _rel(api.byte_perplexity, local.byte_perplexity),
        _rel(api.token_perplexity, local.token_perplexity),
    )
    identical = api.acc == local.acc
    return {
        "acc_api": round(api.acc, 4),
        "acc_in_process": round(local.acc, 4),
        "acc_identical": identical,
        "same_pick": f"{same}/{len(api.choice_lls)}",
        "max_abs_ll_diff": round(ll_diff, 6),
        "word_ppl_api": round(api.word_perplexity, 4),
        "word_ppl_in_process": round(local.word_perplexity, 4),
        "max_ppl_rel_diff_pct": round(100 * rel, 5),
        "agree": identical and rel <= PPL_TOLERANCE,
    }


def committed_serving(reports_dir: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """Served tokens/s and p50 latency at 16 clients (non-streamed) per variant from the
    committed `bench_peers.json`, and that source's name with its commit ("" if absent)."""
    path = Path(reports_dir) / COMMITTED
    if not path.is_file():
        return {}, ""
    data = json.loads(path.read_text())
    out: dict[str, dict[str, Any]] = {}
    for table in data.get("tables", []):
        if table["title"] != COMMITTED_TABLE:
            continue
        for row in (dict(zip(table["columns"], r, strict=True)) for r in table["rows"]):
            variant = COMMITTED_SERVERS.get(row.get("server"))
            if variant and row.get("concurrency") == 16 and row.get("stream") is False:
                out[variant] = {"tok_s": row["out_tok_s"], "e2e_p50_ms": row["e2e_p50_ms"]}
    return out, f"{COMMITTED} @ {data.get('commit')}"


def quality_rows(
    variants: Mapping[str, dict[str, Any]],
    api: Mapping[str, Scores],
    load: Mapping[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """The first table: one row per variant evaluated through the API, front marked."""
    speed = {v: (load.get(v, {}).get("out_tok_s"), api[v].acc) for v in api}
    front = pareto_front(speed)
    rows = []
    for v, scores in api.items():
        info, lv = variants[v], load.get(v, {})
        rows.append(
            {
                "variant": v,
                "runtime": info["runtime"],
                "acc": round(scores.acc, 4),
                "acc_stderr": round(scores.acc_stderr, 4),
                "word_perplexity": round(scores.word_perplexity, 3),
                "token_perplexity": round(scores.token_perplexity, 3),
                "manifest_perplexity": info.get("perplexity"),
                "agreement": info.get("agreement"),
                "mb_on_disk": round(info["bytes"] / 1e6, 3) if info.get("bytes") else None,
                "tok_s_16": lv.get("out_tok_s"),
                "e2e_p50_ms_16": lv.get("e2e_p50_ms"),
                "pareto": v in front,
            }
        )
    return rows


def eval_report(
    *,
    variants: Mapping[str, dict[str, Any]],
    api: Mapping[str, Scores],
    local: Mapping[str, Scores],
    load: Mapping[str, dict[str, Any]],
    committed: tuple[dict[str, dict[str, Any]], str],
    facts: dict[str, Any],
    command: str | None = None,
) -> Report:
    """The whole report. `facts`: task sizes, load settings and the machine's load average."""
    paths = [{"variant": v, "via": "api", **s.row()} for v, s in api.items()]
    paths += [{"variant": v, "via": "in-process (hf)", **s.row()} for v, s in local.items()]
    agreement = [{"variant": v, **compare(api[v], local[v])} for v in local if v in api]
    done, source = committed
    speed = [
        {
            "variant": v,
            "tok_s_16": lv.get("out_tok_s"),
            "e2e_p50_ms_16": lv.get("e2e_p50_ms"),
            "failed": lv.get("failed"),
            "committed_tok_s_16": done.get(v, {}).get("tok_s"),
            "committed_e2e_p50_ms_16": done.get(v, {}).get("e2e_p50_ms"),
        }
        for v, lv in load.items()
    ]
    sources = [
        {"column": c, "source": s}
        for c, s in (
            ("acc, acc_stderr, *_perplexity", "this report: lm-eval through the API"),
            ("manifest_perplexity, agreement", "each variant's manifest.json (test split)"),
            ("mb_on_disk", "each variant's manifest.json (bytes)"),
            ("tok_s_16, e2e_p50_ms_16", f"this run's load: {facts.get('load', '?')}"),
            ("committed_tok_s_16", source or f"no {COMMITTED} in reports/"),
        )
    ]
    titled = [
        (QUALITY_TITLE, quality_rows(variants, api, load)),
        ("lm-eval results per variant and path", paths),
        ("API vs in-process (torch variants)", agreement),  # none with --no-in-process
        ("served tokens/s at 16 clients", speed),
        ("where each column comes from", sources),
    ]
    tables = [Table.from_records(title, rows) for title, rows in titled if rows]
    charts = [Chart(title="task accuracy (API)", type="bar", x="variant", y=["acc"])]
    return new_report(
        NAME,
        kind="eval",
        title="Quality through the API: lm-eval on every served variant",
        tables=tables,
        charts=charts,
        notes=_notes(agreement, facts),
        command=command,
    )


def _notes(agreement: list[dict[str, Any]], facts: dict[str, Any]) -> list[str]:
    agree = sum(bool(r["agree"]) for r in agreement)
    checked = (
        f"API vs in-process: {agree} of {len(agreement)} torch variants agree (accuracy "
        f"identical, word / byte / token perplexity within {100 * PPL_TOLERANCE:g} %)."
        if agreement
        else "API vs in-process: not compared in this run (no torch variant run in process)."
    )
    return [
        f"Tasks from the profile's test split: {facts.get('tasks', '?')}.",
        checked,
        "Pareto front: no other variant has both more tokens/s at 16 clients and a higher "
        "accuracy.",
        *facts.get("notes", []),
    ]


def render_quality_png(report: Report, path: Path) -> None:
    """Accuracy against served tokens/s, marker area by bytes on disk, the front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.tables[0].records() if r["tok_s_16"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    biggest = max((r["mb_on_disk"] or 0 for r in rows), default=1) or 1
    for r in rows:
        size = 60 + 900 * (r["mb_on_disk"] or 0) / biggest
        colour = "tab:orange" if r["pareto"] else "tab:blue"
        ax.errorbar(r["tok_s_16"], r["acc"], yerr=r["acc_stderr"], color="grey", capsize=3)
        ax.scatter(r["tok_s_16"], r["acc"], s=size, alpha=0.6, color=colour, edgecolor="k")
        ax.annotate(r["variant"], (r["tok_s_16"], r["acc"]), fontsize=8, xytext=(6, 6),
                    textcoords="offset points")  # fmt: skip
    front = sorted((r["tok_s_16"], r["acc"]) for r in rows if r["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), "--", color="tab:orange", label="Pareto front")
        ax.legend(loc="lower left")
    ax.set_xlabel("served output tokens/s at 16 clients")
    ax.set_ylabel("next-words accuracy (API)")
    ax.set_title("Quality for speed (area = bytes on disk, bars = 1 standard error)")
    ax.grid(alpha=0.3)
    machine = report.machine
    fig.suptitle(f"{machine.get('cpu', '?')}, gpu: {machine.get('gpu', 'none')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eval(report: Report, reports_dir: str | Path) -> list[Path]:
    """`eval.json` and `eval.md` (slimserve.reports), and the quality-for-speed `eval.png`."""
    out = Path(reports_dir)
    paths = write_report(report, out, png=False)
    png = out / f"{NAME}.png"
    tmp = out / f".{NAME}.tmp.png"
    render_quality_png(report, tmp)
    tmp.replace(png)
    paths[1].write_text(render_markdown(report, png.name))
    return [*paths, png]
