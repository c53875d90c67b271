"""A small typed HTTP client for the slimserve ingress: the dashboard's only way to the models.

Why a client of our own instead of the `openai` package: the dashboard also needs `/compare`,
`/healthz` and the slimserve fields of `/v1/models`, and every failure must become one
`IngressError` whose `kind` the pages turn into a sentence a person can act on (never a
traceback). Responses are parsed with `slimserve.protocol`, the schemas the ingress itself uses.

Settings come from the environment: `SLIMSERVE_URL` (default http://127.0.0.1:8000),
`SLIMSERVE_API_KEY` (sent as `Authorization: Bearer <key>`), `SLIMSERVE_TIMEOUT` (seconds
between bytes of a reply, default 120); the sidebar can override them per session.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from slimserve.protocol import (
    ChatCompletionRequest,
    CompareRequest,
    CompareResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
    iter_sse_data,
)

DEFAULT_URL = "http://127.0.0.1:8000"
ErrorKind = Literal[
    "unreachable",  # nothing answers at the URL (connection refused, DNS, bad URL)
    "timeout",  # connected, but the reply (or the next streamed token) did not come in time
    "bad_request",  # 400 / 422: the request was refused; the message names the field
    "unauthorized",  # 401 / 403: API key missing or wrong
    "not_found",  # 404: unknown model or endpoint
    "overloaded",  # 429 / 503: queue full or replicas down; retry after `retry_after` s
    "server",  # 5xx, an error inside a stream, or a stream cut short
    "protocol",  # a reply that does not parse as the slimserve protocol
]
M = TypeVar("M", bound=BaseModel)


class IngressError(Exception):
    """Any failure talking to the ingress, reduced to what a page needs to explain it."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        status: int | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.status = status
        self.param = param
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"IngressError({self.kind!r}, {self.message!r}, status={self.status})"


@dataclass(frozen=True)
class Settings:
    """Where the ingress is and how long to wait for it."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        try:
            timeout = float(env.get("SLIMSERVE_TIMEOUT", "") or cls.timeout_s)
        except ValueError:
            timeout = cls.timeout_s
        return cls(
            url=(env.get("SLIMSERVE_URL") or DEFAULT_URL).rstrip("/"),
            api_key=env.get("SLIMSERVE_API_KEY") or None,
            timeout_s=timeout,
        )


@dataclass(frozen=True)
class Sampling:
    """The sampling controls both Chat and Compare expose (engine semantics, see protocol)."""

    max_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }


@dataclass
class StreamStats:
    """Timings measured here, on the client: what the person at the dashboard waited."""

    ttft_s: float | None = None  # request sent -> first non-empty text delta
    e2e_s: float = 0.0  # request sent -> stream finished
    completion_tokens: int = 0  # the server's usage count when sent, else text chunks seen
    finish_reason: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the whole wait (TTFT included): the rate a person sees."""
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else None


@dataclass
class ChatStream:
    """Iterate for the reply's text deltas; `stats` is complete once iteration ends.

    Iteration raises `IngressError` (before the first delta for a refused request, or midway
    when the stream breaks); the text already yielded stays valid.
    """

    _events: Iterator[str]
    stats: StreamStats = field(default_factory=StreamStats)
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        for delta in self._events:
            self.text += delta
            yield delta


def _error_from_response(response: httpx.Response, body: bytes) -> IngressError:
    """Map an HTTP error status and its OpenAI-style envelope to one IngressError."""
    status = response.status_code
    message, param = f"HTTP {status}", None
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message, param = str(err.get("message") or message), err.get("param")
        elif isinstance(data, dict) and "detail" in data:  # FastAPI's own errors
            message = str(data["detail"])
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        message = text[:300] or message
    retry = response.headers.get("retry-after")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    kind: ErrorKind
    if status in (401, 403):
        kind = "unauthorized"
    elif status == 404:
        kind = "not_found"
    elif status in (408, 504):
        kind = "timeout"
    elif status in (429, 503):
        kind = "overloaded"
    elif status >= 500:
        kind = "server"
    else:
        kind = "bad_request"
    return IngressError(kind, message, status, param=param, retry_after=retry_after)


