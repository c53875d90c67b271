"""A replica lost under a request: non-streamed requests, and streams before their first
frame, are retried; streams that lost their replica later end cleanly.

Its own application (`retry`, two replicas of the student), so killing replicas never
disturbs the other tests; the stream policy's cases run against fakes, without Serve. The
long version under steady load is `make reliability` (reliability/faults.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
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
        with contextlib.suppress(Exception):  # Serve may be stopped already (conftest.py)
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


def test_stream_that_loses_its_replica_before_its_first_frame_is_retried(retry_url):
    """A stream whose replica is lost before the stream's first frame is sent again on the
    other replica: the client sees one clean stream. (The tiny test model's greedy text is
    bytes that never complete a character, so its first frame only comes with the end of
    generation and the whole generation is "before the first frame". The case of a replica
    lost after the first frame is tested without Serve below.)"""
    wait_until(lambda: replicas.running(APP, "student") >= 2, timeout=120, what="2 replicas")
    body = {**BODY, "stream": True, "n": 4, "stream_options": {"include_usage": True}}

    def read() -> tuple[int, list[str]]:
        url = f"{retry_url}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=90) as r:
            lines = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data:")]
            return r.status_code, lines

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(read)
        lose_busy_replica(replicas.kill)
        status, frames = future.result()
    assert status == 200 and frames[-1] == "[DONE]", frames[-3:]
    assert not any('"error"' in f for f in frames), [f for f in frames if '"error"' in f]
    assert json.loads(frames[-2])["usage"]["completion_tokens"] == 4 * BODY["max_tokens"]


def inbox_address() -> str:
    """Where the `retry` ingress's stream events inbox listens, from the line its replica logs
    when it starts listening (its first streamed request)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    found = [
        m[1]
        for path in logs.glob(f"replica_{APP}_Ingress_*.log")
        for m in re.finditer(r"stream events inbox listening on (\S+)", path.read_text())
    ]
    assert len(set(found)) == 1, found
    return found[0]


def connected_to(pid: int, address: str) -> bool:
    """Whether process `pid` holds an open TCP connection to `address` ("host:port")."""
    import psutil

    host, port = address.rsplit(":", 1)
    return any(
        c.status == psutil.CONN_ESTABLISHED
        and c.raddr
        and (c.raddr.ip, c.raddr.port) == (host, int(port))
        for c in psutil.Process(pid).net_connections(kind="tcp")
    )


@pytest.mark.timeout(420)  # run alone, it also waits for the folder's Serve to start
def test_a_replica_crashed_mid_stream_ends_its_started_streams_and_retries_the_rest(retry_url):
    """A real crash (SIGKILL of the replica's process) under streams whose events travel the
    real events channel (the app's default `stream_channel: true`; the replica holds its
    connection to the ingress's inbox): the stream that had sent text ends with an error
    event and `[DONE]`; the streams on that replica that had sent nothing yet are sent again
    to the other replica and complete, as if nothing had happened.

    A sampled stream shows text at once; a greedy one of the tiny model shows nothing before
    its end (see above), so it is "not started" for as long as it runs."""
    wait_until(lambda: replicas.running(APP, "student") >= 2, timeout=120, what="2 replicas")
    names = replicas.replica_names(APP, "student")
    wait_until(lambda: all(replicas.ongoing(n) == 0 for n in names), timeout=60, what="idle")
    url = f"{retry_url}/v1/completions"
    texted = threading.Event()

    def read(body: dict) -> tuple[int, list[str]]:
        lines: list[str] = []
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            for ln in r.iter_lines():
                if not ln.startswith("data:"):
                    continue
                lines.append(ln.removeprefix("data: "))
                if '"text"' in ln and any(c["text"] for c in json.loads(lines[-1])["choices"]):
                    texted.set()
            return r.status_code, lines

    sampled = {**BODY, "stream": True, "n": 4, "temperature": 1.0, "seed": 7}
    greedy = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    with ThreadPoolExecutor(5) as pool:
        started = pool.submit(read, sampled)
        assert texted.wait(60), "the sampled stream sent no text"
        hit, _ = wait_until(
            lambda: replicas.busiest(APP, "student"), timeout=30, what="the stream's replica"
        )
        hit_pid = replicas.pid(hit)
        assert connected_to(hit_pid, inbox_address()), "its events do not travel the channel"
        quiet = [pool.submit(read, greedy) for _ in range(4)]
        # Serve's router sends each new request to the less busy of the two replicas: the
        # stream's replica, busy with one request, gets at least one of the four.
        wait_until(lambda: replicas.ongoing(hit) >= 2, timeout=30, what="a quiet stream on it")
        assert not started.done() and not any(q.done() for q in quiet)
        assert replicas.crash(hit) == hit_pid
        status, frames = started.result()
        rest = [q.result() for q in quiet]

    assert status == 200 and frames[-1] == "[DONE]", frames[-3:]
    error = json.loads(frames[-2])
    assert error["error"]["code"] == 503 and "retry the request" in error["error"]["message"]
    assert any('"text"' in f for f in frames[:-2])  # text came before the error
    for code, lines in rest:
        assert code == 200 and lines[-1] == "[DONE]", lines[-3:]
        assert not any('"error"' in ln for ln in lines), [ln for ln in lines if '"error"' in ln]
        assert json.loads(lines[-2])["usage"]["completion_tokens"] == BODY["max_tokens"]


