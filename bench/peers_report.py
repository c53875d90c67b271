"""The peers report: slimserve, vLLM, llama-server and the Flask baseline, side by side, with
the targets, and the in-process floor (CTranslate2 beside slimserve's engine).

Kept apart from `peers.py` (which runs servers) so the arithmetic can be tested on plain rows.
A race is {server label -> level rows} (`LevelResult.row()`); labels are "slimserve" (the
torch variant), "slimserve-onnx", "slimserve-int8" (124M only), "vllm", "llama-server" (float32
GGUF), "llama-server-q8" (q8_0 GGUF) and "baseline", and a server that did not run simply has
no rows: its columns are empty and the targets that need it say "not measured".
Ratios are a / b: above 1 is better for throughput, below 1 is better for latency.
"""

from __future__ import annotations

from typing import Any

from bench.race import LEVEL_COLUMNS, find_level, ratio
from slimserve.reports import Chart, Report, Table, new_report

Rows = dict[str, list[dict[str, Any]]]
SERVERS = (
    "slimserve",
    "slimserve-onnx",
    "slimserve-int8",
    "vllm",
    "llama-server",
    "llama-server-q8",
    "baseline",
)
FP32 = ("slimserve", "slimserve-onnx")  # the float32 variants, raced against llama-server f32
FLOOR_COLUMNS = ("model", "engine", "one_ms_per_token", "batch", "batch_tok_s")


def side_by_side(race: Rows) -> list[dict[str, Any]]:
    """One row per concurrency: every server's tokens/s both ways, e2e p50 and TTFT p99."""
    labels = [s for s in SERVERS if race.get(s)] + [s for s in race if s not in SERVERS]
    concs = sorted({r["concurrency"] for rows in race.values() for r in rows})
    out = []
    for conc in concs:
        row: dict[str, Any] = {"concurrency": conc}
        for label in labels:
            json_row, stream_row = (
                find_level(race[label], False, conc),
                find_level(race[label], True, conc),
            )
            row[f"{label}_tok_s"] = json_row.get("out_tok_s")
            row[f"{label}_stream_tok_s"] = stream_row.get("out_tok_s")
            row[f"{label}_e2e_p50_ms"] = json_row.get("e2e_p50_ms")
            row[f"{label}_ttft_p99_ms"] = stream_row.get("ttft_p99_ms")
        out.append(row)
    return out


def _get(race: Rows, label: str, stream: bool, conc: int, column: str) -> float | None:
    return find_level(race.get(label, []), stream, conc).get(column)


def _tok(race: Rows, label: str, stream: bool, conc: int = 16) -> float | None:
    return _get(race, label, stream, conc, "out_tok_s")


def _best(
    race: Rows,
    labels: tuple[str, ...],
    stream: bool,
    conc: int,
    column: str = "out_tok_s",
    pick=max,
) -> float | None:
    """The best of `labels`' `column` at one level (`pick`: max for tok/s, min for latency)."""
    found = [_get(race, lb, stream, conc, column) for lb in labels]
    found = [f for f in found if f is not None]
    return pick(found) if found else None


def _both_ways(
    what: str, race: Rows, labels: tuple[str, ...], peer: str, bound: float
) -> list[dict[str, Any]]:
    """`what`, non-streamed then streamed: the best of `labels` over `peer` at 16 clients."""
    return [
        _target(
            f"{what}, {way}", ratio(_best(race, labels, s, 16), _tok(race, peer, s)), bound, "min"
        )
        for s, way in ((False, "non-streamed"), (True, "streamed"))
    ]


def _target(what: str, got: float | None, bound: float, kind: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "target": what,
        "required": f"{'>=' if kind == 'min' else '<='} {bound:g}x",
        "measured": got,
        "met": None,
        "miss": "not measured" if got is None else None,
    }
    if got is not None:
        row["met"] = got >= bound if kind == "min" else got <= bound
        if not row["met"]:
            row["miss"] = (
                f"{got / bound:.0%} of the target"
                if kind == "min"
                else f"{got / bound - 1:.0%} over"
            )
    return row


def _floor_value(floor: list[dict[str, Any]], model: str, engine: str, column: str):
    """`column` of the floor row for `model` whose engine name starts with `engine`."""
    row = next(
        (r for r in floor if r.get("model") == model and str(r.get("engine")).startswith(engine)),
        {},
    )
    return row.get(column)


