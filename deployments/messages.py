"""What the ingress and the model replicas send each other (plain dicts through Ray).

Kept free of torch so the ingress process never imports it. A replica reports a client fault
as data (`{"error": ...}`, or an `error` event as the *first* event of a stream) rather than
as an exception: Ray wraps exceptions, and the ingress must pick the HTTP status before it
sends a single byte of a stream.

A generation job: `{"prompt": str | list[int], "params": {SamplingParams fields}, "n": int}`.
Stream events, in order:

* `{"event": "start", "prompt_tokens": int}` once the request is admitted by the engine
  (or `{"event": "error", "error": {...}}` instead, and nothing else);
* `{"event": "delta", "index": int, "text": str, "token_ids": [...], "finish_reason": ...}`
  per token with new text, and a last one per choice with `finish_reason` set;
* `{"event": "end", "usage": {...}, "timings": {...}}`.

A stream sends them in lists, one list per message: `start` with the first delta and, for one
choice, the last delta with `end` (each message costs both hops CPU, whatever its size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimserve.protocol import SamplingFields

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


def job(prompt: str | list[int], params: dict[str, Any], n: int = 1) -> dict[str, Any]:
    return {"prompt": prompt, "params": params, "n": n}


def sampling(body: SamplingFields, extra_stop: list[str] | None = None) -> dict[str, Any]:
    """The engine's SamplingParams fields of a validated request."""
    return {
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
        "stop": body.stop_list() + (extra_stop or []),
    }
