"""The client-side SSE decoder the dashboard and the load generator share, and the request
schemas' logprob, echo and penalty rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slimserve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SSEDecoder,
    iter_sse_data,
)


def test_an_event_is_returned_at_its_blank_line():
    d = SSEDecoder()
    assert d.feed('data: {"a": 1}') is None
    assert d.feed("") == '{"a": 1}'
    assert d.feed("") is None  # no event open
    assert [d.feed(x) for x in (": ping", "data: [DONE]", "")] == [None, None, "[DONE]"]


def test_iter_sse_data_joins_multiline_data_and_flushes_the_tail():
    lines = [": keep-alive", "event: x", "data: a", "", "data: b", "data: c", "", "data:[DONE]"]
    assert list(iter_sse_data(lines)) == ["a", "b\nc", "[DONE]"]


def test_logprob_and_echo_fields_are_validated_where_they_are_declared():
    def completion(**kw):
        return CompletionRequest(model="m", prompt="p", **kw)

    def chat(**kw):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **kw)

    assert completion(logprobs=0).logprobs == 0 and completion(logprobs=20).logprobs == 20
    assert completion(echo=True, max_tokens=0).max_tokens == 0
    assert completion(presence_penalty=-2, frequency_penalty=2).frequency_penalty == 2
    assert chat(logprobs=True).top_logprobs is None and chat(logprobs=True, top_logprobs=20)
    bad = [
        (completion, {"logprobs": 21}, "logprobs"),
        (completion, {"logprobs": -1}, "logprobs"),
        (completion, {"logprobs": True}, "logprobs"),  # an integer, not the chat field's bool
        (completion, {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        (completion, {"presence_penalty": 2.01}, "presence_penalty"),
        (completion, {"frequency_penalty": -3}, "frequency_penalty"),
        (chat, {"top_logprobs": 1}, "top_logprobs"),  # needs logprobs: true
        (chat, {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (chat, {"max_tokens": 0}, "max_tokens"),
        (chat, {"echo": True}, "echo"),  # completions only
    ]
    for build, kw, name in bad:
        with pytest.raises(ValidationError, match=name):
            build(**kw)
