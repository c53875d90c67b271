"""The race report: slimserve against the older architecture, side by side, with its targets.

Kept apart from `run_all.py` (which runs things) so the arithmetic of ratios and targets can be
tested on plain rows, without a server. Ratios are slimserve / baseline: above 1 is better for
throughput, below 1 is better for latency. A target that is missed says by how much.
"""

from __future__ import annotations

from typing import Any

from bench.serving import LevelResult
from slimserve.reports import Chart, Report, Table, new_report

LEVEL_COLUMNS = (
    "stream",
    "concurrency",
    "ok",
    "failed",
    "req_s",
    "out_tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "tokens_per_req",
    "tokens_per_frame",
    "hop_ms_p50",
    "cpu_ms_per_token",
    "errors",
)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def find_level(rows: list[dict[str, Any]], stream: bool, conc: int) -> dict[str, Any]:
    return next((r for r in rows if r["stream"] == stream and r["concurrency"] == conc), {})


def side_by_side(slim: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per concurrency: both servers' throughput and latency, and their ratios."""
    out = []
    for conc in sorted({r["concurrency"] for r in slim + base}):
        sj, bj = find_level(slim, False, conc), find_level(base, False, conc)
        ss, bs = find_level(slim, True, conc), find_level(base, True, conc)
        out.append(
            {
                "concurrency": conc,
                "slimserve_tok_s": sj.get("out_tok_s"),
                "baseline_tok_s": bj.get("out_tok_s"),
                "tok_s_ratio": ratio(sj.get("out_tok_s"), bj.get("out_tok_s")),
                "slimserve_stream_tok_s": ss.get("out_tok_s"),
                "baseline_stream_tok_s": bs.get("out_tok_s"),
                "stream_tok_s_ratio": ratio(ss.get("out_tok_s"), bs.get("out_tok_s")),
                "slimserve_ttft_p99_ms": ss.get("ttft_p99_ms"),
                "baseline_ttft_p99_ms": bs.get("ttft_p99_ms"),
                "ttft_p99_ratio": ratio(ss.get("ttft_p99_ms"), bs.get("ttft_p99_ms")),
                "e2e_p50_ratio": ratio(sj.get("e2e_p50_ms"), bj.get("e2e_p50_ms")),
                "stream_e2e_p50_ratio": ratio(ss.get("e2e_p50_ms"), bs.get("e2e_p50_ms")),
                "e2e_p99_ratio": ratio(sj.get("e2e_p99_ms"), bj.get("e2e_p99_ms")),
            }
        )
    return out


# (what, concurrency, side-by-side column, bound, "min" = at least / "max" = at most)
TARGETS = (
    ("16 clients: non-streamed output tokens/s vs baseline", 16, "tok_s_ratio", 6.0, "min"),
    ("16 clients: streamed output tokens/s vs baseline", 16, "stream_tok_s_ratio", 3.0, "min"),
    ("16 clients: streamed p99 TTFT vs baseline", 16, "ttft_p99_ratio", 1.0, "max"),
    ("1 client: non-streamed p50 end-to-end vs baseline", 1, "e2e_p50_ratio", 1.3, "max"),
    ("1 client: streamed p50 end-to-end vs baseline", 1, "stream_e2e_p50_ratio", 1.3, "max"),
)


def targets(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target: the bound, the measured ratio, whether it holds and, if not, by how much."""
    rows = []
    for what, conc, column, bound, kind in TARGETS:
        got = next((p[column] for p in pairs if p["concurrency"] == conc), None)
        row: dict[str, Any] = {
            "target": what,
            "required": f"{'>=' if kind == 'min' else '<='} {bound:g}x",
            "measured": got,
            "met": None,
            "miss": None,
        }
        if got is not None:
            row["met"] = got >= bound if kind == "min" else got <= bound
            if not row["met"] and kind == "min":
                row["miss"] = f"{got / bound:.0%} of the target; {bound / got:.2f}x more needed"
            elif not row["met"]:
                row["miss"] = f"{got / bound - 1:.0%} over the bound"
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> Table:
    return Table(
        title=title, columns=list(columns), rows=[[r.get(c) for c in columns] for r in rows]
    )


def _serving_charts() -> list[Chart]:
    """Throughput, streamed TTFT and the throughput ratio, from the side-by-side table (2)."""
    return [
        Chart(
            title="Output tokens/s",
            type="line",
            table=2,
            x="concurrency",
            y=[
                "slimserve_tok_s",
                "baseline_tok_s",
                "slimserve_stream_tok_s",
                "baseline_stream_tok_s",
            ],
            y_label="tokens/s",
        ),
        Chart(
            title="Streamed p99 time to first token (ms)",
            type="line",
            table=2,
            x="concurrency",
            y=["slimserve_ttft_p99_ms", "baseline_ttft_p99_ms"],
            y_label="ms",
        ),
        Chart(
            title="slimserve / baseline throughput",
            table=2,
            x="concurrency",
            y=["tok_s_ratio", "stream_tok_s_ratio"],
            y_label="ratio",
        ),
    ]


def _serving_notes(
    slim: list[LevelResult],
    base: list[LevelResult],
    goals: list[dict[str, Any]],
    max_tokens: int,
) -> list[str]:
    """How the race ran, Ray's background CPU during the baseline's turns, and each miss."""
    notes = [
        f"Closed loop, greedy, max_tokens {max_tokens}, the same fixed prompts and the same "
        "student weights on both sides; the servers took turns level by level, never loaded "
        "together.",
        "TTFT and TPOT are client-side, streamed requests only (TTFT = first frame with text; "
        "the baseline's TextIteratorStreamer sends whole words, so its first frame can hold "
        "more than one token). hop_ms_p50 = client e2e minus the server's own e2e (Ray hops, "
        "HTTP and JSON).",
    ]
    background = [
        sum(v for k, v in lv.cpu_s.items() if k not in ("baseline", "client")) / lv.wall_s
        for lv in base
        if lv.cpu_s
    ]
    if background and slim:
        share = sum(background) / len(background)
        notes.append(
            f"Both servers stayed up and took turns per level; during the baseline's turns Ray's "
            f"idle background (controller, raylet, health checks) used {share:.2f} of a core on "
            "average (the CPU table, server = baseline)."
        )
    notes += [
        f"target missed: {g['target']}: {g['measured']}x, {g['miss']}"
        for g in goals
        if g["met"] is False
    ]
    return notes


def serving_report(
    slim: list[LevelResult], base: list[LevelResult], max_tokens: int, *, command: str | None
) -> Report:
    """`bench_serving`: both servers' figures, side by side, the targets, and CPU per hop."""
    slim_rows, base_rows = [lv.row() for lv in slim], [lv.row() for lv in base]
    pairs = side_by_side(slim_rows, base_rows)
    goals = targets(pairs)
    hops = [{"server": "slimserve", **c} for lv in slim for c in lv.cpu_rows()]
    hops += [{"server": "baseline", **c} for lv in base for c in lv.cpu_rows()]
    pair_cols = tuple(pairs[0]) if pairs else ("concurrency",)
    tables = [
        _table("slimserve (serve_config.yaml, Ray Serve)", slim_rows, LEVEL_COLUMNS),
        _table("baseline (Flask threaded, HF generate, 2 torch threads)", base_rows, LEVEL_COLUMNS),
        _table("side by side (ratios = slimserve / baseline)", pairs, pair_cols),
        _table("targets", goals, ("target", "required", "measured", "met", "miss")),
        _table(
            "CPU per output token by process (the cost of each hop)",
            hops,
            ("server", "stream", "concurrency", "role", "cpu_ms_per_token", "cpu_share"),
        ),
    ]
    charts = _serving_charts() if pairs and "slimserve_tok_s" in pair_cols else []
    return new_report(
        "bench_serving",
        kind="serving",
        title="Serving: slimserve vs the older architecture",
        tables=tables,
        charts=charts,
        notes=_serving_notes(slim, base, goals, max_tokens),
        command=command,
    )
