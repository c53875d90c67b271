"""Every route of the ingress, through Ray Serve, with curl-like httpx and the openai client."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from openai import OpenAI
from serve_helpers import TORCH_VARIANTS

from slimserve.protocol import CHAT_STOP, ChatMessage, render_chat

DEPLOYED = list(TORCH_VARIANTS)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(serve_urls) -> OpenAI:
    return OpenAI(base_url=f"{serve_urls.main}/v1", api_key="unused", max_retries=0)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")
    assert frames[-1] == ""
    payloads = []
    for f in frames[:-1]:
        assert f.startswith("data: ") and "\n" not in f, f
        payloads.append(f.removeprefix("data: "))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads


def test_healthz_and_docs(serve_urls):
    health = httpx.get(f"{serve_urls.main}/healthz").json()
    assert health["status"] == "ok" and sorted(health["deployed"]) == sorted(DEPLOYED)
    docs = httpx.get(f"{serve_urls.main}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = httpx.get(f"{serve_urls.main}/openapi.json").json()["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/infer", "/compare"):
        assert path in paths


def test_models_lists_the_whole_catalogue_with_reasons(serve_urls, client):
    body = httpx.get(f"{serve_urls.main}/v1/models").json()
    cards = {c["id"]: c for c in body["data"]}
    assert body["profile"] == "deploytest" and body["message"] is None
    assert set(cards) == set(DEPLOYED) | {"student-onnx", "student-trt", "student-slim"}
    for name in DEPLOYED:
        c = cards[name]
        assert c["deployed"] and c["reason"] is None and c["runtime"] == "torch"
        assert c["params_total"] > 0 and c["params_nonzero"] > 0 and c["bytes"] > 0
        assert c["perplexity"] >= 300 and c["agreement"] is not None
        assert c["context_length"] == 1024 and c["device"] == "cpu" and c["replicas"] == 1
    assert cards["student-slim"]["reason"] == "not built: run `make artifacts`"
    assert cards["student-onnx"]["reason"].startswith("unavailable:")
    assert "NVIDIA GPU" in cards["student-trt"]["reason"]
    assert not any(cards[n]["deployed"] for n in ("student-onnx", "student-trt", "student-slim"))
    assert sorted(m.id for m in client.models.list()) == sorted(cards)
    assert client.models.retrieve("student-slim").id == "student-slim"
    missing = httpx.get(f"{serve_urls.main}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


@pytest.mark.parametrize("model", DEPLOYED)
def test_openai_client_every_variant_streamed_equals_non_streamed(client, model):
    kw = {"model": model, "max_tokens": 12, "temperature": 0}
    full = client.completions.create(prompt=PROMPT, **kw)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(
        client.completions.create(
            prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 12 and chat.choices[0].finish_reason in (
        "stop",
        "length",
    )
    parts = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert parts[0].choices[0].delta.role == "assistant"
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    )
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_sse_framing_ids_and_usage(serve_urls):
    body = {"model": "student", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    r = post(serve_urls.main, "/v1/completions", {**body, "stream": True})
    assert r.status_code == 200
    events = [json.loads(p) for p in sse_events(r)[:-1]]
    assert len(events) == 5  # one frame per token of text (EOS never ends these models early)
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("cmpl-")
    assert all(e["object"] == "text_completion" and e["model"] == "student" for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["length"]

    chat = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = post(serve_urls.main, "/v1/chat/completions", {**chat, "stream": True, "n": 2, "seed": 7,
              "stream_options": {"include_usage": True}})  # fmt: skip
    events = [json.loads(p) for p in sse_events(r)[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    roles = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("role")]
    assert sorted(e["choices"][0]["index"] for e in roles) == [0, 1]
    finals = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1] and all(c["delta"] == {} for c in finals)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 6


def test_greedy_api_equals_slimserve_generate(serve_urls):
    from slimserve.generate_cli import generate_main
    from slimserve.sampling import SamplingParams

    for model in ("teacher", "student-b"):
        api = post(serve_urls.main, "/v1/completions",
                   {"model": model, "prompt": PROMPT, "max_tokens": 20, "temperature": 0})  # fmt: skip
        params = SamplingParams(max_tokens=20, temperature=0.0)
        done = generate_main(
            serve_urls.folder(model),
            PROMPT,
            params,
            threads=1,
            out=io.StringIO(),
            err=io.StringIO(),
        )
        assert api.json()["choices"][0]["text"] == done.text
        assert api.json()["usage"]["completion_tokens"] == done.completion_tokens == 20


def test_chat_uses_the_documented_template(serve_urls):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = post(serve_urls.main, "/v1/chat/completions",
                {"model": "student", "messages": msgs, "max_tokens": 10, "temperature": 0})  # fmt: skip
    prompt = render_chat([ChatMessage(**m) for m in msgs])
    assert prompt == "System: Be brief.\nUser: Hello\nAssistant:"
    plain = post(serve_urls.main, "/v1/completions",
                 {"model": "student", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                  "stop": [CHAT_STOP]})  # fmt: skip
    assert chat.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["text"]
    assert chat.json()["usage"] == plain.json()["usage"]


def test_sampling_fields_seed_stop_n_and_token_prompts(serve_urls):
    url = serve_urls.main
    base = {"model": "student-c", "prompt": PROMPT, "max_tokens": 16}
    sampled = [
        post(url, "/v1/completions", {**base, "temperature": 1.5, "top_p": 0.9, "seed": 3}).json()
        for _ in range(2)
    ]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # same seed, same text
    greedy = post(url, "/v1/completions", {**base, "temperature": 0}).json()["choices"][0]["text"]
    assert (
        post(url, "/v1/completions", {**base, "top_k": 1, "temperature": 1.0}).json()["choices"][0][
            "text"
        ]
        == greedy
    )  # top_k 1 is greedy
    stop = greedy[4:6]
    cut = post(url, "/v1/completions", {**base, "temperature": 0, "stop": stop}).json()
    assert cut["choices"][0]["text"] == greedy[: greedy.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    two = post(url, "/v1/completions", {**base, "n": 2, "temperature": 1.0, "seed": 1}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] == 32
    ids = post(url, "/v1/completions", {**base, "prompt": [5, 6, 7], "max_tokens": 3}).json()
    assert ids["usage"]["prompt_tokens"] == 3 and ids["usage"]["completion_tokens"] == 3
    penalised = post(url, "/v1/completions",
                     {**base, "temperature": 0, "repetition_penalty": 5.0}).json()  # fmt: skip
    assert penalised["choices"][0]["text"] != greedy  # these models repeat; the penalty bites


def test_infer_keeps_the_older_api(serve_urls):
    r = post(serve_urls.main, "/infer", {"prompt": PROMPT, "top_k": 4, "max_new_tokens": 6})
    body = r.json()
    assert r.status_code == 200 and body["model"] == "teacher"  # the default
    probs = [t["prob"] for t in body["top_k"]]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert body["next_token"] == body["top_k"][0] and body["latency_ms"] > 0
    greedy = post(serve_urls.main, "/v1/completions",
                  {"model": "teacher", "prompt": PROMPT, "max_tokens": 6, "temperature": 0})  # fmt: skip
    assert body["continuation"] == greedy.json()["choices"][0]["text"]
    only = post(serve_urls.main, "/infer", {"prompt": PROMPT, "model": "student"}).json()
    assert only["model"] == "student" and only["continuation"] is None
    assert len(only["top_k"]) == 5


def test_compare_four_variants_live(serve_urls):
    models = ["student", "student-b", "student-c", "teacher"]
    r = post(serve_urls.main, "/compare", {"prompt": PROMPT, "models": models, "max_tokens": 8})
    body = r.json()
    assert r.status_code == 200 and body["reference"] == "teacher"
    rows = {row["model"]: row for row in body["results"]}
    assert [row["model"] for row in body["results"]] == models
    for row in rows.values():
        assert row["error"] is None and row["completion_tokens"] == 8
        assert len(row["token_ids"]) == 8 and row["text"]
        assert 0 < row["ttft_s"] <= row["latency_s"] and row["tokens_per_s"] > 0
        assert row["speedup"] > 0 and 0 <= row["agreement"] <= 1
    assert rows["teacher"]["agreement"] == 1.0 and rows["teacher"]["speedup"] == 1.0
    # Random students disagree with the random teacher somewhere over 8 positions.
    assert min(rows[m]["agreement"] for m in models[:3]) < 1.0
    assert body["machine"]["devices"]["student"] == "cpu"


def test_per_variant_metrics_on_rays_prometheus_endpoint(serve_urls):
    import ray
    from serve_helpers import wait_until

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = [
        "ray_slimserve_time_to_first_token_seconds_bucket",
        "ray_slimserve_time_per_output_token_seconds_bucket",
        "ray_slimserve_e2e_request_latency_seconds_bucket",
        "ray_slimserve_prompt_tokens_total",
        "ray_slimserve_generation_tokens_total",
        "ray_slimserve_num_requests_running",
        "ray_slimserve_num_requests_waiting",
        "ray_slimserve_requests_finished_total",
        "ray_serve_num_http_requests_total",  # Serve's own, beside ours
    ]

    def scrape() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found: dict[str, float] = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and ('model="student-b"' in line or name.startswith("ray_serve")):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    # Counters are cumulative over the session and exported once per report interval: settle
    # on what earlier tests left (unchanged for longer than one export), then wait for the
    # exported values to include this request's tokens.
    finished_key = "ray_slimserve_requests_finished_total"
    settle_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1e3 + 1.0

    state: dict[str, float | None] = {"value": None, "since": 0.0}

    def settled() -> dict[str, float] | None:
        found = scrape()
        value = found.get(finished_key, 0.0)
        if value != state["value"]:
            state["value"], state["since"] = value, time.monotonic()
        return found if time.monotonic() - state["since"] >= settle_s else None

    before = wait_until(settled, timeout=60, interval=1.0, what="earlier requests exported")
    r = post(serve_urls.main, "/v1/completions", {"model": "student-b", "prompt": PROMPT})
    assert r.status_code == 200, r.text
    generated = r.json()["usage"]["completion_tokens"]
    tokens_key = "ray_slimserve_generation_tokens_total"

    def scraped() -> dict[str, float] | None:
        found = scrape()
        if set(found) != set(wanted) or found["ray_slimserve_num_requests_running"] != 0:
            return None  # not exported yet, or an export from while a request ran
        if found[tokens_key] < before.get(tokens_key, 0.0) + generated:
            return None  # an export from before this request finished
        if found[finished_key] < before.get(finished_key, 0.0) + 1:
            return None
        return found

    found = wait_until(scraped, timeout=60, interval=1.0, what="this request's metrics exported")
    assert generated >= 16
    assert found[tokens_key] >= generated
    assert found["ray_slimserve_num_requests_waiting"] == 0
