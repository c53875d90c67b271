"""One lm-evaluation-harness run of the generated tasks on one model, reduced to `Scores`.

Two ways to reach a variant, the same tasks either way:

* through the API: lm-eval's `local-completions` model against `/v1/completions` (text
  prompts: `tokenized_requests=False`, since the server takes a string or one list of ids,
  not lm-eval's list of lists; `echo` + `logprobs` give the prompt's log-likelihoods, and the
  profile's own tokenizer tells lm-eval where the context ends);
* in process: lm-eval's `hf` model on the variant's Hugging Face folder (torch variants).

Besides lm-eval's aggregate metrics, every item's per-choice log-likelihoods are kept (from
`log_samples`), so two runs can be compared item by item, not only by their means.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.eval_tasks import MC_TASK, PPL_TASK, TaskFiles


@dataclass
class Scores:
    """One model's results on both tasks (perplexities: lower is better)."""

    acc: float
    acc_stderr: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    token_perplexity: float
    seconds: float
    choice_lls: list[list[float]] = field(default_factory=list, repr=False)  # per item

    def picks(self) -> list[int]:
        """The choice (context) each item was answered with (highest log-likelihood)."""
        return [max(range(len(lls)), key=lls.__getitem__) for lls in self.choice_lls]

    def row(self) -> dict[str, float]:
        return {
            "acc": round(self.acc, 4),
            "acc_stderr": round(self.acc_stderr, 4),
            "word_perplexity": round(self.word_perplexity, 4),
            "byte_perplexity": round(self.byte_perplexity, 5),
            "bits_per_byte": round(self.bits_per_byte, 5),
            "token_perplexity": round(self.token_perplexity, 4),
            "seconds": round(self.seconds, 1),
        }


def api_model_args(
    url: str, variant: str, tokenizer_dir: Path, context_length: int, concurrent: int = 8
) -> dict[str, Any]:
    """`local-completions` arguments for one served variant."""
    return {
        "model": variant,
        "base_url": url.rstrip("/") + "/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
        "tokenized_requests": False,
        # lm-eval keeps one token back for the generated one; our server checks prompt +
        # max_tokens against the context, so the context length is exactly what fits.
        "max_length": context_length,
        "num_concurrent": concurrent,
        "max_retries": 3,
        "timeout": 300,
    }


def hf_model_args(folder: Path, tokenizer_dir: Path, context_length: int) -> dict[str, Any]:
    """`hf` arguments for one torch variant's folder, on the CPU in float32."""
    return {
        "pretrained": str(folder),
        "tokenizer": str(tokenizer_dir),
        "device": "cpu",
        "dtype": "float32",
        "max_length": context_length,
    }


def _metric(task: dict[str, Any], name: str) -> float:
    value = task.get(f"{name},none")
    if not isinstance(value, int | float):
        raise ValueError(f"lm-eval gave no {name!r} (got keys {sorted(task)})")
    return float(value)


def _ll(resp: Any) -> float:
    """A response's log-likelihood: `(ll, is_greedy)` for loglikelihood, `ll` for rolling."""
    while isinstance(resp, list | tuple):
        resp = resp[0]
    return float(resp)


def scores_from(out: dict[str, Any], seconds: float) -> Scores:
    """`Scores` from `simple_evaluate`'s result (run with `log_samples=True`)."""
    mc, ppl = out["results"][MC_TASK], out["results"][PPL_TASK]
    samples = out["samples"]
    mc_samples = sorted(samples[MC_TASK], key=lambda s: s["doc_id"])
    lls = [[_ll(r) for r in s["filtered_resps"]] for s in mc_samples]
    accs = [float(s["acc"]) for s in mc_samples]
    n = len(accs)
    mean = sum(accs) / n
    stderr = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1) / n) if n > 1 else 0.0
    total_ll = sum(_ll(s["filtered_resps"]) for s in samples[PPL_TASK])
    tokens = sum(int(s["doc"]["n_tokens"]) for s in samples[PPL_TASK])
    return Scores(
        acc=_metric(mc, "acc"),
        acc_stderr=stderr,
        word_perplexity=_metric(ppl, "word_perplexity"),
        byte_perplexity=_metric(ppl, "byte_perplexity"),
        bits_per_byte=_metric(ppl, "bits_per_byte"),
        token_perplexity=math.exp(-total_ll / tokens),
        seconds=seconds,
        choice_lls=lls,
    )


def run_lm_eval(
    model: str, model_args: dict[str, Any], files: TaskFiles, batch_size: int = 1
) -> Scores:
    """Both generated tasks on one model (`local-completions` or `hf`), offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(files.folder), include_defaults=False)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(files.tasks),
        task_manager=manager,
        batch_size=batch_size,
        log_samples=True,
        bootstrap_iters=0,  # stderr is computed from the samples (`scores_from`)
    )
    if out is None:
        raise RuntimeError(f"lm-eval returned no results for {model} {model_args}")
    return scores_from(out, time.perf_counter() - t0)
