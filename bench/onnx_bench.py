"""Per-token decode latency: torch vs ONNX Runtime fp32 vs ONNX Runtime int8, and HF generate.

Figures, each the median over `repeats` interleaved rounds (the machine may be shared):

* `decode_ms` — one `Runtime.decode` step after a 16-token prefill, at batch 1 and batch 8
  (`build_engines.parity.decode_ms`), for every runtime folder given;
* `greedy_ms_per_token` — one iteration of a greedy loop at batch 1 (argmax + decode);
* `hf_generate_ms_per_token` — Hugging Face `model.generate` (greedy, exactly N new tokens,
  KV cache on) at batch 1: the gap between consecutive tokens, stamped by a logits processor
  (so it includes everything `generate` does per token, and nothing of the prefill).

Medians of per-step times resist a busy machine better than whole-loop wall times.

All runtimes use the same number of CPU threads (`--threads`, set explicitly).
Run: `python -m bench.onnx_bench artifacts/tiny/student artifacts/tiny/student-onnx
artifacts/tiny/student-onnx-int8 --threads 1`; the first folder must be a torch one (HF generate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from build_engines.parity import decode_ms
from slimserve.hardware import machine
from slimserve.runtimes import load
from slimserve.runtimes.base import Runtime


def greedy_ms_per_token(runtime: Runtime, prompt: list[int], steps: int) -> float:
    """Median ms of one greedy-loop iteration (argmax + decode) at batch 1."""
    logits, state = runtime.prefill([prompt])
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        logits, state = runtime.decode(logits.argmax(-1), state)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class _Stamps:
    """A logits processor that only records when `generate` reaches each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def hf_generate_ms_per_token(model: Any, prompt: list[int], steps: int) -> float:
    """Median ms between consecutive new tokens inside HF `generate` (greedy, cache on)."""
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    ids = torch.tensor([prompt])
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
        min_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=0,
        logits_processor=LogitsProcessorList([stamps]),
    )  # fmt: skip
    gaps = [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
    return statistics.median(gaps) * 1e3


def bench(
    folders: list[Path], threads: int, steps: int = 64, repeats: int = 5, batches=(1, 8)
) -> dict[str, Any]:
    """Every figure for every folder; the first folder (torch) also gets HF generate."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    runtimes = {f.name: load(f, device="cpu", dtype="float32", threads=threads) for f in folders}
    hf = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).eval()
    prompt = torch.randint(
        1, hf.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)
    )
    prompt_ids = prompt.tolist()
    samples: dict[str, list[float]] = {}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        round_: dict[str, float] = {}
        for name, rt in runtimes.items():
            for b in batches:
                round_[f"{name} decode_ms b{b}"] = decode_ms(rt, b, steps=steps)
            round_[f"{name} greedy_ms_per_token b1"] = greedy_ms_per_token(rt, prompt_ids, steps)
        round_["hf_generate_ms_per_token b1"] = hf_generate_ms_per_token(hf, prompt_ids, steps)
        for k, v in round_.items():
            samples.setdefault(k, []).append(v)
    figures = {k: round(statistics.median(v[1:]), 4) for k, v in samples.items()}
    return {
        "machine": machine(),
        "threads": threads,
        "steps": steps,
        "repeats": repeats,
        "runtimes": {n: rt.info.dtype + "/" + rt.info.runtime for n, rt in runtimes.items()},
        "figures": figures,
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per runtime, HF generate last, plus speed-up ratios."""
    f = result["figures"]
    hf = f["hf_generate_ms_per_token b1"]
    lines = [
        "| runtime | decode ms b1 | decode ms b8 | greedy ms/token b1 | vs HF generate |",
        "|---|---|---|---|---|",
    ]
    for name, kind in result["runtimes"].items():
        g = f[f"{name} greedy_ms_per_token b1"]
        lines.append(
            f"| {name} ({kind}) | {f[f'{name} decode_ms b1']:.3f} | {f[f'{name} decode_ms b8']:.3f}"
            f" | {g:.3f} | {hf / g:.2f}x |"
        )
    lines.append(f"| HF generate (torch) | - | - | {hf:.3f} | 1.00x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="artifact folders; the first is torch")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for every runtime")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    result = bench(args.folders, args.threads, args.steps, args.repeats)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