def test_full_queue_is_retried_only_in_the_outage_window(monkeypatch):
    """Plain overload: 503 at once. Within OUTAGE_WINDOW_S of a lost replica: wait, try again."""
    import asyncio
    import time

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    import deployments.replica_client as rc

    monkeypatch.setattr(rc, "OUTAGE_RETRY_S", 0.001)
    gate = rc.ReplicaClient(request_timeout_s=60)  # no Serve: only the retry policy
    full = BackPressureError(num_queued_requests=9, max_queued_requests=8)
    far = time.monotonic() + 60

    async def retry(exc: Exception, attempt: int = 1, deadline: float = far) -> bool:
        return await gate._retry(exc, attempt, deadline)

    assert asyncio.run(retry(full)) is False  # overload alone: the client gets its 503
    assert asyncio.run(retry(ActorDiedError())) is True  # a lost replica: resend...
    assert asyncio.run(retry(ActorDiedError(), attempt=rc.RETRY_ATTEMPTS)) is False
    assert asyncio.run(retry(full, attempt=50)) is True  # ...and its queue filling is waited out
    assert asyncio.run(retry(full, deadline=time.monotonic())) is False  # never past the deadline
    gate.lost_at -= rc.OUTAGE_WINDOW_S
    assert asyncio.run(retry(full)) is False  # the window is over: overload again


# -- streams before their first frame: the same policy as non-streamed calls (no Serve) -------


