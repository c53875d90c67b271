"""A fake ingress behind `httpx.MockTransport`: the real wire format, with injectable failures.

Test modules reach the helpers through the `fake_ingress` fixture (`fake_ingress.REPLY`,
`fake_ingress.sse(...)`), never by importing this file, so any pytest import mode works.

Why not mock `IngressClient` itself: the pages and the client are tested together this way, so
an injected 503 travels the same path (status -> IngressError -> message) as a real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import httpx
import pytest

from slimserve.protocol import (
    CompareResponse,
    CompareResult,
    CompletionChoice,
    CompletionResponse,
    ModelCard,
    ModelList,
)

REPLY = ["Hello", " **world**", " <b>x</b>", " [l](javascript:alert(1))"]
REPLY_TEXT = "".join(REPLY)
TEACHER_TEXT = "the cat sat on the mat"
STUDENT_TEXT = "the dog sat on the mat"


def envelope(status: int, message: str, param: str | None = None, **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    return httpx.Response(status, json=body, headers=headers)


def sse(chunks: list[dict | str], done: bool = True) -> bytes:
    lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def chat_chunk(content: str | None, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "student",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }


def cards() -> list[ModelCard]:
    common = {"params_total": 4_000_000, "bytes": 16_000_000, "context_length": 128}
    return [
        ModelCard(
            id="teacher",
            step="finetune",
            runtime="torch",
            deployed=True,
            perplexity=30.0,
            params_nonzero=4_000_000,
            agreement=1.0,
            **common,
        ),
        ModelCard(
            id="student",
            step="distill",
            parent="teacher",
            runtime="torch",
            deployed=True,
            perplexity=35.0,
            params_nonzero=2_000_000,
            agreement=0.8,
            **common,
        ),
        ModelCard(
            id="student-trt",
            step="build-trt",
            parent="student",
            runtime="tensorrt",
            deployed=False,
            reason="no NVIDIA GPU",
        ),
    ]


@dataclass
class FakeIngress:
    """Answers like the ingress; `fail[path] = name` makes one endpoint fail that way.

    Failure names: "400", "401", "404", "500", "503" (an HTTP status with the OpenAI error
    envelope), "timeout" (httpx.ReadTimeout), "refused" (httpx.ConnectError), and for the chat
    stream "midstream" (an error chunk after some text), "cut" (no [DONE]), "stall" (a read
    timeout after some text). Path "*" fails every endpoint.
    """

    REPLY: ClassVar[list[str]] = REPLY
    REPLY_TEXT: ClassVar[str] = REPLY_TEXT
    TEACHER_TEXT: ClassVar[str] = TEACHER_TEXT
    STUDENT_TEXT: ClassVar[str] = STUDENT_TEXT
    sse = staticmethod(sse)
    chat_chunk = staticmethod(chat_chunk)
    envelope = staticmethod(envelope)

    fail: dict[str, str] = field(default_factory=dict)
    models: list[ModelCard] = field(default_factory=cards)
    message: str | None = None
    max_messages: int | None = None  # a 400 for longer conversations ("context exceeded")
    requests: list[httpx.Request] = field(default_factory=list)

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        failure = self.fail.get(path) or self.fail.get("*")
        if failure == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if failure == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if failure and failure.isdigit():
            status = int(failure)
            headers = {"Retry-After": "2"} if status == 503 else {}
            return envelope(status, f"injected {status}", "temperature", **headers)
        if path == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/v1/models":
            listing = ModelList(data=self.models, profile="tiny", message=self.message)
            return httpx.Response(200, content=listing.model_dump_json())
        if path == "/v1/chat/completions":
            return self.chat(json.loads(request.content), failure)
        if path == "/compare":
            return self.compare(json.loads(request.content))
        if path == "/v1/completions":
            body = json.loads(request.content)
            choice = CompletionChoice(index=0, text=REPLY_TEXT, finish_reason="length")
            done = CompletionResponse(model=body["model"], choices=[choice])
            return httpx.Response(200, content=done.model_dump_json())
        return envelope(404, f"no route {path}")

    def chat(self, body: dict, failure: str | None) -> httpx.Response:
        if self.max_messages is not None and len(body["messages"]) > self.max_messages:
            return envelope(400, "prompt + max_tokens exceeds the context (128)", "messages")
        chunks: list[dict | str] = [chat_chunk(t) for t in REPLY]
        chunks.append(chat_chunk(None, "length"))
        usage = {"prompt_tokens": 3, "completion_tokens": len(REPLY), "total_tokens": 7}
        chunks.append({**chat_chunk(None), "choices": [], "usage": usage})
        headers = {"content-type": "text/event-stream"}
        if failure == "midstream":
            broken = [*chunks[:2], {"error": {"message": "replica died", "code": 500}}]
            return httpx.Response(200, content=sse(broken, done=False), headers=headers)
        if failure == "cut":
            return httpx.Response(200, content=sse(chunks[:2], done=False), headers=headers)
        if failure == "stall":

            def stalled() -> Iterator[bytes]:
                yield sse(chunks[:2], done=False)
                raise httpx.ReadTimeout("stalled")

            return httpx.Response(200, content=stalled(), headers=headers)
        return httpx.Response(200, content=sse(chunks), headers=headers)

    def compare(self, body: dict) -> httpx.Response:
        texts = {"teacher": self.TEACHER_TEXT, "student": self.STUDENT_TEXT}
        results = []
        for name in body.get("models") or ["teacher", "student"]:
            if name not in texts:
                results.append(CompareResult(model=name, error=f"{name} is not deployed"))
                continue
            fast = name == "student"
            results.append(
                CompareResult(
                    model=name,
                    text=texts[name],
                    token_ids=[1, 2, 3],
                    completion_tokens=6,
                    latency_s=0.1 if fast else 0.2,
                    ttft_s=0.01,
                    tokens_per_s=60.0 if fast else 30.0,
                    speedup=2.0 if fast else 1.0,
                    agreement=0.8 if fast else 1.0,
                )
            )
        response = CompareResponse(
            prompt=body["prompt"], reference="teacher", results=results, machine={"cpu": "fake"}
        )
        return httpx.Response(200, content=response.model_dump_json())


@pytest.fixture
def fake_ingress() -> FakeIngress:
    return FakeIngress()
