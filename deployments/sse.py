"""Server-Sent Events in OpenAI's shape, from the replica's events (deployments.messages).

One `data: {json}` frame per text delta, a frame with `finish_reason` for each choice, an
optional usage frame (`stream_options.include_usage`), then `data: [DONE]`. Chat streams open
each choice with a `{"role": "assistant", "content": ""}` delta and close it with an empty
delta carrying `finish_reason`, as OpenAI's do; the official client accepts both shapes.

Logprobs, when asked for, ride on the frame of the text their tokens made (a chat choice whose
last tokens made no text: on its `finish_reason` frame), in the same shapes as non-streamed
answers (`completion_logprobs`, `chat_logprobs`), so the frames' entries concatenate to the
non-streamed list; a completions stream's `text_offset` keeps counting across frames.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from slimserve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)

DONE = "data: [DONE]\n\n"
Kind = Literal["completion", "chat"]


def frame(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> CompletionLogprobs:
    """Replica entries (`deployments.messages`) in OpenAI's legacy completions shape; the
    first token's text starts at `offset`. Each `top_logprobs` dict holds the alternatives
    and the chosen token (as vLLM's); tokens whose texts are equal (pieces of one character
    all read U+FFFD) share one key, the likeliest's value."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for e in entries:
        out.tokens.append(e["token"])
        out.token_logprobs.append(e["logprob"])
        top = None
        if e["top"] is not None:
            top = {}
            for text, _, value in e["top"]:  # tokens with one text (U+FFFD): the likeliest
                top.setdefault(text, value)
            top.setdefault(e["token"], e["logprob"])
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e["token"])
    return out


def chat_logprobs(entries: list[dict[str, Any]]) -> ChatLogprobs:
    """Replica entries in OpenAI's chat shape (`top_logprobs`: the alternatives only)."""
    content = [
        ChatTokenLogprob(
            token=e["token"],
            logprob=e["logprob"],
            bytes=e["bytes"],
            top_logprobs=[TopLogprob(token=t, bytes=b, logprob=v) for t, b, v in e["top"] or ()],
        )
        for e in entries
    ]
    return ChatLogprobs(content=content)


class ChunkFormatter:
    """Turns replica events into SSE frames for one request."""

    def __init__(self, kind: Kind, rid: str, model: str, n: int, include_usage: bool):
        self.kind = kind
        self.id = rid
        self.model = model
        self.n = n
        self.include_usage = include_usage
        self.created = int(time.time())
        self._offsets = [0] * n  # completions: where each choice's next token's text starts

    def opening(self) -> list[str]:
        """Frames sent before the first token (chat: the assistant role per choice)."""
        if self.kind != "chat":
            return []
        return [self._chat(i, ChatDelta(role="assistant", content=""), None) for i in range(self.n)]

    def feed(self, event: dict[str, Any]) -> list[str]:
        """Frames for one replica event (`delta` or `end`)."""
        if event["event"] == "delta":
            index, text, reason = event["index"], event["text"], event["finish_reason"]
            entries = event.get("logprobs")
            if self.kind == "completion":
                logprobs = None
                if entries is not None:
                    logprobs = completion_logprobs(entries, self._offsets[index])
                    self._offsets[index] += sum(len(e["token"]) for e in entries)
                return [self._completion(index, text, reason, logprobs)]
            chat = None if entries is None else chat_logprobs(entries)
            out = [self._chat(index, ChatDelta(content=text), None, chat)] if text else []
            if reason is not None:
                out.append(self._chat(index, ChatDelta(), reason, None if text else chat))
            return out
        if event["event"] == "end" and self.include_usage:
            return [self._usage(Usage(**event["usage"]))]
        return []

    def _completion(
        self, index: int, text: str, reason: str | None, logprobs: CompletionLogprobs | None
    ) -> str:
        choice = CompletionChoice(
            index=index,
            text=text,
            finish_reason=reason,  # type: ignore[arg-type]
            logprobs=logprobs,
        )
        chunk = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )
        return frame(chunk.model_dump(exclude={"usage", "timings"}))

    def _chat(
        self, index: int, delta: ChatDelta, reason: str | None, logprobs: ChatLogprobs | None = None
    ) -> str:
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            finish_reason=reason,  # type: ignore[arg-type]
            logprobs=logprobs,
        )
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )
        payload = chunk.model_dump(exclude={"usage"})
        payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return frame(payload)

    def _usage(self, usage: Usage) -> str:
        if self.kind == "chat":
            chunk: Any = ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
            return frame(chunk.model_dump())
        chunk = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )
        return frame(chunk.model_dump(exclude={"timings"}))
