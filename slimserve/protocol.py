"""HTTP protocol schemas shared by the ingress, the dashboard and the benchmarks.

OpenAI-compatible `/v1/completions`, `/v1/chat/completions`, `/v1/models`, plus the older
projects' `/infer` and the live `/compare`. Every bound is written here once; the ingress maps a
validation failure to a 400 with the OpenAI error envelope naming the offending field.

Logprobs are raw: log-softmax of the model's own logits in float32, before temperature, top-k /
top-p and penalties (vLLM's default), so they describe the model whatever the sampling settings.

Chat template (GPT-2 has none of its own): each message becomes a line
`"<Role>: <content>"` (System / User / Assistant), joined with newlines, followed by
`"Assistant:"`; generation stops at `"\\nUser:"` as well as at the request's own stops.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimserve import sampling_bounds as bounds
from slimserve.strict import Strict

MAX_PROMPT_CHARS = 32_768  # a prompt longer than this is a 400 before tokenization
MAX_TOKENS_CAP = 2048  # per request; the variant's context is the tighter bound in practice
MAX_STOP = 4
MAX_N = 8
MAX_COMPARE_MODELS = 16
MAX_LOGPROBS = int(bounds.LOGPROBS.high or 20)  # alternatives per position (OpenAI's cap)
CHAT_STOP = "\nUser:"


class RequestModel(Strict):
    """Unknown fields are rejected (a typo is a 400 naming it), NaN and infinities too."""

    model_config = ConfigDict(allow_inf_nan=False, str_max_length=MAX_PROMPT_CHARS)


class ErrorBody(BaseModel):
    message: str
    type: str  # "invalid_request_error" | "not_found_error" | "authentication_error" | ...
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Sampling fields shared by completions, chat and compare (engine semantics)."""

    # Lower bounds (and top_p's upper one) are the engine's, from `sampling_bounds`; the other
    # upper caps are this HTTP edge's own.
    max_tokens: int = Field(
        16, le=MAX_TOKENS_CAP, description="tokens to generate", **bounds.MAX_TOKENS.field_kwargs()
    )
    temperature: float = Field(
        1.0, le=2.0, description="0 = greedy", **bounds.TEMPERATURE.field_kwargs()
    )
    top_p: float = Field(1.0, description="nucleus mass", **bounds.TOP_P.field_kwargs())
    top_k: int = Field(
        0, le=100_000, description="0 = no top-k cut (extension)", **bounds.TOP_K.field_kwargs()
    )
    repetition_penalty: float = Field(
        1.0, le=10.0, description="1 = off (extension)", **bounds.REPETITION_PENALTY.field_kwargs()
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="reproducible sampling")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    presence_penalty: float = Field(
        0.0,
        description="minus this for every token already generated",
        **bounds.PENALTY.field_kwargs(),
    )
    frequency_penalty: float = Field(
        0.0,
        description="minus this per earlier occurrence in the output",
        **bounds.PENALTY.field_kwargs(),
    )
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class CompletionRequest(SamplingFields):
    model: str = Field(min_length=1, max_length=128)
    prompt: str | list[int] = Field(description="text, or token ids")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int = Field(
        16, ge=0, le=MAX_TOKENS_CAP, description="tokens to generate (0 only with echo)"
    )
    logprobs: int | None = Field(
        None,
        strict=True,  # an integer, not `true` (that is the chat field's type)
        description="raw logprobs of each token + this many alternatives",
        **bounds.LOGPROBS.field_kwargs(),
    )
    echo: bool = Field(False, description="return the prompt first (with logprobs: its own)")

    @model_validator(mode="after")
    def _max_tokens_zero_with_echo(self) -> CompletionRequest:
        if self.max_tokens < 1 and not self.echo:
            raise ValueError("max_tokens: must be >= 1 (0 only with echo: true)")
        return self

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"at most {MAX_PROMPT_CHARS} prompt tokens")
        return v


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=64)


