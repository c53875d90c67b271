"""Log-probabilities of chosen tokens and their most likely alternatives (OpenAI's `logprobs`).

They are "raw", as vLLM's default: log-softmax of the model's own logits in float32, before
temperature, top-k / top-p and penalties, so they describe the model and not the request's
sampling settings (an evaluation harness scoring a continuation gets the same numbers whatever
temperature it sends). Only the rows that ask pay for them: the engine calls these functions
for those rows alone, and a step in which no row asks does no extra work at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_POSITIONS = 128
"""Prompt positions turned into log-probabilities at once: (chunk, V) float32 temporaries
instead of the whole (T, V) a second time."""


@dataclass
class TokenLogprob:
    """One position: its token, that token's log-probability and the top alternatives.

    `logprob` and `top` are None for a prompt's first token (nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None  # (token id, logprob), most likely first


def _entries(logp: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """logp (R, V) float32 log-probabilities, chosen (R,) int64; row r keeps its top ks[r]."""
    picked = logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()  # (R,)
    width = min(max(ks), logp.shape[1])
    if width > 0:
        values, indices = logp.topk(width, dim=-1)  # (R, K), descending
        top_v, top_i = values.tolist(), indices.tolist()
    else:
        top_v = top_i = [[] for _ in ks]
    ids = chosen.tolist()
    return [
        TokenLogprob(ids[r], picked[r], list(zip(top_i[r][:k], top_v[r][:k], strict=True)))
        for r, k in enumerate(ks)
    ]


def step_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], ks: list[int]
) -> list[TokenLogprob]:
    """For each listed row of one step: the sampled token's logprob and the row's top ks[i].

    logits (B, V) raw model logits (any float dtype), tokens (B,) the sampled ids."""
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logp = logits.index_select(0, index).float().log_softmax(dim=-1)  # (R, V)
    return _entries(logp, tokens.index_select(0, index.to(tokens.device)).to(logp.device), ks)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """Every prompt position's entry: the first has no logprob; position t is predicted by
    `logits[t - 1]`. logits (T, V) raw, from a full forward pass over `ids` (T tokens)."""
    out = [TokenLogprob(ids[0], None, None)]
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
    for start in range(0, len(ids) - 1, CHUNK_POSITIONS):
        end = min(len(ids) - 1, start + CHUNK_POSITIONS)
        logp = logits[start:end].float().log_softmax(dim=-1)  # (C, V)
        out += _entries(logp, targets[start:end], [k] * (end - start))
    return out