def _error_from_exception(exc: Exception, url: str) -> IngressError:
    if isinstance(exc, httpx.ConnectTimeout):
        return IngressError("unreachable", f"no answer from {url} (connection timed out)")
    if isinstance(exc, httpx.TimeoutException):
        return IngressError("timeout", f"{url} did not answer in time ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return IngressError("unreachable", f"cannot connect to {url} ({exc or 'refused'})")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return IngressError("unreachable", f"{url!r} is not a valid http(s) URL")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return IngressError("server", f"{url} closed the connection mid-reply ({exc})")
    return IngressError("unreachable", f"{url}: {type(exc).__name__}: {exc}")


def _validated(model: type[M], payload: dict[str, Any]) -> M:
    """Check a request against the protocol before sending it (same bounds as the ingress)."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise IngressError("bad_request", f"{param}: {first['msg']}", param=param) from None


@lru_cache(maxsize=1)
def _tls() -> ssl.SSLContext:
    """One TLS context for every call: building one (loading the CA bundle) costs ~0.2 s,
    which every httpx.Client would otherwise pay on each dashboard rerun."""
    return ssl.create_default_context()


class IngressClient:
    """One ingress; each call opens a short-lived connection (a dashboard rerun is cheap)."""

    def __init__(self, settings: Settings, transport: httpx.BaseTransport | None = None) -> None:
        self.settings = settings
        self._transport = transport

    def _http(self, timeout_s: float | None = None) -> httpx.Client:
        headers = {"Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return httpx.Client(
            base_url=self.settings.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s or self.settings.timeout_s, connect=5.0),
            transport=self._transport,
            verify=_tls(),
        )

    def _request(
        self,
        method: str,
        path: str,
        model: type[M],
        body: Any = None,
        timeout_s: float | None = None,
    ) -> M:
        try:
            with self._http(timeout_s) as http:
                response = http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise _error_from_exception(e, self.settings.url) from None
        if response.status_code >= 400:
            raise _error_from_response(response, response.content)
        try:
            return model.model_validate_json(response.content)
        except ValidationError as e:
            raise IngressError(
                "protocol", f"{path} answered something that is not a {model.__name__}: {e}"
            ) from None

    def health(self) -> dict[str, Any]:
        """`/healthz`'s JSON (or `{"status": "ok"}` for an empty 200); waits at most 5 s, since
        the sidebar asks on every rerun and a hung ingress must not freeze the page."""
        try:
            with self._http(min(5.0, self.settings.timeout_s)) as http:
                response = http.get("/healthz")
        except httpx.HTTPError as e:
            raise _error_from_exception(e, self.settings.url) from None
        if response.status_code >= 400:
            raise _error_from_response(response, response.content)
        try:
            data = response.json()
        except ValueError:
            data = None
        return data if isinstance(data, dict) else {"status": "ok"}

    def models(self) -> ModelList:
        return self._request(
            "GET", "/v1/models", ModelList, timeout_s=min(30.0, self.settings.timeout_s)
        )

    def complete(self, model: str, prompt: str, sampling: Sampling) -> CompletionResponse:
        req = _validated(CompletionRequest, {"model": model, "prompt": prompt, **sampling.fields()})
        body = req.model_dump(exclude_unset=True, exclude_none=True)
        return self._request("POST", "/v1/completions", CompletionResponse, body)

    def compare(
        self, prompt: str, models: list[str] | None, sampling: Sampling, warmup: bool = True
    ) -> CompareResponse:
        payload = {"prompt": prompt, "models": models, "warmup": warmup, **sampling.fields()}
        body = _validated(CompareRequest, payload).model_dump(exclude_unset=True, exclude_none=True)
        return self._request("POST", "/compare", CompareResponse, body)

    def chat_stream(
        self, model: str, messages: list[dict[str, str]], sampling: Sampling
    ) -> ChatStream:
        """Stream a chat reply over SSE. The request is validated here, before anything is sent."""
        payload = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **sampling.fields(),
        }
        body = _validated(ChatCompletionRequest, payload).model_dump(
            exclude_unset=True, exclude_none=True
        )
        stats = StreamStats()
        return ChatStream(self._chat_events(body, stats), stats)

    def _chat_events(self, body: dict[str, Any], stats: StreamStats) -> Iterator[str]:
        url = self.settings.url
        start = time.perf_counter()
        chunks, usage_tokens, done = 0, None, False
        try:
            with self._http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    raise _error_from_response(r, r.read())
                for payload in iter_sse_data(r.iter_lines()):
                    if payload == "[DONE]":
                        done = True
                        stats.e2e_s = time.perf_counter() - start  # before closing the stream
                        break
                    delta, finish, usage = _chat_chunk(payload)
                    stats.finish_reason = finish or stats.finish_reason
                    usage_tokens = usage if usage is not None else usage_tokens
                    if delta:
                        chunks += 1
                        if stats.ttft_s is None:
                            stats.ttft_s = time.perf_counter() - start
                        yield delta
        except httpx.HTTPError as e:
            raise _error_from_exception(e, url) from None
        finally:
            if not done:
                stats.e2e_s = time.perf_counter() - start
            stats.completion_tokens = usage_tokens if usage_tokens is not None else chunks
        if not done:  # a reply cut short must not look complete
            raise IngressError("server", "the reply stream ended before [DONE] (cut short)")


def _chat_chunk(payload: str) -> tuple[str, str | None, int | None]:
    """(text delta, finish_reason, usage.completion_tokens) of one chat SSE chunk."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise IngressError("protocol", f"a stream chunk is not JSON: {payload[:120]!r}") from None
    if not isinstance(data, dict):
        raise IngressError("protocol", f"a stream chunk is not an object: {payload[:120]!r}")
    if isinstance(err := data.get("error"), dict):  # an error after the stream began
        code = err.get("code")  # the ingress puts the HTTP status it would have sent here
        kind: ErrorKind = "server"
        if code in (408, 504):
            kind = "timeout"
        elif code in (429, 503):
            kind = "overloaded"
        status = code if isinstance(code, int) else None
        raise IngressError(kind, str(err.get("message") or "error in the stream"), status)
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    choices = data.get("choices") or []
    if not choices:
        return "", None, tokens
    choice = choices[0] if isinstance(choices[0], dict) else {}
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return str(content or ""), choice.get("finish_reason"), tokens


def with_overrides(settings: Settings, url: str | None, api_key: str | None) -> Settings:
    """Settings with the sidebar's values where the person typed some."""
    return replace(
        settings,
        url=(url or settings.url).strip().rstrip("/"),
        api_key=api_key if api_key else settings.api_key,
    )
