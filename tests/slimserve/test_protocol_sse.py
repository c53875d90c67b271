"""The client-side SSE decoder the dashboard and the load generator share."""

from __future__ import annotations

from slimserve.protocol import SSEDecoder, iter_sse_data


def test_an_event_is_returned_at_its_blank_line():
    d = SSEDecoder()
    assert d.feed('data: {"a": 1}') is None
    assert d.feed("") == '{"a": 1}'
    assert d.feed("") is None  # no event open
    assert [d.feed(x) for x in (": ping", "data: [DONE]", "")] == [None, None, "[DONE]"]


def test_iter_sse_data_joins_multiline_data_and_flushes_the_tail():
    lines = [": keep-alive", "event: x", "data: a", "", "data: b", "data: c", "", "data:[DONE]"]
    assert list(iter_sse_data(lines)) == ["a", "b\nc", "[DONE]"]
