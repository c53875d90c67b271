"""A replica lost under a request: non-streamed requests are retried, streams end cleanly.

Its own application (`retry`, two replicas of the student), so killing replicas never
disturbs the other tests. The long version under steady load is `make reliability`
(reliability/faults.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from serve_helpers import ServeUrls, wait_until

from reliability import replicas

APP = "retry"
BODY = {"model": "student", "prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0}


@pytest.fixture(scope="module")
def retry_url(serve_urls: ServeUrls, tmp_path_factory) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    root = tmp_path_factory.mktemp("retry")
    shutil.copytree(serve_urls.folder("student"), root / "deploytest" / "student")
    args = {
        "config": str(serve_urls.profile_path),
        "artifacts_dir": str(root),
        "defaults": {"num_cpus": 0.1, "replicas": 2, "max_batch_size": 4},
        "ingress": {"request_timeout_s": 60},
    }
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{serve_urls.main}/{APP}"
    finally:
        serve.delete(APP)


def lose_busy_replica(lose: Callable[[str], object]) -> str:
    """Wait until a replica is generating, then lose it; returns its actor name."""
    name, _ = wait_until(
        lambda: replicas.busiest(APP, "student"), timeout=30, what="a replica to be generating"
    )
    lose(name)
    return name


@pytest.mark.parametrize("lose", [replicas.kill, replicas.crash], ids=["ray-kill", "sigkill"])
def test_non_streamed_requests_survive_a_lost_replica(retry_url, lose):
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(httpx.post, f"{retry_url}/v1/completions", json=BODY, timeout=90)
            for _ in range(4)
        ]
        gone = lose_busy_replica(lose)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:200] for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 1000 for r in responses)
    if lose is replicas.kill:  # the next test needs two replicas again; the stream test not
        replicas.wait_replaced(APP, "student", gone, count=2)


def test_stream_that_loses_its_replica_ends_with_an_error_event_and_done(retry_url):
    """Both replicas are killed as soon as the stream's headers arrive (the tiny model is fast
    enough that a poll for the busy one could come too late); four choices of 1000 tokens
    keep the replica generating meanwhile. The stream must end with an error event and
    [DONE], not hang. Runs last: the app is left to Serve's restarts."""
    actors = []
    for name in replicas.replica_names(APP, "student"):  # one may be dead or starting
        try:
            actors.append(replicas.actor(name))
        except ValueError:
            continue
    body = {**BODY, "stream": True, "n": 4}
    with httpx.stream("POST", f"{retry_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for a in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a, no_restart=True)
        frames = [
            line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")
        ]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["code"] == 503 and "lost" in error["message"], error
    assert len(frames) < 4000  # ended early, not by finishing the generation


def test_full_queue_is_retried_only_in_the_outage_window(monkeypatch):
    """Plain overload: 503 at once. Within OUTAGE_WINDOW_S of a lost replica: wait, try again."""
    import asyncio
    import time

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    import deployments.ingress as ingress

    monkeypatch.setattr(ingress, "OUTAGE_RETRY_S", 0.001)
    gate = object.__new__(ingress.Ingress.func_or_class)  # no Serve: only the retry policy
    gate._lost_at = float("-inf")
    full = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    far = time.monotonic() + 60

    async def retry(exc: Exception, attempt: int = 1, deadline: float = far) -> bool:
        return await gate._retry(exc, attempt, deadline)

    assert asyncio.run(retry(full)) is False  # overload alone: the client gets its 503
    assert asyncio.run(retry(ActorDiedError())) is True  # a lost replica: resend...
    assert asyncio.run(retry(ActorDiedError(), attempt=ingress.RETRY_ATTEMPTS)) is False
    assert asyncio.run(retry(full, attempt=50)) is True  # ...and its queue filling is waited out
    assert asyncio.run(retry(full, deadline=time.monotonic())) is False  # never past the deadline
    gate._lost_at -= ingress.OUTAGE_WINDOW_S
    assert asyncio.run(retry(full)) is False  # the window is over: overload again
