"""Per-variant offline figures: latency, throughput, memory, size and quality, side by side.

For every variant of the profile that is built (and can run here), through the same runtime
interface the server uses (`slimserve.runtimes.load`), with the same thread count:

* `prefill_b{1,8}_ms` — one prefill of a `prompt_tokens`-token prompt at batch 1 / 8;
* `decode_b{1,8}_ms` — one decode step (one new token per row) after that prompt, i.e. the
  per-token latency at batch 1 and the step time at batch 8;
* `tok_s_b{1,8}` — decode throughput at that batch (batch × 1000 / step ms);
* `peak_rss_mb` — the peak resident memory of a fresh process that loaded the variant and ran
  all of the above (so it includes Python and the runtime's libraries: what one copy costs);
* params, non-zero params, bytes on disk, perplexity and top-1 agreement with the teacher,
  from the variant's manifest (measured when it was built, on the test split).

Every latency is the median of `repeats` timed runs after one warm-up run; a decode run times
`decode_steps` consecutive steps and keeps their median, so the past length moves through
prompt_tokens .. prompt_tokens + decode_steps. Each variant is measured in its own spawned
process (`isolate=True`), so one variant's memory never counts against the next.

Run: `slimserve bench variants` (writes reports/bench_variants.*) or as part of `make bench`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine_bench import PROMPTS
from slimserve.artifacts import ArtifactError, ArtifactStore
from slimserve.catalogue import Profile
from slimserve.hardware import missing
from slimserve.reports import Chart, Report, Table, new_report
from slimserve.runtimes import runtime_spec
from slimserve.steps import STEPS

BATCHES = (1, 8)


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def _prompt(tokenizer: Any, n: int, context: int) -> list[int]:
    """`n` tokens of the fixed prompts (cycled), leaving room in the context for decoding."""
    ids: list[int] = []
    for text in PROMPTS * 8:
        ids += tokenizer.encode(" " + text)
        if len(ids) >= n:
            break
    return ids[: max(1, min(n, context // 2))]


def measure_folder(
    folder: str | Path,
    *,
    threads: int = 1,
    device: str | None = None,
    repeats: int = 5,
    prompt_tokens: int = 32,
    decode_steps: int = 32,
    batches: Sequence[int] = BATCHES,
) -> dict[str, Any]:
    """Latency and throughput of one artifact folder in this process (see the module doc)."""
    import torch

    from slimserve.runtimes import load
    from slimserve.tokenizer import load_tokenizer

    runtime = load(folder, device=device, threads=threads)
    info = runtime.info
    prompt = _prompt(load_tokenizer(folder), prompt_tokens, info.context_length)
    steps = max(1, min(decode_steps, info.context_length - len(prompt) - 1))
    sync = torch.cuda.synchronize if info.device.startswith("cuda") else (lambda: None)
    out: dict[str, Any] = {
        "runtime": info.runtime,
        "device": info.device,
        "dtype": info.dtype,
        "threads": info.threads,
        "prompt_tokens": len(prompt),
    }
    with torch.inference_mode():
        for b in batches:
            seqs = [prompt] * b
            prefill, decode = [], []
            for run in range(repeats + 1):  # run 0 is the warm-up
                sync()
                t0 = time.perf_counter()
                logits, state = runtime.prefill(seqs)
                sync()
                t_prefill = time.perf_counter() - t0
                tokens = logits.argmax(-1)
                step_s = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    logits, state = runtime.decode(tokens, state)
                    tokens = logits.argmax(-1)
                    sync()
                    step_s.append(time.perf_counter() - t0)
                if run:
                    prefill.append(t_prefill)
                    decode.append(statistics.median(step_s))
            out[f"prefill_b{b}_ms"] = _median_ms(prefill)
            out[f"decode_b{b}_ms"] = _median_ms(decode)
            out[f"tok_s_b{b}"] = round(b / statistics.median(decode), 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


_CHILD = """
import json, sys
from bench.variants import measure_folder
print(json.dumps(measure_folder(sys.argv[1], **json.loads(sys.argv[2]))))
"""


def _measure_isolated(folder: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`measure_folder` in a fresh Python process (its own peak RSS, its own torch state).

    A plain subprocess rather than multiprocessing's spawn: spawn re-imports the caller's
    `__main__`, which breaks when the caller is a script or pytest.
    """
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", _CHILD, str(folder), json.dumps(kwargs)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"measuring {folder} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_variants(
    profile: Profile,
    store: ArtifactStore,
    *,
    variants: Sequence[str] | None = None,
    isolate: bool = True,
    **measure: Any,
) -> list[dict[str, Any]]:
    """One row per catalogue variant (in build order); unbuilt / unrunnable ones say why."""
    rows = []
    for name in variants or profile.order():
        row: dict[str, Any] = {"variant": name}
        try:
            manifest = store.manifest(name)
        except ArtifactError as exc:
            rows.append({**row, "note": f"unreadable: {exc}"})
            continue
        if manifest is None:
            absent = missing(STEPS[profile.variants[name].step].requires)
            rows.append({**row, "note": f"skipped: {absent}" if absent else "not built"})
            continue
        m = manifest.metrics
        row |= {
            "runtime": manifest.runtime,
            "params": manifest.params_total,
            "params_nonzero": manifest.params_nonzero,
            "mb_on_disk": round(manifest.bytes / 2**20, 2),
            "perplexity": None if m.perplexity is None else round(m.perplexity, 2),
            "agreement": None if m.agreement is None else round(m.agreement, 4),
        }
        reason = missing(runtime_spec(manifest.runtime).requires)  # TensorRT without a GPU
        if reason:
            rows.append({**row, "note": f"not run: {reason}"})
            continue
        folder = store.path(name)
        t0 = time.perf_counter()
        figures = (
            _measure_isolated(folder, measure) if isolate else measure_folder(folder, **measure)
        )
        print(f"variants: {name} measured in {time.perf_counter() - t0:.0f}s", flush=True)
        row |= {k: v for k, v in figures.items() if k != "runtime"}
        row["note"] = None
        rows.append(row)
    return rows


