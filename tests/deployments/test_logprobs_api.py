"""Logprobs, echo and presence / frequency penalties through the Serve app (the shared `main`
application of conftest.py), with the official `openai` client and raw SSE."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import GPT2LMHeadModel

from slimserve.tokenizer import load_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog."
TOL = 1e-4


@pytest.fixture(scope="module")
def client(serve_urls) -> OpenAI:
    return OpenAI(base_url=f"{serve_urls.main}/v1", api_key="unused", max_retries=0)


def reference_logprobs(folder, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of the variant's logits, computed here with transformers."""
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_with_max_tokens_0_returns_the_prompts_logprobs(serve_urls, client):
    done = client.completions.create(
        model="teacher", prompt=PROMPT, logprobs=5, echo=True, max_tokens=0
    )
    choice = done.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert done.usage.completion_tokens == 0
    lp = choice.logprobs
    ids = load_tokenizer(serve_urls.folder("teacher")).encode(PROMPT)
    assert len(lp.tokens) == len(ids) == done.usage.prompt_tokens
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    ref = reference_logprobs(serve_urls.folder("teacher"), ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=TOL)
        top = lp.top_logprobs[t]  # tokens that are pieces of one character share a key
        assert 1 <= len(top) <= 6 and lp.tokens[t] in top
        assert max(top.values()) == pytest.approx(float(ref[t - 1].max()), abs=TOL)
    total = sum(lp.token_logprobs[1:])
    expected = sum(float(ref[t - 1, ids[t]]) for t in range(1, len(ids)))
    assert total == pytest.approx(expected, abs=TOL)


def test_streamed_completion_logprobs_equal_non_streamed(client):
    kw = {"model": "student", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    full = client.completions.create(**kw).choices[0]
    assert len(full.logprobs.tokens) == 8 and "".join(full.logprobs.tokens) == full.text
    for tok, value, top in zip(
        full.logprobs.tokens, full.logprobs.token_logprobs, full.logprobs.top_logprobs, strict=True
    ):
        assert max(top.values()) == value and tok in top  # greedy: the argmax
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    chunks = list(client.completions.create(stream=True, **kw))
    for chunk in chunks:
        for key, values in streamed.items():
            values += getattr(chunk.choices[0].logprobs, key)
    assert streamed == full.logprobs.model_dump()
    assert "".join(c.choices[0].text for c in chunks) == full.text


def test_echo_with_generation_puts_the_prompt_first(client):
    kw = {"model": "student-b", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**kw)
    echoed = client.completions.create(echo=True, logprobs=0, **kw)
    text = echoed.choices[0].text
    assert text == PROMPT + plain.choices[0].text
    lp = echoed.choices[0].logprobs
    assert len(lp.tokens) == echoed.usage.prompt_tokens + 5 and "".join(lp.tokens) == text
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the chosen one
    parts = list(client.completions.create(echo=True, logprobs=0, stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts) == text
    assert parts[0].choices[0].text.startswith(PROMPT)
    assert sum((p.choices[0].logprobs.tokens for p in parts), []) == lp.tokens
    no_logprobs = client.completions.create(echo=True, **kw).choices[0]
    assert no_logprobs.text == text and no_logprobs.logprobs is None


def test_streamed_chat_logprobs_equal_non_streamed(client):
    kw = {
        "model": "teacher",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    chat = client.chat.completions.create(**kw).choices[0]
    content = chat.logprobs.content
    assert content and "".join(c.token for c in content) == chat.message.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == chat.message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    parts = list(client.chat.completions.create(stream=True, **kw))
    streamed = [
        c
        for p in parts
        if p.choices and p.choices[0].logprobs
        for c in p.choices[0].logprobs.content
    ]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == chat.message.content


def test_frequency_penalty_through_the_api(serve_urls):
    def repeats(penalty: float) -> int:
        body = {"model": "student", "prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0,
                "frequency_penalty": penalty}  # fmt: skip
        r = httpx.post(f"{serve_urls.main}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        ids = load_tokenizer(serve_urls.folder("student")).encode(r.json()["choices"][0]["text"])
        return len(ids) - len(set(ids))

    assert repeats(2.0) < repeats(0.0)


def test_raw_sse_frames_carry_logprobs(serve_urls):
    body = {"model": "student", "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "logprobs": 1, "stream": True}  # fmt: skip
    r = httpx.post(f"{serve_urls.main}/v1/completions", json=body, timeout=30)
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == 3


# -- the SSE formatter on its own (no Serve) ----------------------------------------------------


def entry(token: str, logprob: float | None, top: list | None) -> dict:
    return {"token": token, "bytes": list(token.encode()), "logprob": logprob, "top": top}


def test_formatter_keeps_text_offsets_and_moves_chat_entries_to_the_final_frame():
    from deployments.sse import ChunkFormatter

    first = [
        entry("He", None, None),
        entry("llo", -0.5, [["llo", [108], -0.5], ["p", [112], -1.0]]),
    ]
    last = [entry(" w", -2.0, [["x", [120], -0.1]])]  # the chosen token is not in the top 1
    events = [
        {"event": "delta", "index": 0, "text": "Hello", "token_ids": [1, 2],
         "finish_reason": None, "logprobs": first},
        {"event": "delta", "index": 0, "text": "", "token_ids": [3],
         "finish_reason": "stop", "logprobs": last},
    ]  # fmt: skip
    fmt = ChunkFormatter("completion", "cmpl-1", "m", 1, False)
    frames = [json.loads(f.removeprefix("data: ")) for e in events for f in fmt.feed(e)]
    lps = [f["choices"][0]["logprobs"] for f in frames]
    assert [lp["text_offset"] for lp in lps] == [[0, 2], [5]]
    assert lps[0]["token_logprobs"] == [None, -0.5] and lps[0]["top_logprobs"][0] is None
    assert lps[1]["top_logprobs"] == [{"x": -0.1, " w": -2.0}]  # the chosen one is added
    first[0] = entry("He", -0.25, [])  # chat has no echo: every token has its logprob
    chat = ChunkFormatter("chat", "chatcmpl-1", "m", 1, False)
    frames = [json.loads(f.removeprefix("data: ")) for e in events for f in chat.feed(e)]
    assert [f["choices"][0]["finish_reason"] for f in frames] == [None, "stop"]
    content = [c for f in frames for c in f["choices"][0]["logprobs"]["content"]]
    assert [c["token"] for c in content] == ["He", "llo", " w"]
    assert content[1]["top_logprobs"] == [
        {"token": "llo", "logprob": -0.5, "bytes": [108]},
        {"token": "p", "logprob": -1.0, "bytes": [112]},
    ]
    assert content[0]["top_logprobs"] == [] and content[0]["bytes"] == [72, 101]
