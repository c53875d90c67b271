"""Faults: client disconnects, a saturated replica, a failing health check, no artifacts.

Held replicas and restarts happen in the `faults` application (one student replica with tiny
limits), so the `main` application other tests use is never disturbed.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve
from serve_helpers import wait_until

from deployments.messages import NOT_BUILT
from slimserve.artifacts import read_manifest, write_manifest

LONG = {"model": "student-c", "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}


def stats(app: str, model: str) -> dict:
    return serve.get_deployment_handle(model, app_name=app).stats.remote().result()


def test_client_disconnect_cancels_generation(serve_urls):
    before = stats("main", "student-c")
    with httpx.stream("POST", f"{serve_urls.main}/v1/completions", json=LONG, timeout=30) as r:
        assert r.status_code == 200
        frames = []
        for line in r.iter_lines():  # read three tokens, then hang up
            if line.startswith("data: "):
                frames.append(json.loads(line.removeprefix("data: ")))
            if len(frames) == 3:
                break
    after = wait_until(
        lambda: (s := stats("main", "student-c"))["cancelled"] > before["cancelled"] and s,
        timeout=20,
        what="the engine to cancel the abandoned request",
    )
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert 3 <= generated < LONG["max_tokens"]  # stopped mid-way, not run to the end
    assert after["running"] == 0 and after["waiting"] == 0


def test_full_queue_gives_503_with_retry_after_and_stuck_requests_408(serve_urls):
    handle = serve.get_deployment_handle("student", app_name="faults")
    handle.hold.remote(5.0).result()  # the replica admits nothing for 5 s
    body = {"model": "student", "prompt": "hi", "max_tokens": 2}
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda _: httpx.post(f"{serve_urls.faults}/v1/completions", json=body, timeout=30),
                range(6),
            )
        )
    codes = [r.status_code for r in responses]
    # At most 2 fit in the held replica (max_ongoing_requests) and 1 in the ingress's queue
    # (max_queued_requests): they time out after the app's 3 s request_timeout_s; the others
    # are turned away at once. The first always gets in; under a burst Serve's router may
    # reject more than strictly needed (its documented race), so only bounds are exact.
    assert set(codes) <= {408, 503} and codes.count(408) >= 1 and codes.count(503) >= 3, codes
    for r in responses:
        err = r.json()["error"]
        assert err["code"] == r.status_code and err["message"]
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2" and err["type"] == "overloaded_error"
        else:
            assert "timed out after 3s" in err["message"]
    # The timed-out calls were cancelled in the replica; once the hold ends it serves again.
    wait_until(
        lambda: httpx.post(f"{serve_urls.faults}/v1/completions", json=body).status_code == 200,
        timeout=30,
        what="the held replica to serve again",
    )
    assert stats("faults", "student")["running"] == 0


def test_failed_health_check_replaces_the_replica(serve_urls):
    handle = serve.get_deployment_handle("student", app_name="faults")
    first = handle.info.remote().result()["replica"]
    folder = serve_urls.faults_store / "student"
    manifest = read_manifest(folder)
    manifest.created += 1  # "rebuilt": the loaded replica is stale, so its health check fails
    write_manifest(folder, manifest)

    def replaced() -> bool:
        try:
            return handle.info.remote().result(timeout_s=5)["replica"] != first
        except Exception:  # the old replica is going away
            return False

    wait_until(replaced, timeout=90, interval=0.5, what="Serve to replace the unhealthy replica")
    body = {"model": "student", "prompt": "hi", "max_tokens": 3}
    r = httpx.post(f"{serve_urls.faults}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_no_artifacts_answers_the_documented_404(serve_urls):
    url = serve_urls.empty
    assert httpx.get(f"{url}/healthz").json()["deployed"] == []
    models = httpx.get(f"{url}/v1/models").json()
    assert models["message"] == NOT_BUILT
    assert models["data"] and all(
        not c["deployed"] and c["reason"].startswith("not built") for c in models["data"]
    )
    assert {c["id"] for c in models["data"] if c["reason"] != NOT_BUILT} == {"student-trt"}
    requests = [
        ("/v1/completions", {"model": "student", "prompt": "hi"}),
        ("/v1/completions", {"model": "anything", "prompt": "hi"}),
        (
            "/v1/chat/completions",
            {"model": "teacher", "messages": [{"role": "user", "content": "x"}]},
        ),
        ("/infer", {"prompt": "hi"}),
        ("/compare", {"prompt": "hi"}),
    ]
    for path, body in requests:
        r = httpx.post(f"{url}{path}", json=body)
        assert r.status_code == 404, (path, r.text)
        assert NOT_BUILT in r.json()["error"]["message"]


def test_non_streamed_request_is_cancelled_when_the_client_leaves(serve_urls):
    """A raw socket, so the test hangs up exactly when the engine is generating."""
    before = stats("main", "student-c")
    body = json.dumps({**LONG, "stream": False}).encode()
    host, port = serve_urls.main.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    # A health check is one token: 20 new tokens mean this request is generating.
    started = before["generation_tokens_total"] + 20
    wait_until(
        lambda: stats("main", "student-c")["generation_tokens_total"] >= started,
        what="generation to start",
    )
    sock.close()
    after = wait_until(
        lambda: (s := stats("main", "student-c"))["cancelled"] > before["cancelled"] and s,
        timeout=20,
        what="the engine to cancel the abandoned request",
    )
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 1000


def test_replica_settings_reach_the_engine_and_reconfigure_live(serve_urls):
    handle = serve.get_deployment_handle("student", app_name="faults")
    info = handle.info.remote().result()
    # The engine is built with its defaults (batch 16); Serve passed the app's user_config.
    assert info["engine"]["max_batch_size"] == 1 and info["engine"]["max_queue"] == 2
    assert info["runtime"]["threads"] == 1 and info["runtime"]["device"] == "cpu"
    new = {"max_batch_size": 3, "max_wait_ms": 0.0, "max_queue": 6}
    handle.reconfigure.remote(new).result()
    now = handle.info.remote().result()
    assert now["replica"] == info["replica"]  # applied in place, no restart
    assert {k: now["engine"][k] for k in new} == new
    with pytest.raises(Exception, match="max_batch_size"):
        handle.reconfigure.remote({**new, "max_batch_size": 0}).result()
    handle.reconfigure.remote(info["engine"]).result()
