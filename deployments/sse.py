"""Server-Sent Events in OpenAI's shape, from the replica's events (deployments.messages).

One `data: {json}` frame per text delta, a frame with `finish_reason` for each choice, an
optional usage frame (`stream_options.include_usage`), then `data: [DONE]`. Chat streams open
each choice with a `{"role": "assistant", "content": ""}` delta and close it with an empty
delta carrying `finish_reason`, as OpenAI's do; the official client accepts both shapes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from slimserve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

DONE = "data: [DONE]\n\n"
Kind = Literal["completion", "chat"]


def frame(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class ChunkFormatter:
    """Turns replica events into SSE frames for one request."""

    def __init__(self, kind: Kind, rid: str, model: str, n: int, include_usage: bool):
        self.kind = kind
        self.id = rid
        self.model = model
        self.n = n
        self.include_usage = include_usage
        self.created = int(time.time())

    def opening(self) -> list[str]:
        """Frames sent before the first token (chat: the assistant role per choice)."""
        if self.kind != "chat":
            return []
        return [self._chat(i, ChatDelta(role="assistant", content=""), None) for i in range(self.n)]

    def feed(self, event: dict[str, Any]) -> list[str]:
        """Frames for one replica event (`delta` or `end`)."""
        if event["event"] == "delta":
            index, text, reason = event["index"], event["text"], event["finish_reason"]
            if self.kind == "completion":
                return [self._completion(index, text, reason)]
            out = [self._chat(index, ChatDelta(content=text), None)] if text else []
            if reason is not None:
                out.append(self._chat(index, ChatDelta(), reason))
            return out
        if event["event"] == "end" and self.include_usage:
            return [self._usage(Usage(**event["usage"]))]
        return []

    def _completion(self, index: int, text: str, reason: str | None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=reason)  # type: ignore[arg-type]
        chunk = CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )
        return frame(chunk.model_dump(exclude={"usage", "timings"}))

    def _chat(self, index: int, delta: ChatDelta, reason: str | None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason)  # type: ignore[arg-type]
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