def llama_targets(
    tiny: Rows,
    big: Rows,
    floor: list[dict[str, Any]] | None = None,
    int8_ppl_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """The goals against llama.cpp's llama-server and CTranslate2 (same weights), and the served
    path against the engine alone. On the 124M model the 1-client figures are tokens/s, whose
    inverse is ms per token (robust to a server that stops early)."""
    floor = floor or []
    onnx_engine = _floor_value(floor, "student-onnx", "slimserve engine", "batch_tok_s")
    engines = [
        _floor_value(floor, m, "slimserve engine", "one_ms_per_token")
        for m in ("student", "student-onnx")
    ]
    engines = [e for e in engines if e is not None]
    ct2 = _floor_value(floor, "student", "CTranslate2", "one_ms_per_token")
    one_e2e = _best(tiny, FP32, False, 1, "e2e_p50_ms", min)
    return [
        *_both_ways(
            "student, 16 clients: fastest slimserve variant vs llama-server", tiny, FP32,
            "llama-server", 1.0,
        ),
        _target(
            "student, 1 client: fastest slimserve variant's e2e p50 vs llama-server's",
            ratio(one_e2e, _get(tiny, "llama-server", False, 1, "e2e_p50_ms")), 1.25, "max",
        ),
        _target(
            "student-onnx, 16 clients: served tok/s vs its engine alone (16 prompts, one batch)",
            ratio(_tok(tiny, "slimserve-onnx", False), onnx_engine), 0.7, "min",
        ),
        _target(
            "student, engine alone: fastest variant's ms/token vs CTranslate2 float32's",
            ratio(min(engines) if engines else None, ct2), 2.0, "max",
        ),
        *_both_ways(
            "124M-shaped, 16 clients: best float32 slimserve variant vs llama-server", big, FP32,
            "llama-server", 1.0,
        ),
        _target(
            "124M-shaped, 1 client: best float32 slimserve variant's ms/token vs llama-server's",
            ratio(_tok(big, "llama-server", False, 1), _best(big, FP32, False, 1)), 1.1, "max",
        ),
        _target(
            "124M-shaped, 1 client: int8 decode speed vs float32 ONNX (tokens/s)",
            ratio(_tok(big, "slimserve-int8", False, 1), _tok(big, "slimserve-onnx", False, 1)),
            1.5, "min",
        ),
        _target(
            "int8 perplexity vs float32 (tiny profile: student-onnx-int8 / student-onnx)",
            int8_ppl_ratio, 1.05, "max",
        ),
    ]  # fmt: skip


def targets(
    tiny: Rows,
    big: Rows,
    floor: list[dict[str, Any]] | None = None,
    int8_ppl_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """The goals slimserve is raced against, each with its measured ratio (or not measured):
    vLLM's and the baseline's first, then `llama_targets`."""
    e2e = [_get(tiny, s, False, 1, "e2e_p50_ms") for s in ("slimserve", "vllm")]
    return [
        _target(
            "student, 16 clients: non-streamed tok/s vs vLLM",
            ratio(_tok(tiny, "slimserve", False), _tok(tiny, "vllm", False)), 1.0, "min",
        ),
        _target(
            "student, 16 clients: streamed tok/s vs vLLM",
            ratio(_tok(tiny, "slimserve", True), _tok(tiny, "vllm", True)), 1.0, "min",
        ),
        _target("student, 1 client: non-streamed e2e p50 vs vLLM", ratio(*e2e), 1.0, "max"),
        _target(
            "student-onnx, 16 clients: non-streamed tok/s vs vLLM",
            ratio(_tok(tiny, "slimserve-onnx", False), _tok(tiny, "vllm", False)), 1.5, "min",
        ),
        _target(
            "student-onnx, 16 clients: streamed tok/s vs vLLM",
            ratio(_tok(tiny, "slimserve-onnx", True), _tok(tiny, "vllm", True)), 1.5, "min",
        ),
        _target(
            "student, 16 clients: streamed vs non-streamed tok/s",
            ratio(_tok(tiny, "slimserve", True), _tok(tiny, "slimserve", False)), 0.9, "min",
        ),
        *_both_ways(
            "124M-shaped, 16 clients: best slimserve variant vs vLLM", big, FP32, "vllm", 1.0
        ),
        _target(
            "student, 16 clients: non-streamed tok/s vs the Flask baseline",
            ratio(_tok(tiny, "slimserve", False), _tok(tiny, "baseline", False)), 6.0, "min",
        ),
        *llama_targets(tiny, big, floor, int8_ppl_ratio),
    ]  # fmt: skip


def _levels_table(title: str, race: Rows) -> Table:
    title += "" if race else " (not run)"
    with_rounds = any("rounds_tok_s" in r for rs in race.values() for r in rs)
    cols = (*LEVEL_COLUMNS, "rounds_tok_s") if with_rounds else LEVEL_COLUMNS
    rows = [
        [label] + [r.get(c) for c in LEVEL_COLUMNS] + ([_rounds(r)] if with_rounds else [])
        for label, rs in race.items()
        for r in sorted(rs, key=lambda r: (r["stream"], r["concurrency"]))
    ]
    return Table(title=title, columns=["server", *cols], rows=rows)


def _rounds(row: dict[str, Any]) -> str | None:
    """Every round's tokens/s as one cell, a round with failed requests marked."""
    if "rounds_tok_s" not in row:
        return None
    failed = row.get("rounds_failed") or [0] * len(row["rounds_tok_s"])
    return " / ".join(
        f"{t:g}" + (f" ({n} failed)" if n else "")
        for t, n in zip(row["rounds_tok_s"], failed, strict=True)
    )


def _rounds_note(settings: dict[str, Any]) -> str:
    rounds, big = settings.get("rounds", 1), settings.get("big_rounds", 1)
    once = ", ".join(settings.get("once") or ()) or "none"
    return (
        f"Rounds: each student level ran {rounds} time(s) in a row, the servers' order rotated "
        f"each round, and every figure of a level is from that server's median round by tokens/s "
        f"(`rounds_tok_s` lists each round's); 124M levels {big} round(s). Run once per level: "
        f"{once}."
    )


def _pairs_table(title: str, race: Rows) -> Table:
    pairs = side_by_side(race)
    if not pairs:
        return Table(title=f"{title} (not run)", columns=["concurrency"])
    return Table.from_records(title, pairs)


def _tok_chart(title: str, table: int, pairs: Table) -> list[Chart]:
    y = [c for c in pairs.columns if c.endswith("tok_s")]
    if not y:
        return []
    return [Chart(title=title, type="line", table=table, x="concurrency", y=y, y_label="tok/s")]


def _peer_notes(name: str, row: dict[str, Any], ok: str) -> list[str]:
    """One line when the peer did not run at all, one per run that did not go through."""
    if not row:
        return []
    why = f"{name} did not run: {row.get('status')}. Its columns are empty."
    notes = [] if row.get("status") == ok else [why]
    for key, value in row.items():
        if key.startswith("run (") and value != "ran":
            notes.append(f"{name}, {key[5:-1]}: {value}")
    return notes


def _greedy_notes(greedy: list[dict[str, Any]]) -> list[str]:
    notes = []
    for model, peer in dict.fromkeys((g.get("model"), g.get("peer", "vLLM")) for g in greedy):
        rows = [g for g in greedy if (g.get("model"), g.get("peer", "vLLM")) == (model, peer)]
        same = sum(1 for g in rows if g["identical"])
        notes.append(
            f"greedy output ({model}): {same} of {len(rows)} prompts identical token for token "
            f"between slimserve and {peer}."
        )
    return notes


def _llama_notes(tiny: Rows, big: Rows) -> list[str]:
    """slimserve / llama-server tok/s where both ran, as readings: the fastest float32 variant
    against the float32 GGUF, and on the 124M model int8 against `q8_0` (no target there)."""
    notes = []
    pairs = (
        ("student", tiny, FP32, "llama-server", (16,)),
        ("124M-shaped", big, FP32, "llama-server", (1, 16)),
        ("124M-shaped", big, ("slimserve-int8",), "llama-server-q8", (1, 16)),
    )
    for what, race, ours, label, concs in pairs:
        for conc in concs:
            got = [
                ratio(_best(race, ours, s, conc), _get(race, label, s, conc, "out_tok_s"))
                for s in (False, True)
            ]
            if any(g is not None for g in got):
                who = ours[0] if len(ours) == 1 else f"the faster of {' and '.join(ours)}"
                notes.append(
                    f"{what}, {conc} client(s): {who} / {label} tok/s = {got[0]}x non-streamed, "
                    f"{got[1]}x streamed."
                )
    return notes


def memory_table(memory: list[dict[str, Any]]) -> Table:
    """Each server process's resident memory after its race (`bench.peers.memory_rows`)."""
    columns = ["model", "process", "rss_mib", "peak_rss_mib", "processes", "folder_mib"]
    return Table(
        title="memory: resident set per process after each race (MiB)",
        columns=columns,
        rows=[[r.get(c) for c in columns] for r in memory],
    )


def floor_table(floor: list[dict[str, Any]]) -> Table:
    """CTranslate2 and slimserve's engine in process; a part that did not run says why."""
    columns = [*FLOOR_COLUMNS, "tokens_per_request", "threads", "status"]
    return Table(
        title="in-process floor: CTranslate2 beside slimserve's engine (no server)",
        columns=columns,
        rows=[[r.get(c) for c in columns] for r in floor],
    )


def _measure_notes(floor: bool, memory: bool) -> list[str]:
    """How the in-process floor and the memory table were measured, when they are there."""
    notes = []
    if floor:
        notes.append(
            "In-process floor: CTranslate2 has no server and cannot add a request to a running "
            "batch, so it is measured in this process, not raced over HTTP: one request at a "
            "time (ms per output token over the 16 prompts) and 16 prompts in one "
            "generate_batch call (tok/s), greedy, exactly 64 tokens each, beside slimserve's "
            "engine measured the same way (bench.engine_bench; its one-request figure is "
            "1000 / tok/s of the first prompt alone)."
        )
    if memory:
        notes.append(
            "Memory: each process's resident set (RSS) and its peak (VmHWM) when its race ended, "
            "servers still up; a slimserve replica beside its artifact folder's size, so one "
            "copy of the weights shows as RSS a little above the folder, plus what Python, "
            "its libraries and Ray's worker hold."
        )
    return notes


def peers_report(
    tiny: Rows,
    big: Rows,
    *,
    peer: dict[str, Any],
    greedy: list[dict[str, Any]],
    settings: dict[str, Any],
    command: str | None,
    llama: dict[str, Any] | None = None,
    floor: list[dict[str, Any]] | None = None,
    memory: list[dict[str, Any]] | None = None,
    int8_ppl_ratio: float | None = None,
) -> Report:
    """`bench_peers`: both races, the peers' status, the targets, the greedy comparison, the
    in-process floor and every server's memory."""
    goals = targets(tiny, big, floor, int8_ppl_ratio)
    tiny_pairs = _pairs_table("student (tiny): side by side", tiny)
    big_pairs = _pairs_table("GPT-2-124M-shaped (random weights): side by side", big)
    tables = [
        Table.from_records("the peer: vLLM", [peer]),
        tiny_pairs,
        big_pairs,
        Table.from_records("targets", goals),
        _levels_table("student (tiny): every level", tiny),
        _levels_table("GPT-2-124M-shaped: every level", big),
    ]
    if greedy:
        tables.append(Table.from_records("greedy output: slimserve vs the peers", greedy))
    if llama:
        tables.append(Table.from_records("the peer: llama.cpp llama-server", [llama]))
    if floor:
        tables.append(floor_table(floor))
    if memory:
        tables.append(memory_table(memory))
    charts = _tok_chart("student: output tokens/s", 1, tiny_pairs)
    charts += _tok_chart("GPT-2-124M-shaped: output tokens/s", 2, big_pairs)
    notes = [
        f"Closed loop, greedy, max_tokens {settings['max_tokens']}, the same fixed prompts, "
        f"requests per level max({settings['min_requests']}, {settings['requests_per_client']} "
        "x clients); the servers took turns level by level, never loaded together.",
        _rounds_note(settings),
        "Every server serves the same weights: slimserve from serve_config.yaml (the 124M model "
        "with the student's settings and every core as threads; its int8 variant is the ONNX "
        "graph through the quantize-int8 quantizer), vLLM's OpenAI server (float32, "
        "max-model-len 128) from its own venv, llama-server on a GGUF converted from the same "
        "folder (float32; on the 124M model also q8_0, its int8 weights) with one slot of 128 "
        "tokens per client of the top level, continuous batching on and prompt caching off, the "
        "Flask baseline (tiny student only) with 2 torch threads.",
    ]
    notes += _peer_notes("vLLM", peer, "installed")
    notes += _peer_notes("llama-server", llama or {}, "built")
    notes += _greedy_notes(greedy) + _llama_notes(tiny, big)
    notes += _measure_notes(bool(floor), bool(memory))
    notes += [
        f"target missed: {g['target']}: {g['measured']}x ({g['miss']})"
        for g in goals
        if g["met"] is False
    ]
    return new_report(
        "bench_peers",
        kind="serving",
        title="Serving: slimserve vs vLLM vs the older architecture",
        tables=tables,
        charts=charts,
        notes=notes,
        command=command,
    )
