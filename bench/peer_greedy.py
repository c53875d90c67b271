"""Greedy output of slimserve and a peer on the same prompts, compared token for token.

slimserve's ids come from its `/compare` endpoint; a peer's from its own API: vLLM's OpenAI
completions with `return_token_ids`, llama-server's native `/completion` with `return_tokens`
(prompt caching off, as in the race). Identical ids on the same weights mean the servers
tokenize the prompt alike and take the same argmax at every step.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.engine_bench import PROMPTS

TokenIds = Callable[[str], list[int]]  # prompt -> the peer's greedy output ids


def _post(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:-1] if ids and eos is not None and ids[-1] == eos else ids


def vllm_ids(url: str, model: str, max_tokens: int) -> TokenIds:
    def ids(prompt: str) -> list[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        reply = _post(f"{url}/v1/completions", body | {"return_token_ids": True})
        return list(reply["choices"][0]["token_ids"] or ())

    return ids


def llama_ids(url: str, max_tokens: int) -> TokenIds:
    def ids(prompt: str) -> list[int]:
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "top_k": 1}
        reply = _post(f"{url}/completion", body | {"return_tokens": True, "cache_prompt": False})
        return list(reply["tokens"] or ())

    return ids


def compare_greedy(
    slim: str, peer: str, theirs: TokenIds, model: str, max_tokens: int, eos: int | None = None
) -> list[dict[str, Any]]:
    """Each prompt's greedy token ids from slimserve and the peer named `peer`, and where they
    part.

    A peer's ids may end with the end-of-text token when it stopped on it; slimserve's never
    hold it. So a trailing `eos` is dropped from both before comparing.
    """
    rows = []
    for prompt in PROMPTS:
        row: dict[str, Any] = {"model": model, "peer": peer, "prompt": prompt, "identical": False}
        try:
            results = _post(f"{slim}/compare", {"prompt": prompt, "models": [model]} | {
                "max_tokens": max_tokens, "warmup": False,
            })["results"]  # fmt: skip
            # /compare runs the profile's teacher too, as its reference: pick our model's row
            ours = next(r for r in results if r["model"] == model)["token_ids"]
            other = theirs(prompt)
        except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:160]})
            continue
        ours, other = _strip_eos(list(ours), eos), _strip_eos(other, eos)
        pairs = zip(ours, other, strict=False)
        part = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        rows.append(
            row
            | {
                "slimserve_tokens": len(ours),
                "peer_tokens": len(other),
                "matching_prefix": min(len(ours), len(other)) if part is None else part,
                "identical": ours == other,
                "error": None,
            }
        )
    return rows
