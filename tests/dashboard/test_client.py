"""The dashboard's HTTP client against a fake ingress (httpx.MockTransport)."""

from __future__ import annotations

import httpx
import pytest

from dashboard.client import (
    IngressClient,
    IngressError,
    Sampling,
    Settings,
    with_overrides,
)
from slimserve.protocol import iter_sse_data

USER = [{"role": "user", "content": "hi"}]


def client_for(fake, **settings) -> IngressClient:
    return IngressClient(Settings(**settings), transport=httpx.MockTransport(fake.handler))


def test_settings_from_env():
    s = Settings.from_env({"SLIMSERVE_URL": "http://h:9/", "SLIMSERVE_API_KEY": "k"})
    assert (s.url, s.api_key, s.timeout_s) == ("http://h:9", "k", 120.0)
    assert Settings.from_env({}).url == "http://127.0.0.1:8000"
    assert Settings.from_env({"SLIMSERVE_TIMEOUT": "bad"}).timeout_s == 120.0
    assert with_overrides(s, " http://o:1/ ", "") == Settings("http://o:1", "k", 120.0)


def test_parse_sse_events_comments_and_multiline():
    lines = [": keep-alive", "event: x", "data: a", "", "data: b", "data: c", "", "data:[DONE]", ""]
    assert list(iter_sse_data(iter(lines))) == ["a", "b\nc", "[DONE]"]
    assert list(iter_sse_data(iter(["data: tail"]))) == ["tail"]  # no trailing blank line


def test_chat_stream_yields_deltas_and_stats(fake_ingress):
    stream = client_for(fake_ingress, api_key="sk-1").chat_stream(
        "student", USER, Sampling(max_tokens=8, temperature=0.0, top_k=5, seed=3)
    )
    assert list(stream) == fake_ingress.REPLY
    assert stream.text == fake_ingress.REPLY_TEXT
    stats = stream.stats
    assert stats.completion_tokens == len(fake_ingress.REPLY)
    assert stats.finish_reason == "length"
    assert stats.ttft_s is not None and 0 <= stats.ttft_s <= stats.e2e_s
    assert stats.tokens_per_s == pytest.approx(len(fake_ingress.REPLY) / stats.e2e_s)
    request = fake_ingress.requests[-1]
    assert request.headers["authorization"] == "Bearer sk-1"
    body = fake_ingress.bodies("/v1/chat/completions")[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["seed"]) == (8, 0.0, 5, 3)


def test_chat_stream_counts_chunks_without_usage(fake_ingress):
    chunk, sse = fake_ingress.chat_chunk, fake_ingress.sse

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse([chunk("a"), chunk(""), chunk("b")]))

    client = IngressClient(Settings(), transport=httpx.MockTransport(handler))
    stream = client.chat_stream("m", USER, Sampling())
    assert "".join(stream) == "ab"
    assert stream.stats.completion_tokens == 2


def test_no_api_key_no_header(fake_ingress):
    client_for(fake_ingress).models()
    assert "authorization" not in fake_ingress.requests[-1].headers


@pytest.mark.parametrize(
    ("failure", "kind", "status"),
    [
        ("400", "bad_request", 400),
        ("401", "unauthorized", 401),
        ("404", "not_found", 404),
        ("500", "server", 500),
        ("503", "overloaded", 503),
        ("timeout", "timeout", None),
        ("refused", "unreachable", None),
    ],
)
@pytest.mark.parametrize("call", ["models", "chat", "compare", "health"])
def test_failures_map_to_one_error(fake_ingress, failure, kind, status, call):
    fake_ingress.fail["*"] = failure
    client = client_for(fake_ingress)
    with pytest.raises(IngressError) as info:
        if call == "models":
            client.models()
        elif call == "chat":
            list(client.chat_stream("student", USER, Sampling()))
        elif call == "compare":
            client.compare("p", ["student"], Sampling())
        else:
            client.health()
    err = info.value
    assert (err.kind, err.status) == (kind, status)
    if failure.isdigit():
        assert err.message == f"injected {failure}" and err.param == "temperature"
    if failure == "503":
        assert err.retry_after == 2.0
    if failure == "refused":
        assert "127.0.0.1:8000" in err.message


@pytest.mark.parametrize(
    ("failure", "kind", "text"),
    [("midstream", "server", "replica died"), ("cut", "server", "before [DONE]"),
     ("stall", "timeout", "did not answer")],
)  # fmt: skip
def test_stream_failures_after_text(fake_ingress, failure, kind, text):
    fake_ingress.fail["/v1/chat/completions"] = failure
    stream = client_for(fake_ingress).chat_stream("student", USER, Sampling())
    got: list[str] = []
    with pytest.raises(IngressError) as info:
        for delta in stream:
            got.append(delta)
    assert got == fake_ingress.REPLY[:2] and stream.text == "".join(fake_ingress.REPLY[:2])
    assert info.value.kind == kind and text in info.value.message
    assert stream.stats.e2e_s > 0