COLUMNS = (
    "variant",
    "runtime",
    "params",
    "params_nonzero",
    "mb_on_disk",
    "perplexity",
    "agreement",
    "prefill_b1_ms",
    "prefill_b8_ms",
    "decode_b1_ms",
    "decode_b8_ms",
    "tok_s_b1",
    "tok_s_b8",
    "peak_rss_mb",
    "threads",
    "device",
    "note",
)


def variants_report(rows: list[dict[str, Any]], *, repeats: int, command: str | None) -> Report:
    """`bench_variants`: the table, two charts (latency and throughput), and how it was run."""
    table = Table(
        title="Variants: latency, throughput, memory, size, quality",
        columns=list(COLUMNS),
        rows=[[row.get(c) for c in COLUMNS] for row in rows],
    )
    charts = [
        Chart(
            title="Per-token decode latency (ms)",
            table=0,
            x="variant",
            y=["decode_b1_ms", "decode_b8_ms"],
            y_label="ms per step",
        ),
        Chart(
            title="Decode throughput (tokens/s)",
            table=0,
            x="variant",
            y=["tok_s_b1", "tok_s_b8"],
            y_label="tokens/s",
        ),
    ]
    measured = [r for r in rows if r.get("note") is None]
    prompt = measured[0]["prompt_tokens"] if measured else "?"
    notes = [
        f"Median of {repeats} timed runs after one warm-up; prompt {prompt} tokens; decode "
        "latency is one step (one token per row) at batch 1 and 8.",
        "peak_rss_mb is a fresh process that loaded the variant and ran the bench "
        "(Python and the runtime's libraries included).",
        "perplexity and agreement (top-1 with the teacher) come from each manifest, measured "
        "on the test split when the variant was built.",
    ]
    notes += [f"{r['variant']}: {r['note']}" for r in rows if r.get("note")]
    return new_report(
        "bench_variants",
        kind="variants",
        title="Variants: speed, memory, size and quality",
        tables=[table],
        charts=charts,
        notes=notes,
        command=command,
    )
