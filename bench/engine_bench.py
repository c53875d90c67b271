"""Engine benchmark: aggregate output tokens/s of continuous batching vs HF `generate`.

For each concurrency C, C requests (greedy, exactly `max_tokens` each: EOS is ignored) are
submitted to the engine at once and timed until the last one finishes; next to it, the same C
prompts run one at a time through Hugging Face `model.generate` (greedy, min_new_tokens =
max_new_tokens, so both sides produce the same number of tokens). After one warm-up round,
each figure is the median of `repeats` rounds; latencies pool every request of every round.

Run: `slimserve bench engine --variant student` or `python -m bench.engine_bench VARIANT_DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slimserve.engine import Completion, Engine, EngineConfig
from slimserve.sampling import SamplingParams
from slimserve.stats import percentile

PROMPTS = [
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The river flows",
    "Once upon a time, in a small village near the mountains, there lived",
    "The main advantage of batching requests on a server is",
    "He said",
    "The album was released in",
    "Scientists have discovered that the deep ocean",
    "The game is played on a board with",
    "During the war, the regiment",
    "The company announced on Monday that",
    "A",
    "The species is found in tropical forests of",
    "In the early years of the railway,",
    "The film received mixed reviews from critics, who",
    "Water boils at",
]


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


async def _engine_round(engine: Engine, prompts: list[str], params: SamplingParams) -> dict:
    """Submit every prompt at once; time until the last completion."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(engine.generate(p, params) for p in prompts), return_exceptions=True
    )
    wall = time.perf_counter() - t0
    done = [r for r in results if isinstance(r, Completion)]
    return {
        "wall": wall,
        "ok": len(done),
        "failed": len(results) - len(done),
        "tokens": sum(r.completion_tokens for r in done),
        "ttft": [r.timings.ttft_s for r in done],
        "tpot": [r.timings.tpot_s for r in done if r.timings.tpot_s is not None],
        "e2e": [r.timings.e2e_s for r in done],
    }


def _hf_round(model: Any, prompt_ids: list[list[int]], max_tokens: int, eos: int) -> dict:
    """The same prompts one at a time through `model.generate`; returns wall time and tokens."""
    device = next(model.parameters()).device
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=eos,
                eos_token_id=eos,
            )
            tokens += int(out.shape[1] - x.shape[1])
    return {"wall": time.perf_counter() - t0, "tokens": tokens}


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"