class FakeStream:
    """A replica stream: its messages in order (an event alone is a message of one, a list is
    one message); an exception item is raised where it stands."""

    def __init__(self, *items: object):
        self.items = [[i] if isinstance(i, dict) else i for i in items]
        self.cancelled = False
        self.drained = False

    async def __anext__(self) -> object:
        if not self.items:
            self.drained = True
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.options(stream=True).stream.remote(payload)` hands out `streams` in order."""

    def __init__(self, *streams: object):
        self.streams = list(streams)
        self.calls = 0

    def options(self, **_: object) -> FakeHandle:
        return self

    @property
    def stream(self) -> FakeHandle:
        return self

    def remote(self, _payload: object) -> object:
        self.calls += 1
        return self.streams.pop(0)


def full_queue_stream():
    """What Serve 2.60 hands back when the caller's queue is full: a generator whose
    assignment failed, and whose `cancel()` raises that BackPressureError again."""
    import concurrent.futures
    from types import SimpleNamespace

    from ray.serve.exceptions import BackPressureError
    from ray.serve.handle import DeploymentResponseGenerator

    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    meta = SimpleNamespace(request_id="r")
    return DeploymentResponseGenerator(future, meta, _is_router_running_in_separate_loop=True)


START = {"event": "start", "prompt_tokens": 3}
DELTA = {"event": "delta", "index": 0, "text": "hi", "finish_reason": None}
END = {"event": "delta", "index": 0, "text": "!", "finish_reason": "length"}
QUEUE_FULL = {
    "event": "error",
    "error": {"status": 503, "message": "student is overloaded", "type": "overloaded_error"},
}


@pytest.fixture
def gate(monkeypatch):
    """A ReplicaClient without Serve: its retry and streaming paths run against fakes."""
    import time

    import deployments.replica_client as rc

    monkeypatch.setattr(rc, "OUTAGE_RETRY_S", 0.001)
    monkeypatch.setattr(rc, "RETRY_BACKOFF_S", 0.001)
    g = rc.ReplicaClient(request_timeout_s=60)
    g.far = time.monotonic() + 60
    return g


def chunks_of(gate, stream, first, usage: bool = False) -> list[str]:
    """The SSE body's chunks (each one message from the ingress to the proxy)."""
    import asyncio

    from deployments.serving import sse
    from deployments.sse import ChunkFormatter

    async def collect() -> list[str]:
        fmt = ChunkFormatter("completion", "cmpl-1", "student", 1, usage)
        return [f async for f in sse(gate, stream, first, fmt, gate.far)]

    return asyncio.run(collect())


def body_of(gate, stream, first) -> list[str]:
    """The SSE body's frames."""
    chunks = chunks_of(gate, stream, first)
    return [f + "\n\n" for chunk in chunks for f in chunk.split("\n\n") if f]


@pytest.mark.timeout(10)
def test_stream_before_its_first_frame_is_retried_like_a_non_streamed_call(gate):
    import asyncio

    from ray.exceptions import ActorDiedError

    gate.replica_lost()  # a replica was just lost: the outage window
    lost_after_start = FakeStream(START, ActorDiedError())  # gone before its first token
    served = FakeStream(START, DELTA, END)
    handle = FakeHandle(full_queue_stream(), FakeStream(QUEUE_FULL), lost_after_start, served)
    stream, first = asyncio.run(gate.open_stream(handle, {}, gate.far, "student"))
    assert handle.calls == 4 and stream is served and first == [START, DELTA]
    assert lost_after_start.cancelled
    frames = body_of(gate, stream, first)
    texts = [json.loads(f.removeprefix("data: "))["choices"][0]["text"] for f in frames[:-1]]
    assert texts == ["hi", "!"] and frames[-1] == "data: [DONE]\n\n"


@pytest.mark.timeout(10)
def test_a_replica_message_is_one_chunk_and_the_last_one_carries_done(gate):
    import asyncio

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    end = {"event": "end", "usage": usage, "timings": {}}
    stream = FakeStream([START, DELTA], [END, end])  # as deployments.model `stream` groups them
    opened, first = asyncio.run(gate.open_stream(FakeHandle(stream), {}, gate.far, "student"))
    assert first == [START, DELTA]
    chunks = chunks_of(gate, opened, first, usage=True)
    assert len(chunks) == 2 and chunks[1].endswith("data: [DONE]\n\n")
    frames = [json.loads(f.removeprefix("data: ")) for f in chunks[1].split("\n\n")[:2]]
    assert frames[0]["choices"][0]["finish_reason"] == "length"
    assert frames[1]["usage"] == usage
    assert stream.drained and not stream.cancelled  # Serve sees the call end normally


@pytest.mark.timeout(10)
def test_stream_with_a_full_queue_outside_the_outage_window_gets_an_enveloped_503(gate):
    import asyncio

    from deployments.errors import ApiError

    for stream, message, retry_after in [
        (full_queue_stream(), "server overloaded: Request dropped", "1"),
        (FakeStream(QUEUE_FULL), "student is overloaded", None),
    ]:
        handle = FakeHandle(stream)
        with pytest.raises(ApiError) as caught:
            asyncio.run(gate.open_stream(handle, {}, gate.far, "student"))
        data = caught.value.data
        assert handle.calls == 1 and data["status"] == 503, data
        assert data["message"].startswith(message) and data["headers"].get("Retry-After") == (
            retry_after
        )


@pytest.mark.timeout(10)
def test_stream_that_loses_its_replica_after_a_frame_ends_with_error_and_done(gate):
    import asyncio

    from ray.exceptions import ActorDiedError

    stream = FakeStream(START, DELTA, ActorDiedError())
    handle = FakeHandle(stream)
    opened, first = asyncio.run(gate.open_stream(handle, {}, gate.far, "student"))
    frames = body_of(gate, opened, first)
    assert json.loads(frames[0].removeprefix("data: "))["choices"][0]["text"] == "hi"
    error = json.loads(frames[1].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "lost" in error["message"]
    assert frames[2:] == ["data: [DONE]\n\n"] and stream.cancelled
    assert gate.lost_at > float("-inf")  # full queues from now on are the outage's doing
