"""Bad input of every kind: a 4xx in the OpenAI envelope naming the field, and never a 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from serve_helpers import API_KEY

OK = {"model": "student", "prompt": "hello there", "max_tokens": 4}
CHAT = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"Content-Type": "application/json"}


def case(path: str, body: Any, status: int, param: str | None = None, **kw: Any) -> Any:
    """One row of the matrix: body is a dict (sent as JSON) or raw bytes (sent as is)."""
    return pytest.param(path, body, status, param, kw, id=f"{status}-{path}-{kw.get('id', param)}")


CASES = [
    # Body and transport
    case("/v1/completions", b'{"model": "student", "prompt": ', 400, None, id="truncated-json"),
    case("/v1/completions", b"\xff\xfe not utf-8", 400, None, id="not-utf8"),
    case("/v1/completions", b"", 400, None, id="empty-body"),
    case("/v1/completions", b"[1, 2, 3]", 400, None, id="json-array"),
    case("/v1/completions", b'"just a string"', 400, None, id="json-string"),
    case("/v1/completions", OK, 415, "Content-Type", ctype="text/plain"),
    case("/v1/completions", OK, 415, "Content-Type", ctype="application/x-www-form-urlencoded"),
    case("/v1/completions", OK, 415, "Content-Type", ctype=None),
    case("/v1/completions", {**OK, "prompt": "x" * (2 << 20)}, 413, None, id="huge-body"),
    # Prompt and model
    case("/v1/completions", {k: v for k, v in OK.items() if k != "prompt"}, 400, "prompt"),
    case("/v1/completions", {**OK, "prompt": ""}, 400, "prompt", id="empty-prompt"),
    case("/v1/completions", {**OK, "prompt": []}, 400, "prompt", id="empty-ids"),
    case("/v1/completions", {**OK, "prompt": 42}, 400, "prompt", id="number-prompt"),
    case("/v1/completions", {**OK, "prompt": [1, 10**7]}, 400, "prompt", id="id-out-of-vocab"),
    case("/v1/completions", {**OK, "prompt": "word " * 2000}, 400, "max_tokens", id="too-long"),
    case("/v1/completions", {**OK, "max_tokens": 1020}, 400, "max_tokens", id="over-context"),
    case("/v1/completions", {k: v for k, v in OK.items() if k != "model"}, 400, "model"),
    case("/v1/completions", {**OK, "model": "gpt-4"}, 404, "model", id="unknown-model"),
    case("/v1/completions", {**OK, "model": "student-trt"}, 404, "model", id="not-deployed"),
    # Sampling fields: range, type, NaN
    case("/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens", id="max0"),
    case("/v1/completions", {**OK, "max_tokens": -3}, 400, "max_tokens", id="max-neg"),
    case("/v1/completions", {**OK, "max_tokens": "ten"}, 400, "max_tokens", id="max-str"),
    case("/v1/completions", {**OK, "max_tokens": 1.5}, 400, "max_tokens", id="max-float"),
    case("/v1/completions", {**OK, "max_tokens": 10**6}, 400, "max_tokens", id="max-huge"),
    case("/v1/completions", {**OK, "temperature": -0.1}, 400, "temperature", id="temp-neg"),
    case("/v1/completions", {**OK, "temperature": 2.5}, 400, "temperature", id="temp-high"),
    case(
        "/v1/completions",
        b'{"model":"student","prompt":"a","temperature":NaN}',
        400,
        "temperature",
        id="temp-nan",
    ),  # fmt: skip
    case(
        "/v1/completions",
        b'{"model":"student","prompt":"a","top_p":Infinity}',
        400,
        "top_p",
        id="top-p-inf",
    ),  # fmt: skip
    case("/v1/completions", {**OK, "top_p": 0}, 400, "top_p", id="top-p-0"),
    case("/v1/completions", {**OK, "top_p": 1.01}, 400, "top_p", id="top-p-high"),
    case("/v1/completions", {**OK, "top_k": -1}, 400, "top_k", id="top-k-neg"),
    case("/v1/completions", {**OK, "repetition_penalty": 0}, 400, "repetition_penalty"),
    case("/v1/completions", {**OK, "seed": -1}, 400, "seed", id="seed-neg"),
    case("/v1/completions", {**OK, "stop": ""}, 400, "stop", id="stop-empty"),
    case("/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", id="stop-5"),
    case("/v1/completions", {**OK, "stop": [1]}, 400, "stop", id="stop-int"),
    case("/v1/completions", {**OK, "n": 0}, 400, "n", id="n0"),
    case("/v1/completions", {**OK, "n": 9}, 400, "n", id="n9"),
    case("/v1/completions", {**OK, "frobnicate": 1}, 400, "frobnicate", id="unknown-field"),
    case("/v1/completions", {**OK, "presence_penalty": 2.5}, 400, "presence_penalty"),
    case("/v1/completions", {**OK, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    case("/v1/completions", {**OK, "echo": "sometimes"}, 400, "echo", id="echo-str"),
    case("/v1/completions", {**OK, "logprobs": 21}, 400, "logprobs", id="logprobs-21"),
    case("/v1/completions", {**OK, "logprobs": -1}, 400, "logprobs", id="logprobs-neg"),
    case("/v1/completions", {**OK, "logprobs": True}, 400, "logprobs", id="logprobs-bool"),
    case(
        "/v1/completions",
        {**OK, "max_tokens": 0, "logprobs": 2},
        400,
        "max_tokens",
        id="max0-without-echo",
    ),  # fmt: skip
    case(
        "/v1/completions",
        {**OK, "prompt": "word " * 2000, "echo": True, "max_tokens": 0, "logprobs": 1},
        400,
        "max_tokens",
        id="echo-too-long",
    ),  # fmt: skip
    case(
        "/v1/completions",
        {**OK, "stream": True, "max_tokens": 1020},
        400,
        "max_tokens",
        id="stream-over-context",
    ),  # fmt: skip
    # Chat
    case("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", id="no-messages"),
    case(
        "/v1/chat/completions",
        {k: v for k, v in CHAT.items() if k != "messages"},
        400,
        "messages",
        id="missing-messages",
    ),  # fmt: skip
    case(
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
        id="bad-role",
    ),  # fmt: skip
    case(
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": ""}]},
        400,
        "messages",
        id="all-empty",
    ),  # fmt: skip
    case(
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages.0.content",
        id="content-int",
    ),  # fmt: skip
    case(
        "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"
    ),  # fmt: skip
    case("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", id="top-lp"),
    case(
        "/v1/chat/completions",
        {**CHAT, "logprobs": False, "top_logprobs": 0},
        400,
        "top_logprobs",
        id="top-lp-false",
    ),  # fmt: skip
    case(
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        id="top-lp-21",
    ),  # fmt: skip
    case("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", id="chat-max0"),
    case("/v1/chat/completions", {**CHAT, "echo": True}, 400, "echo", id="chat-echo"),
    # /infer and /compare
    case("/infer", {"prompt": ""}, 400, "prompt", id="infer-empty"),
    case("/infer", {"prompt": "a", "top_k": 0}, 400, "top_k", id="infer-topk0"),
    case(
        "/infer",
        {"prompt": "a", "max_new_tokens": 2000},
        400,
        "max_new_tokens",
        id="infer-over-context",
    ),  # fmt: skip
    case("/infer", {"prompt": "a", "model": "nope"}, 404, "model", id="infer-unknown"),
    case("/compare", {"prompt": "a", "models": ["student", "nope"]}, 404, "model", id="cmp-404"),
    case("/compare", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", id="cmp-max0"),
    case("/compare", {"prompt": "a", "models": ["student"] * 17}, 400, "models", id="cmp-17"),
]


def send(url: str, path: str, body: Any, kw: dict[str, Any]) -> httpx.Response:
    headers = {}
    ctype = kw.get("ctype", "application/json")
    if ctype is not None:
        headers["Content-Type"] = ctype
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30)


def check_envelope(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path,body,status,param,kw", CASES)
def test_bad_input_matrix(serve_urls, path, body, status, param, kw):
    r = send(serve_urls.main, path, body, kw)
    err = check_envelope(r, status, param)
    if kw.get("id") in ("too-long", "over-context"):
        assert "1024" in err["message"] and "prompt (" in err["message"]  # both numbers named
    if status == 404:
        assert "student" in err["message"] and "deployed" in err["message"]


def test_matrix_is_big_enough():
    assert len(CASES) >= 30


def test_chunked_upload_past_the_cap_is_413(serve_urls):
    def chunks():
        yield b'{"model": "student", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{serve_urls.main}/v1/completions", content=chunks(), headers=JSON, timeout=30)
    check_envelope(r, 413)


def test_unknown_routes_and_methods(serve_urls):
    check_envelope(httpx.get(f"{serve_urls.main}/v2/nothing"), 404)
    check_envelope(httpx.get(f"{serve_urls.main}/v1/completions"), 405)


PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/infer"),
    ("POST", "/compare"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


@pytest.mark.parametrize("method,path", PROTECTED)
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-key", f"Basic {API_KEY}", API_KEY, f"Bearer {API_KEY}x"]
)
def test_api_key_required_when_set(serve_urls, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    body = OK if method == "POST" else None
    r = httpx.request(method, f"{serve_urls.secured}{path}", json=body, headers=headers)
    check_envelope(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


def test_api_key_accepted_and_healthz_open(serve_urls):
    assert httpx.get(f"{serve_urls.secured}/healthz").status_code == 200
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{serve_urls.secured}/v1/models", headers=good).status_code == 200
    r = httpx.post(f"{serve_urls.secured}/v1/completions", json=OK, headers=good)
    check_envelope(r, 404, "model")  # past auth: this app has no artifacts
    # Key off (the main app): no header needed.
    assert httpx.get(f"{serve_urls.main}/v1/models").status_code == 200