def run_engine_bench(
    variant_dir: str | Path,
    concurrencies: Sequence[int] = (1, 4, 16),
    max_tokens: int = 64,
    repeats: int = 3,
    *,
    threads: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    hf_baseline: bool = True,
) -> dict[str, Any]:
    """Measure the engine at each concurrency next to one-at-a-time HF generate.

    Returns {"variant", "runtime", "device", "dtype", "threads", "max_tokens", "repeats",
    "rows": [{"concurrency", "requests_ok", "requests_failed", "req_s", "output_tok_s",
    "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p99_s", "hf_tok_s",
    "speedup"}], "peak_memory_mb", "peak_memory_kind"}. The HF columns are None for
    variants whose runtime is not torch (no `generate` to compare with).
    """
    if repeats < 1 or max_tokens < 1 or not concurrencies or min(concurrencies) < 1:
        raise ValueError("repeats, max_tokens and every concurrency must be >= 1")
    folder = Path(variant_dir)
    config = EngineConfig(max_batch_size=max(concurrencies), max_queue=max(concurrencies))
    engine = Engine.from_folder(folder, config, device=device, dtype=dtype, threads=threads)
    info = engine.runtime.info
    model = getattr(engine.runtime, "model", None) if hf_baseline else None
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def engine_rounds(prompts: list[str]) -> list[dict]:
        await _engine_round(engine, prompts[:1], params)  # warm-up
        return [await _engine_round(engine, prompts, params) for _ in range(repeats)]

    rows = []
    for conc in concurrencies:
        prompts = _prompts(conc)
        rounds = asyncio.run(engine_rounds(prompts))
        pooled = {k: [x for r in rounds for x in r[k]] for k in ("ttft", "tpot", "e2e")}
        row: dict[str, Any] = {
            "concurrency": conc,
            "requests_ok": sum(r["ok"] for r in rounds),
            "requests_failed": sum(r["failed"] for r in rounds),
            "req_s": statistics.median(r["ok"] / r["wall"] for r in rounds),
            "output_tok_s": statistics.median(r["tokens"] / r["wall"] for r in rounds),
            "ttft_p50_s": percentile(pooled["ttft"], 50),
            "ttft_p99_s": percentile(pooled["ttft"], 99),
            "tpot_p50_s": percentile(pooled["tpot"], 50),
            "tpot_p99_s": percentile(pooled["tpot"], 99),
            "e2e_p99_s": percentile(pooled["e2e"], 99),
            "hf_tok_s": None,
            "speedup": None,
        }
        if model is not None:
            ids = [engine.tokenizer.encode(p) for p in prompts]
            _hf_round(model, ids[:1], max_tokens, eos)  # warm-up
            hf = [_hf_round(model, ids, max_tokens, eos) for _ in range(repeats)]
            row["hf_tok_s"] = statistics.median(r["tokens"] / r["wall"] for r in hf)
            row["speedup"] = row["output_tok_s"] / row["hf_tok_s"]
        rows.append(row)
    asyncio.run(engine.stop())
    peak, kind = _peak_memory()
    return {
        "variant": folder.name,
        "runtime": info.runtime,
        "device": info.device,
        "dtype": info.dtype,
        "threads": info.threads,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "rows": rows,
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": kind,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The fixed figures every slimserve benchmark prints, one row per concurrency."""
    head = (
        f"engine bench: {result['variant']} ({result['runtime']}, {result['device']}, "
        f"{result['dtype']}, {result['threads']} threads), {result['max_tokens']} tokens/request, "
        f"median of {result['repeats']}"
    )
    cols = (
        f"{'conc':>4} {'ok':>4} {'fail':>4} {'req/s':>7} {'out tok/s':>10} {'HF tok/s':>9} "
        f"{'speedup':>7} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16} {'E2E p99 ms':>10}"
    )
    lines = [head, cols]
    for r in result["rows"]:
        hf = "-" if r["hf_tok_s"] is None else f"{r['hf_tok_s']:.1f}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"{r['concurrency']:>4} {r['requests_ok']:>4} {r['requests_failed']:>4} "
            f"{r['req_s']:>7.2f} {r['output_tok_s']:>10.1f} {hf:>9} {speedup:>7} "
            f"{_ms(r['ttft_p50_s']) + '/' + _ms(r['ttft_p99_s']):>16} "
            f"{_ms(r['tpot_p50_s']) + '/' + _ms(r['tpot_p99_s']):>16} {_ms(r['e2e_p99_s']):>10}"
        )
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MB ({result['peak_memory_kind']})")
    return "\n".join(lines)


def main(
    variant_dir: str | Path | None = None,
    *,
    concurrencies: Sequence[int] = (1, 4, 16),
    max_tokens: int = 64,
    repeats: int = 3,
    threads: int | None = None,
    device: str | None = None,
    report_dir: str | Path | None = "reports",
    argv: Sequence[str] | None = None,
) -> int:
    """Run the bench, print the table, write `<report_dir>/engine_bench_<variant>.json`.

    Called with a folder by `slimserve bench engine`; without one it parses `argv`.
    """
    if variant_dir is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("variant_dir", type=Path, help="a built artifact folder")
        parser.add_argument("--concurrency", type=int, nargs="+", default=list(concurrencies))
        parser.add_argument("--max-tokens", type=int, default=max_tokens, help="per request")
        parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median)")
        parser.add_argument("--threads", type=int, default=threads, help="intra-op threads")
        parser.add_argument("--device", default=device, help="cpu | cuda (default: auto)")
        parser.add_argument("--report-dir", default=report_dir, help="where the JSON goes")
        args = parser.parse_args(argv)
        variant_dir, concurrencies, max_tokens = args.variant_dir, args.concurrency, args.max_tokens
        repeats, threads, device, report_dir = (
            args.repeats,
            args.threads,
            args.device,
            args.report_dir,
        )
    result = run_engine_bench(
        variant_dir, concurrencies, max_tokens, repeats, threads=threads, device=device
    )
    print(format_table(result))
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"engine_bench_{result['variant']}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
