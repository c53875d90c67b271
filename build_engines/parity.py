"""Parity and agreement checks between two runtimes, through the `Runtime` interface only.

* `check_parity` (export-onnx, build-trt): the candidate must match the PyTorch reference:
  max |logit difference| under a written tolerance over full-sequence scoring, prefill and every
  decode step, and greedy tokens identical for `steps` steps on each prompt at batch 1 and with
  all prompts in one left-padded batch. Both runtimes are driven in lockstep on the reference's
  greedy tokens, so the logits are compared at the same inputs even after a mismatch, and "no
  argmax mismatch in lockstep" is exactly "free-running greedy outputs are identical".
  A failure raises `ParityError` naming what differed; success returns the manifest record.
* `quality_vs` (quantize-int8): perplexity ratio and top-1 agreement of an approximate
  candidate (int8) against its fp32 source, at batch 1 (dynamic int8 quantizes activations per
  tensor over the whole batch, so a row's output depends on its batch mates), plus greedy
  agreement: the share of greedy decode steps where the candidate picks the reference's token
  when both are fed the reference's greedy continuation (lockstep through the KV cache, as in
  `check_parity`). The free-running figure (identical tokens position by position, each model
  on its own output) is recorded beside it: one flip at a near-tie makes every later position
  of that prompt differ, so it measures where sequences first part, not per-step choices.
* `decode_ms`: median wall time of one decode step, for the speed figures and the choice of
  graph optimisation.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.runtimes.base import Runtime

# Three prompts of different lengths, so the padded batch really has padding.
PROMPT_TEXTS = (
    "The",
    "Return the number of items in the list",
    'def main():\n    """Parse the command line and',
)


class ParityError(RuntimeError):
    """The compiled variant does not match its PyTorch parent."""


def prompt_ids(tokenizer_dir: Path, steps: int, context: int) -> list[list[int]]:
    """Token ids of `PROMPT_TEXTS`, each cut so prompt + `steps` tokens fit in `context`."""
    from slimserve.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    room = context - steps
    if room < 1:
        raise ValueError(f"{steps} parity steps leave no room for a prompt in context {context}")
    prompts = [tok.encode(text)[:room] for text in PROMPT_TEXTS]
    if any(not p for p in prompts):
        raise ValueError(f"tokenizer in {tokenizer_dir} encodes a parity prompt to nothing")
    return prompts


