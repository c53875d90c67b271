"""The hand-written hostile-input matrix: requests a fuzzer rarely builds on its own.

Each case is one raw HTTP request. The rule for all of them is the same: never a 5xx, every
error in the `{"error": {...}}` envelope with `code` equal to the status, and the service
answers normally afterwards. `tests/deployments/test_hostile.py` runs it with `make test`;
`reliability/hostile.py` runs it again, with schemathesis, under `make reliability`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

JSON = "application/json"
OK = {"model": "student", "prompt": "hello", "max_tokens": 2}
CHAT = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON})
    statuses: frozenset[int] = frozenset({400})  # what a correct server answers

    def send(self, base: str, client: httpx.Client) -> httpx.Response:
        return client.request(
            self.method, base + self.path, content=self.body or None, headers=self.headers
        )


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _raw(text: str) -> bytes:
    """JSON text as written (lone surrogate escapes, NaN, huge numbers survive)."""
    return text.encode()


def _case(id: str, body: bytes, path: str = "/v1/completions", **kw: Any) -> Case:
    statuses = kw.pop("statuses", {400})
    return Case(id=id, path=path, body=body, statuses=frozenset(statuses), **kw)


DEEP = 100_000  # under the 1 MiB body cap; Python's json recurses once per level
MATRIX: list[Case] = [
    # Structure
    _case("deep-list", _raw('{"model":"student","prompt":' + "[" * DEEP + "]" * DEEP + "}")),
    _case("deep-object", _raw('{"model":"student","prompt":' + '{"a":' * DEEP + "1" + "}" * DEEP + "}")),
    _case("deep-messages", _raw('{"model":"student","messages":' + "[" * DEEP + "]" * DEEP + "}"), "/v1/chat/completions"),
    _case("deep-infer", _raw('{"prompt":' + "[" * DEEP + "]" * DEEP + "}"), "/infer"),
    _case("huge-int", _raw('{"model":"student","prompt":"a","max_tokens":' + "9" * 5000 + "}")),
    _case("huge-int-id", _raw('{"model":"student","prompt":[' + "9" * 5000 + "]}")),
    _case("float-overflow", _raw('{"model":"student","prompt":"a","temperature":1e400}')),
    _case("neg-infinity", _raw('{"model":"student","prompt":"a","top_p":-Infinity}')),
    _case("nan-penalty", _raw('{"model":"student","prompt":"a","repetition_penalty":NaN}')),
    _case("nan-compare", _raw('{"prompt":"a","temperature":NaN}'), "/compare"),
    _case("duplicate-keys", _raw('{"model":"student","prompt":"a","max_tokens":2,"max_tokens":0}')),
    _case("many-keys", _j({**OK, **{f"k{i}": i for i in range(20_000)}})),
    _case("null-body", _raw("null")),
    _case("bom-prefix", b"\xef\xbb\xbf" + _j(OK), statuses={200, 400}),
    # Text
    _case("lone-surrogate", _raw('{"model":"student","prompt":"a\\ud800b","max_tokens":2}'), statuses={200, 400}),
    _case("lone-low-surrogate", _raw('{"model":"student","prompt":"\\udfff","max_tokens":2}'), statuses={200, 400}),
    _case("surrogate-chat", _raw('{"model":"student","messages":[{"role":"user","content":"\\ud83d"}],"max_tokens":2}'), "/v1/chat/completions", statuses={200, 400}),
    _case("surrogate-stop", _raw('{"model":"student","prompt":"a","stop":["\\ud800"],"max_tokens":2}'), statuses={200, 400}),
    _case("surrogate-infer", _raw('{"prompt":"\\udc00 x"}'), "/infer", statuses={200, 400}),
    _case("surrogate-model", _raw('{"model":"\\ud800","prompt":"a"}'), statuses={400, 404}),
    _case("invalid-utf8-in-string", b'{"model":"student","prompt":"a\xc3\x28b"}'),
    _case("overlong-utf8", b'{"model":"student","prompt":"\xc0\xafetc"}'),
    _case("control-chars", _j({**OK, "prompt": "".join(map(chr, range(32))) + "\x7f"}), statuses={200, 400}),
    _case("nul-only", _j({**OK, "prompt": "\x00"}), statuses={200, 400}),
    _case("bidi-and-zero-width", _j({**OK, "prompt": "\u202e\u200b\ufeff\u2028x"}), statuses={200}),
    _case("prompt-over-cap", _j({**OK, "prompt": "x" * 40_000})),
    _case("stop-huge", _j({**OK, "stop": ["x" * 40_000]})),
    _case("user-huge", _j({**OK, "user": "u" * 5000})),
    # Token lists
    _case("ids-negative", _j({**OK, "prompt": [-1, 5]})),
    _case("ids-bool", _j({**OK, "prompt": [True, False]}), statuses={200, 400}),
    _case("ids-float", _j({**OK, "prompt": [1.5, 2]})),
    _case("ids-nested", _j({**OK, "prompt": [[1, 2], [3]]})),
    _case("ids-mixed", _j({**OK, "prompt": [1, "a"]})),
    _case("ids-over-int64", _j({**OK, "prompt": [2**64]})),
    _case("ids-vocab-edge", _j({**OK, "prompt": [1, 50257]})),  # GPT-2 ids end at 50256
    _case("ids-too-many", _j({**OK, "prompt": [1] * 40_000})),
    # Sampling extremes that pass validation
    _case("temp-tiny", _j({**OK, "temperature": 1e-300}), statuses={200, 400}),
    _case("penalty-tiny", _j({**OK, "repetition_penalty": 1e-300}), statuses={200, 400}),
    _case("top-k-over-vocab", _j({**OK, "top_k": 100_000}), statuses={200}),
    _case("top-p-tiny", _j({**OK, "top_p": 5e-324}), statuses={200, 400}),
    _case("seed-max", _j({**OK, "seed": 2**63 - 1, "n": 8}), statuses={200}),
    _case("seed-over", _j({**OK, "seed": 2**64})),
    _case("n-with-stream", _j({**OK, "n": 8, "stream": True}), statuses={200}),
    _case("stream-not-bool", _j({**OK, "stream": "maybe"})),
    _case("stream-options-junk", _j({**OK, "stream": True, "stream_options": {"x": 1}})),
    _case("max-completion-tokens", _j({**CHAT, "max_completion_tokens": 0}), "/v1/chat/completions"),
    # Model names that look like paths or URLs: a model name is a key, never a file
    _case("model-parent-dir", _j({**OK, "model": "../student"}), statuses={404}),
    _case("model-abs-path", _j({**OK, "model": "/etc/passwd"}), statuses={404}),
    _case("model-traversal", _j({**OK, "model": "../../../../../etc/passwd"}), statuses={404}),
    _case("model-dot", _j({**OK, "model": "."}), statuses={404}),
    _case("model-backslash", _j({**OK, "model": "..\\..\\windows"}), statuses={404}),
    _case("model-url", _j({**OK, "model": "file:///etc/passwd"}), statuses={404}),
    _case("model-nul", _j({**OK, "model": "student\x00.json"}), statuses={404}),
    _case("model-type", _j({**OK, "model": ["student"]})),
    _case("infer-model-path", _j({"prompt": "a", "model": "../teacher"}), "/infer", statuses={404}),
    _case("compare-model-path", _j({"prompt": "a", "models": ["/tmp"]}), "/compare", statuses={404}),
    _case("card-traversal", b"", "/v1/models/..%2F..%2Fetc%2Fpasswd", method="GET", statuses={404}),
    _case("card-encoded-nul", b"", "/v1/models/student%00", method="GET", statuses={404}),
    # Transport
    _case("charset-utf16", "{}".encode("utf-16"), headers={"Content-Type": JSON + "; charset=utf-16"}),
    _case("json-with-params", _j(OK), headers={"Content-Type": "Application/JSON; charset=utf-8"}, statuses={200}),
    _case("method-put", _j(OK), method="PUT", statuses={405}),
    _case("method-delete", b"", "/v1/models", method="DELETE", statuses={405}),
]  # fmt: skip


def check(case: Case, response: httpx.Response) -> str | None:
    """What is wrong with the answer to `case`, or None."""
    status = response.status_code
    if status >= 500:
        return f"{case.id}: {status} {response.text[:200]}"
    if status not in case.statuses:
        return f"{case.id}: got {status}, expected one of {sorted(case.statuses)}"
    if status >= 400:
        try:
            err = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{case.id}: {status} without the error envelope: {response.text[:200]}"
        if err.get("code") != status or not err.get("message"):
            return f"{case.id}: bad envelope {err}"
    return None
