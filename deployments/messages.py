"""What the ingress and the model replicas send each other (plain dicts through Ray).

Kept free of torch so the ingress process never imports it. A replica reports a client fault
as data (`{"error": ...}`, or an `error` event as the *first* event of a stream) rather than
as an exception: Ray wraps exceptions, and the ingress must pick the HTTP status before it
sends a single byte of a stream.

A generation job: `{"prompt": str | list[int], "params": {SamplingParams fields}, "n": int}`,
plus `"echo": true` when the prompt's text (and, with logprobs, its entries) comes first and
`"logprobs": true` when deltas carry logprob entries.
Stream events, in order:

* `{"event": "start", "prompt_tokens": int}` once the request is admitted by the engine
  (or `{"event": "error", "error": {...}}` instead, and nothing else);
* `{"event": "delta", "index": int, "text": str, "token_ids": [...], "finish_reason": ...}`
  per token with new text, and a last one per choice with `finish_reason` set; with logprobs
  asked for, also `"logprobs": [entry per token]` (echo: the prompt's entries first), an entry
  being `{"token": str, "bytes": [int], "logprob": float | None, "top": [[str, [int], float]]
  | None}` (`logprob` and `top` None for a prompt's first token);
* `{"event": "end", "usage": {...}, "timings": {...}}`.

A stream sends them in lists, one list per message: `start` with the first delta and, for one
choice, the last delta with `end` (each message costs both hops CPU, whatever its size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimserve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

NOT_BUILT = "not built: run `make artifacts`"


def error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    type: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An error as data: the HTTP status, the OpenAI envelope fields and extra headers."""
    default_type = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "timeout_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        503: "overloaded_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "status": status,
        "message": message,
        "param": param,
        "type": type or default_type,
        "headers": headers or {},
    }


def job(
    prompt: str | list[int],
    params: dict[str, Any],
    n: int = 1,
    *,
    echo: bool = False,
    logprobs: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": prompt, "params": params, "n": n}
    if echo:
        out["echo"] = True
    if logprobs:
        out["logprobs"] = True
    return out


def sampling(body: SamplingFields, extra_stop: list[str] | None = None) -> dict[str, Any]:
    """The engine's SamplingParams fields of a validated request."""
    return {
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": body.stop_list() + (extra_stop or []),
    }


def completion_params(body: CompletionRequest) -> dict[str, Any]:
    """`sampling` plus the logprobs a completions request asks for. Echo with `max_tokens` 0
    scores the prompt even without `logprobs` (the engine generates nothing only for a
    request it scores); those entries are then not returned."""
    params = sampling(body)
    if body.logprobs is not None:
        params["logprobs"] = body.logprobs
    if body.echo and (body.logprobs is not None or body.max_tokens == 0):
        params["prompt_logprobs"] = body.logprobs or 0
    return params


def chat_params(body: ChatCompletionRequest, extra_stop: list[str]) -> dict[str, Any]:
    """`sampling` plus `logprobs` (the `top_logprobs` count) when the chat asks for them."""
    params = sampling(body, extra_stop)
    if body.logprobs:
        params["logprobs"] = body.top_logprobs or 0
    return params