@dataclass
class _Lockstep:
    max_diff: float = 0.0
    mismatches: int = 0
    first_mismatch: str | None = None
    nonfinite: str | None = None  # where NaN / inf logits first appeared


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, NaN when either side holds a non-finite value (NaN - NaN, inf - inf)."""
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.all()):
        return math.nan
    return float((a - b).abs().max())


def _worse(a: float, b: float) -> float:
    """The larger difference; NaN wins (`max(x, nan)` keeps x, which would hide a NaN)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _lockstep(
    ref: Runtime, cand: Runtime, prompts: list[list[int]], steps: int, label: str
) -> tuple[_Lockstep, list[list[int]]]:
    """Greedy-decode `prompts` as one batch on both runtimes, feeding the reference's tokens."""
    out = _Lockstep()
    ref_logits, ref_state = ref.prefill(prompts)  # (B, V)
    cand_logits, cand_state = cand.prefill(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        r, c = ref_logits.float().cpu(), cand_logits.float().cpu()
        out.max_diff = _worse(out.max_diff, _max_diff(r, c))
        if out.nonfinite is None and not (torch.isfinite(r).all() and torch.isfinite(c).all()):
            which = "candidate" if torch.isfinite(r).all() else "reference"
            out.nonfinite = f"{label}: step {step}: {which} logits are not finite (NaN/inf)"
        r_tok, c_tok = r.argmax(-1), c.argmax(-1)  # (B,)
        wrong = (r_tok != c_tok).nonzero().flatten().tolist()
        if wrong:
            out.mismatches += len(wrong)
            if out.first_mismatch is None:
                row = wrong[0]
                out.first_mismatch = (
                    f"{label}: row {row} step {step}: reference token {int(r_tok[row])}, "
                    f"candidate {int(c_tok[row])}"
                )
        for row, t in enumerate(r_tok.tolist()):
            tokens[row].append(t)
        if step + 1 < steps:
            ref_logits, ref_state = ref.decode(r_tok, ref_state)
            cand_logits, cand_state = cand.decode(r_tok, cand_state)
    return out, tokens


def check_parity(
    ref: Runtime,
    cand: Runtime,
    prompts: list[list[int]],
    steps: int,
    tolerance: float,
    blocks: torch.Tensor | None = None,
    require_identical: bool = True,
) -> dict[str, Any]:
    """Compare `cand` with the reference; raise ParityError on a failure, else return a record.

    prompts: token lists (3 of different lengths); blocks: (N, T) token ids scored in full.
    require_identical=False records greedy mismatches without failing (fp16 engines, where a
    near-tie may flip); the logit tolerance always applies.
    """
    record: dict[str, Any] = {
        "tolerance": tolerance,
        "greedy_steps": steps,
        "prompts": len(prompts),
    }
    diffs = []
    nonfinite: list[str] = []
    if blocks is not None:
        score_diff = _max_diff(ref.score(blocks).float().cpu(), cand.score(blocks).float().cpu())
        record["score_max_abs_diff"] = score_diff
        diffs.append(score_diff)
        if math.isnan(score_diff):
            nonfinite.append("full-sequence scoring: logits are not finite (NaN/inf)")
    problems = []
    for i, prompt in enumerate(prompts):
        lock, _ = _lockstep(ref, cand, [prompt], steps, f"batch 1, prompt {i}")
        diffs.append(lock.max_diff)
        nonfinite += [lock.nonfinite] if lock.nonfinite else []
        if lock.mismatches:
            problems.append(lock.first_mismatch)
    record["batch1_identical"] = not problems
    lock, tokens = _lockstep(ref, cand, prompts, steps, f"padded batch of {len(prompts)}")
    diffs.append(lock.max_diff)
    nonfinite += [lock.nonfinite] if lock.nonfinite else []
    record["padded_batch_identical"] = lock.mismatches == 0
    if lock.mismatches:
        problems.append(lock.first_mismatch)
    record["max_abs_logit_diff"] = functools.reduce(_worse, diffs, 0.0)
    record["finite"] = not nonfinite
    record["greedy_tokens"] = [t[:8] for t in tokens]  # a glimpse for the manifest
    if not require_identical:
        record["greedy_mismatches"] = problems
        problems = []
    problems = nonfinite + problems  # non-finite logits fail even when greedy agrees
    if not record["max_abs_logit_diff"] <= tolerance:  # NaN compares false: it fails too
        problems.insert(
            0, f"max |logit diff| {record['max_abs_logit_diff']:.3g} > tolerance {tolerance:.3g}"
        )
    if problems:
        raise ParityError("parity check failed: " + "; ".join(str(p) for p in problems))
    record["passed"] = True
    return record


def _nll_top1(runtime: Runtime, blocks: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL over `blocks` (N, T), scored one block at a time, and top-1 (N, T-1)."""
    nll, count, top1 = 0.0, 0, []
    for row in blocks:
        ids = row.view(1, -1)
        logits = runtime.score(ids).float().cpu()[:, :-1]  # (1, T-1, V)
        logp = torch.log_softmax(logits, dim=-1)
        nll -= float(logp.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())
        count += ids.shape[1] - 1
        top1.append(logits.argmax(-1))
    return nll / count, torch.cat(top1)


def greedy(runtime: Runtime, prompt: list[int], steps: int) -> list[int]:
    """Free-running greedy continuation of one prompt (batch 1)."""
    logits, state = runtime.prefill([prompt])
    out = []
    for step in range(steps):
        tok = logits.argmax(-1)  # (1,)
        out.append(int(tok[0]))
        if step + 1 < steps:
            logits, state = runtime.decode(tok, state)
    return out


def forced_choices(runtime: Runtime, prompt: list[int], tokens: list[int]) -> list[int]:
    """The runtime's greedy pick at each step while it is fed `tokens` (batch 1, KV cache)."""
    logits, state = runtime.prefill([prompt])
    picks = []
    for step, tok in enumerate(tokens):
        picks.append(int(logits.argmax(-1)[0]))
        if step + 1 < len(tokens):
            logits, state = runtime.decode(torch.tensor([tok]), state)
    return picks


def quality_vs(
    ref: Runtime, cand: Runtime, blocks: torch.Tensor, prompts: list[list[int]], steps: int
) -> dict[str, Any]:
    """Perplexity of both, top-1 agreement (teacher-forced, every position of `blocks`),
    greedy agreement (lockstep on the reference's greedy tokens from `prompts`) and the
    free-running figure, all at batch 1."""
    ref_nll, ref_top1 = _nll_top1(ref, blocks)
    cand_nll, cand_top1 = _nll_top1(cand, blocks)
    same = free_same = total = 0
    for prompt in prompts:
        a = greedy(ref, prompt, steps)
        same += sum(x == y for x, y in zip(a, forced_choices(cand, prompt, a), strict=True))
        free_same += sum(x == y for x, y in zip(a, greedy(cand, prompt, steps), strict=True))
        total += steps
    return {
        "reference_perplexity": round(math.exp(ref_nll), 4),
        "perplexity": round(math.exp(cand_nll), 4),
        "perplexity_ratio": round(math.exp(cand_nll - ref_nll), 4),
        "top1_agreement": round(float((ref_top1 == cand_top1).float().mean()), 4),
        "greedy_agreement": round(same / total, 4),
        "free_running_agreement": round(free_same / total, 4),
        "eval_tokens": int(ref_top1.numel()),
        "greedy_tokens": total,
        "batch": 1,
    }


def decode_ms(runtime: Runtime, batch: int, prompt_len: int = 16, steps: int = 32) -> float:
    """Median milliseconds per decode step at `batch`, after a `prompt_len`-token prefill."""
    vocab = runtime.info.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab, (batch, prompt_len), generator=gen).tolist()
    logits, state = runtime.prefill(prompts)
    times = []
    for _ in range(steps):
        tok = logits.argmax(-1)
        start = time.perf_counter()
        logits, state = runtime.decode(tok, state)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