@pytest.mark.parametrize(("code", "kind"), [(408, "timeout"), (503, "overloaded"), (500, "server")])
def test_error_frame_code_decides_the_kind(fake_ingress, code, kind):
    frames = [fake_ingress.chat_chunk("a"), {"error": {"message": "m", "code": code}}]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=fake_ingress.sse(frames))  # error frame, then [DONE]

    stream = IngressClient(Settings(), httpx.MockTransport(handler)).chat_stream(
        "m", USER, Sampling()
    )
    with pytest.raises(IngressError) as info:
        list(stream)
    assert (info.value.kind, info.value.status, stream.text) == (kind, code, "a")


def test_invalid_request_is_refused_before_sending(fake_ingress):
    client = client_for(fake_ingress)
    with pytest.raises(IngressError) as info:
        client.chat_stream("student", USER, Sampling(top_p=0.0))
    assert info.value.kind == "bad_request" and info.value.param == "top_p"
    with pytest.raises(IngressError, match="prompt"):
        client.compare("", None, Sampling())
    assert fake_ingress.requests == []


def test_non_envelope_errors_and_bad_bodies():
    answers = {
        "/v1/models": httpx.Response(422, json={"detail": "field required"}),
        "/compare": httpx.Response(502, text="<html>bad gateway</html>"),
        "/healthz": httpx.Response(200, text="fine"),
        "/v1/completions": httpx.Response(200, json={"unexpected": True}),
    }
    client = IngressClient(Settings(), httpx.MockTransport(lambda r: answers[r.url.path]))
    with pytest.raises(IngressError) as info:
        client.models()
    assert (info.value.kind, info.value.message) == ("bad_request", "field required")
    with pytest.raises(IngressError) as info:
        client.compare("p", None, Sampling())
    assert info.value.kind == "server" and "bad gateway" in info.value.message
    assert client.health() == {"status": "ok"}
    with pytest.raises(IngressError) as info:
        client.complete("m", "p", Sampling())
    assert info.value.kind == "protocol"


def test_complete_sends_only_what_was_set(fake_ingress):
    done = client_for(fake_ingress).complete("student", "Once", Sampling(max_tokens=4, seed=None))
    assert done.choices[0].text == fake_ingress.REPLY_TEXT
    body = fake_ingress.bodies("/v1/completions")[-1]
    assert body == {
        "model": "student", "prompt": "Once", "max_tokens": 4, "temperature": 0.8,
        "top_p": 1.0, "top_k": 0,
    }  # fmt: skip


def test_models_and_compare_parse(fake_ingress):
    client = client_for(fake_ingress)
    listing = client.models()
    assert [c.id for c in listing.data] == ["teacher", "student", "student-trt"]
    response = client.compare("p", ["teacher", "student"], Sampling(temperature=0.0))
    assert response.reference == "teacher" and response.results[1].speedup == 2.0
    assert fake_ingress.bodies("/compare")[-1]["models"] == ["teacher", "student"]


def test_bad_url_is_unreachable():
    client = IngressClient(Settings(url="not a url"))
    with pytest.raises(IngressError) as info:
        client.models()
    assert info.value.kind == "unreachable"


def test_stream_error_status_reads_envelope(fake_ingress):
    def handler(request: httpx.Request) -> httpx.Response:
        return fake_ingress.envelope(400, "prompt + max_tokens exceeds the context", "messages")

    stream = IngressClient(Settings(), httpx.MockTransport(handler)).chat_stream(
        "m", USER, Sampling()
    )
    with pytest.raises(IngressError) as info:
        next(iter(stream))
    assert info.value.param == "messages" and "context" in info.value.message


def test_quick_calls_wait_less_than_generation(fake_ingress):
    """A hung ingress must not freeze a rerun: health 5 s, models 30 s, generation the setting."""
    client = client_for(fake_ingress, timeout_s=120.0)
    client.health()
    client.models()
    client.compare("p", ["teacher"], Sampling())
    reads = {r.url.path: r.extensions["timeout"]["read"] for r in fake_ingress.requests}
    assert reads == {"/healthz": 5.0, "/v1/models": 30.0, "/compare": 120.0}
    assert {r.extensions["timeout"]["connect"] for r in fake_ingress.requests} == {5.0}
