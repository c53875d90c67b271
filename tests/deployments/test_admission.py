"""A variant Serve just reported full is answered 503 by the ingress itself (no router call)
for a moment, never within the outage window after a lost replica. No Serve: the replica
client runs against fakes."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.serve.exceptions import BackPressureError

import deployments.replica_client as rc
from deployments.admission import FullQueues
from deployments.errors import ApiError


class Handle:
    """`handle.generate.remote(...)`: counts the calls; each fails with a full queue or
    returns `reply`."""

    def __init__(self) -> None:
        self.calls = 0
        self.full = True
        self.generate = self

    def remote(self) -> object:
        self.calls += 1
        full, reply = self.full, {"choices": []}

        async def answer() -> object:
            if full:
                raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
            return reply

        return answer()


@pytest.fixture
def gate() -> rc.ReplicaClient:
    return rc.ReplicaClient(request_timeout_s=60, queues=FullQueues(recheck_s=60))


@pytest.fixture
def handle() -> Handle:
    return Handle()


def request(gate: rc.ReplicaClient, handle: Handle) -> object:
    """What the ingress does for a completion: admit, then call the replica."""

    async def go() -> object:
        gate.admit("student")
        return await gate.call(handle.generate.remote, time.monotonic() + 60, "student")

    return asyncio.run(go())


@pytest.mark.timeout(10)
def test_a_full_variant_is_answered_without_asking_serve_again(gate, handle):
    answers = []
    for _ in range(3):
        with pytest.raises(ApiError) as caught:
            request(gate, handle)
        answers.append(caught.value.data)
    assert handle.calls == 1  # only the first asked Serve's router
    assert all(a["status"] == 503 and a["headers"]["Retry-After"] == "1" for a in answers)
    assert answers[0] == answers[2]
    gate.queues.freed("student")  # a request to it ended: ask again
    handle.full = False
    assert request(gate, handle) == {"choices": []} and handle.calls == 2


@pytest.mark.timeout(10)
def test_in_the_outage_window_a_full_variant_is_asked_again(gate, handle, monkeypatch):
    monkeypatch.setattr(rc, "OUTAGE_RETRY_S", 0.001)
    with pytest.raises(ApiError):
        request(gate, handle)
    gate.replica_lost()  # a replica was lost: full queues are waited out
    handle.full = False
    assert request(gate, handle) == {"choices": []} and handle.calls == 2


@pytest.mark.timeout(10)
def test_the_memory_of_a_full_queue_expires():
    queues = FullQueues(recheck_s=0.05)
    queues.full("student", ApiError(503, "full"))
    with pytest.raises(ApiError):
        queues.check("student")
    queues.check("teacher")  # other variants are not affected
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.05:  # the recheck interval itself is what is tested
        time.sleep(0.01)
    queues.check("student")


@pytest.mark.timeout(10)
def test_each_freed_slot_lets_exactly_one_request_ask_serve(gate, handle):
    with pytest.raises(ApiError):
        request(gate, handle)  # Serve says full: remembered
    gate.queues.freed("student")  # one request ended elsewhere: room for one more
    with pytest.raises(ApiError):
        request(gate, handle)  # that one asks Serve (still full: a newer request took it)
    assert handle.calls == 2
    for _ in range(3):
        with pytest.raises(ApiError):
            request(gate, handle)
    assert handle.calls == 2  # the rest are answered by the ingress alone