class ChatCompletionRequest(SamplingFields):
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = Field(None, description="raw logprob of each generated token")
    top_logprobs: int | None = Field(
        None,
        description="alternatives per token (needs logprobs: true)",
        **bounds.LOGPROBS.field_kwargs(),
    )

    @model_validator(mode="after")
    def _max_completion(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if not any(m.content for m in self.messages):
            raise ValueError("messages: at least one message needs content")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def prompt_text(self) -> str:
        return render_chat(self.messages)


def render_chat(messages: list[ChatMessage]) -> str:
    """The documented chat template (module docstring)."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    """Server-side timings (extension): queue wait, time to first token, end to end."""

    queue_s: float
    ttft_s: float
    e2e_s: float
    tokens_per_s: float


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: one entry per token, in parallel lists.

    The first prompt token (with echo) has no logprob: None there in `token_logprobs` and
    `top_logprobs`. `top_logprobs` maps token text to logprob: the `logprobs` most likely
    tokens plus the chosen one (as vLLM). `text_offset`: where each token's text starts in
    the choice's text (the sum of the previous tokens' text lengths)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's own UTF-8 bytes (may be part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the `top_logprobs` most likely, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One catalogue variant as `/v1/models` lists it (OpenAI fields + slimserve facts)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "slimserve"
    step: str | None = None
    parent: str | None = None
    runtime: str | None = None
    params_total: int | None = None
    params_nonzero: int | None = None
    bytes: int | None = None
    perplexity: float | None = None
    agreement: float | None = None
    context_length: int | None = None
    deployed: bool = False
    reason: str | None = Field(None, description="why it is not deployed")
    replicas: int | None = None
    device: str | None = None
    note: str | None = Field(None, description="why it runs on CPU on a cluster with a GPU")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    profile: str | None = None
    message: str | None = None  # e.g. "not built: run `make artifacts`"


class InferRequest(RequestModel):
    """The older projects' API: next-token prediction for one prompt."""

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, max_length=128, description="default: the teacher")
    max_new_tokens: int = Field(0, ge=0, le=MAX_TOKENS_CAP, description="greedy continuation")
    top_k: int = Field(5, ge=1, le=100)


class TokenProb(BaseModel):
    id: int
    text: str
    prob: float


class InferResponse(BaseModel):
    model: str
    next_token: TokenProb
    top_k: list[TokenProb]
    continuation: str | None = None
    latency_ms: float


class CompareRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    models: list[str] | None = Field(
        None, max_length=MAX_COMPARE_MODELS, description="default: every deployed variant"
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="default greedy, for agreement")
    logprobs: None = None
    warmup: bool = Field(True, description="one short untimed run per variant first")


class CompareResult(BaseModel):
    model: str
    text: str | None = None
    token_ids: list[int] = Field(default_factory=list)
    completion_tokens: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    speedup: float | None = Field(None, description="teacher latency / this latency")
    agreement: float | None = Field(
        None, description="top-1 agreement with the teacher over the generated positions"
    )
    error: str | None = None


class CompareResponse(BaseModel):
    prompt: str
    reference: str | None = Field(None, description="the teacher variant, if deployed")
    results: list[CompareResult]
    machine: dict[str, Any] = Field(default_factory=dict)


class SSEDecoder:
    """Client side of the streamed replies: Server-Sent Events, fed one line at a time.

    `feed(line)` (without its line ending) returns an event's data when the blank line that
    ends it arrives. Multi-line data fields are joined with newlines (the SSE rule); comments
    (`:`) and other fields (`event:`, `id:`) are ignored. `[DONE]` is returned like any data;
    the caller stops.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if line == "":
            return self.flush()
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The data of an event still open (a stream that ended without its blank line)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event in a stream of SSE lines (see `SSEDecoder`)."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    tail = decoder.flush()
    if tail is not None:
        yield tail
