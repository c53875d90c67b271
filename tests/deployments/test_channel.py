"""The stream events channel (deployments.channel) on a real local socket, without Serve: a fake
handle's `stream_to` plays the replica (an Outbox writing to the Inbox) and returns like a
Serve call. Through Serve it is exercised by every streamed test of test_ingress.py and by the
replica-loss stream test of test_retry.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

import deployments.channel as ch
import deployments.replica_client as rc

START = {"event": "start", "prompt_tokens": 3}
DELTA = {"event": "delta", "index": 0, "text": "hi", "token_ids": [1], "finish_reason": None}
LAST = {"event": "delta", "index": 0, "text": "!", "token_ids": [2], "finish_reason": "length"}
END = {"event": "end", "usage": {}, "timings": {}}
Replica = Callable[[ch.Outbox, str], Awaitable[dict[str, Any]]]


class FakeResponse:
    """A Serve call's response: awaitable once, cancellable."""

    def __init__(self, work: Awaitable[Any]):
        self.task = asyncio.ensure_future(work)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class FakeHandle:
    """`handle.stream_to.remote(payload, inbox, rid)` runs `replica` on a fresh Outbox."""

    def __init__(self, replica: Replica, outboxes: ch.Outboxes | None = None):
        self.replica = replica
        self.outboxes = outboxes or ch.Outboxes()
        self.responses: list[FakeResponse] = []

    @property
    def stream_to(self) -> FakeHandle:
        return self

    def remote(self, payload: Any, inbox: dict[str, str], rid: str) -> FakeResponse:
        async def work() -> dict[str, Any]:
            try:
                box = await self.outboxes.get(inbox)
            except OSError as exc:
                return {"unreachable": str(exc)}
            return await self.replica(box, rid)

        self.responses.append(FakeResponse(work()))
        return self.responses[-1]


def sends(*messages: list[dict[str, Any]], tail: Callable[[], Awaitable[None]] | None = None):
    """A replica that sends `messages` one loop turn apart, drains, then awaits `tail`."""

    async def replica(box: ch.Outbox, rid: str) -> dict[str, Any]:
        for events in messages:
            box.send(rid, events)
            await asyncio.sleep(0)
        await box.drain()
        if tail is not None:
            await tail()
        return {}

    return replica


async def read_all(stream: ch.ChannelStream) -> list[list[dict[str, Any]]]:
    return [events async for events in stream]


def run(coro_fn: Callable[[ch.Inbox], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        inbox = ch.Inbox(host="127.0.0.1")
        await inbox.start()
        try:
            return await asyncio.wait_for(coro_fn(inbox), 5)
        finally:
            inbox.close()

    return asyncio.run(main())


@pytest.mark.timeout(20)
def test_events_arrive_in_order_and_the_stream_ends_after_the_call():
    async def go(inbox: ch.Inbox) -> None:
        handle = FakeHandle(sends([START, DELTA], [LAST, END]))
        stream = inbox.open(handle, {})  # type: ignore[arg-type]
        assert await read_all(stream) == [[START, DELTA], [LAST, END]]
        assert stream.call.done() and not inbox.queues  # the call returned; nothing kept

    run(go)


@pytest.mark.timeout(20)
def test_one_write_per_loop_turn_carries_every_request_s_events():
    """Sixteen streams that each send in the same loop turn reach the inbox as ONE message."""
    got: list[int] = []

    async def go(inbox: ch.Inbox) -> None:
        real = inbox.deliver
        inbox.deliver = lambda pairs: (got.append(len(pairs)), real(pairs))  # type: ignore[method-assign]
        outboxes = ch.Outboxes()
        await outboxes.get({"address": inbox.address or "", "key": inbox.key})  # connected
        steps = [asyncio.Event(), asyncio.Event()]

        async def replica(box: ch.Outbox, rid: str) -> dict[str, Any]:
            await steps[0].wait()  # all sixteen wake in one loop turn, like one engine step
            box.send(rid, [START, DELTA])
            await steps[1].wait()
            box.send(rid, [LAST, END])
            await box.drain()
            return {}

        handle = FakeHandle(replica, outboxes)
        streams = [inbox.open(handle, {}) for _ in range(16)]  # type: ignore[arg-type]
        for step in steps:
            await asyncio.sleep(0.05)
            step.set()
        results = await asyncio.gather(*(read_all(s) for s in streams))
        assert all(r == [[START, DELTA], [LAST, END]] for r in results)

    run(go)
    assert got == [16, 16], got


@pytest.mark.timeout(20)
def test_a_call_that_returns_before_its_last_events_arrive_still_gets_them(monkeypatch):
    """The reply and the events travel separately: the stream waits for `end` on the socket."""

    async def go(inbox: ch.Inbox) -> None:
        handle = FakeHandle(sends([START, DELTA]))
        stream = inbox.open(handle, {})  # type: ignore[arg-type]
        first = await stream.__anext__()
        await stream.call  # returned; `end` has not been written yet
        box = await handle.outboxes.get({"address": inbox.address or "", "key": inbox.key})
        asyncio.get_running_loop().call_later(0.1, box.send, stream.rid, [LAST, END])
        assert [first, *(await read_all(stream))] == [[START, DELTA], [LAST, END]]

    run(go)


@pytest.mark.timeout(20)
def test_events_that_never_come_end_the_stream_after_the_grace(monkeypatch):
    monkeypatch.setattr(ch, "END_GRACE_S", 0.2)

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends([START, DELTA])), {})  # type: ignore[arg-type]
        assert await stream.__anext__() == [START, DELTA]
        with pytest.raises(ConnectionError, match="never arrived"):
            await stream.__anext__()
        assert not inbox.queues

    run(go)


@pytest.mark.timeout(20)
def test_a_lost_replica_raises_after_the_events_it_sent():
    from ray.exceptions import ActorDiedError

    async def die() -> None:
        raise ActorDiedError()

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends([START, DELTA], tail=die)), {})  # type: ignore[arg-type]
        assert await stream.__anext__() == [START, DELTA]
        with pytest.raises(ActorDiedError):
            await stream.__anext__()

    run(go)


@pytest.mark.timeout(20)
def test_cancel_stops_the_call_and_later_events_are_dropped():
    async def go(inbox: ch.Inbox) -> None:
        hang = asyncio.Event()
        handle = FakeHandle(sends([START, DELTA], tail=hang.wait))
        stream = inbox.open(handle, {})  # type: ignore[arg-type]
        assert await stream.__anext__() == [START, DELTA]
        stream.cancel()
        assert handle.responses[0].cancelled and not inbox.queues
        inbox.deliver([[stream.rid, [LAST]]])  # a late message for it: dropped, no error

    run(go)


@pytest.mark.timeout(20)
def test_a_connection_without_the_key_is_closed_and_delivers_nothing():
    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends(tail=asyncio.Event().wait)), {})  # type: ignore[arg-type]
        host, port = (inbox.address or "").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(msgpack.packb("not the key") + msgpack.packb([[stream.rid, [START]]]))
        assert await reader.read() == b""  # closed by the inbox
        assert stream.queue.empty()
        stream.cancel()

    run(go)


@pytest.mark.timeout(20)
def test_an_inbox_behind_a_silent_firewall_fails_fast(monkeypatch):
    """A connect that never completes (a firewall dropping packets, played here by a connect
    that waits forever) is an OSError after CONNECT_TIMEOUT_S, which the replica answers as
    `unreachable`, not a request that hangs to its deadline."""
    monkeypatch.setattr(ch, "CONNECT_TIMEOUT_S", 0.2)

    async def silent(*_: object, **__: object) -> None:
        await asyncio.Event().wait()

    async def go() -> float:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "create_connection", silent)
        t0 = loop.time()
        with pytest.raises(OSError):
            await ch.Outbox.connect("192.0.2.1:9", "k")
        return loop.time() - t0

    assert asyncio.run(go()) < 2


@pytest.mark.timeout(20)
def test_a_connection_that_sends_no_key_is_closed(monkeypatch):
    monkeypatch.setattr(ch, "KEY_TIMEOUT_S", 0.1)

    async def go(inbox: ch.Inbox) -> None:
        host, port = (inbox.address or "").rsplit(":", 1)
        reader, _ = await asyncio.open_connection(host, int(port))
        assert await reader.read() == b""  # closed by the inbox after KEY_TIMEOUT_S
        assert not inbox.readers

    run(go)


@pytest.mark.timeout(20)
def test_a_replica_whose_ingress_is_gone_fails_its_next_send():
    async def go(inbox: ch.Inbox) -> None:
        outboxes = ch.Outboxes()
        box = await outboxes.get({"address": inbox.address or "", "key": inbox.key})
        inbox.close()  # stops listening and drops the replicas' connections
        with pytest.raises(ConnectionError):
            for _ in range(100):  # the loss is seen once the close reaches this end
                box.send("r", [DELTA])
                await asyncio.sleep(0.01)

    run(go)


@pytest.mark.timeout(20)
def test_an_unreachable_inbox_falls_back_to_serve_streaming(caplog):
    """A replica that cannot connect generates nothing; the ingress goes again through Serve's
    streaming response, and keeps doing so."""

    class Both(FakeHandle):
        def options(self, **_: object) -> Both:
            return self

        @property
        def stream(self) -> Both:
            return self

        def remote(self, payload: Any, *args: Any) -> Any:  # type: ignore[override]
            if args:  # stream_to
                return super().remote(payload, *args)
            self.served += 1
            return Serve([START, DELTA], [LAST, END])

    class Serve:
        def __init__(self, *messages: list[dict[str, Any]]):
            self.messages = list(messages)

        async def __anext__(self) -> list[dict[str, Any]]:
            if not self.messages:
                raise StopAsyncIteration
            return self.messages.pop(0)

        def cancel(self) -> None:
            pass

    async def go() -> None:
        inbox = ch.Inbox(host="127.0.0.1")
        await inbox.start()
        address = inbox.address or ""
        inbox.close()  # nobody listens there any more
        client = rc.ReplicaClient(60, inbox=inbox)
        handle = Both(sends())
        handle.served = 0  # type: ignore[attr-defined]
        deadline = client.deadline()
        _, first = await client.open_stream(handle, {}, deadline, "student")  # type: ignore[arg-type]
        assert first == [START, DELTA] and handle.served == 1  # type: ignore[attr-defined]
        assert client.inbox is None and address

    asyncio.run(asyncio.wait_for(go(), 5))
    assert "inbox unreachable" in caplog.text


@pytest.mark.timeout(180)
def test_a_replica_writes_its_stream_to_the_inbox_through_serve(serve_urls):
    """The real replica (`ModelServer.stream_to`) through a Serve handle: events on the socket,
    the same text as its non-streamed answer; an address nobody listens on is `unreachable`."""
    from ray import serve

    from deployments.messages import job

    handle = serve.get_deployment_handle("student", app_name="main")
    params = {"max_tokens": 12, "temperature": 0.0, "stop": []}
    payload = job("Once upon a time", params)

    async def go(inbox: ch.Inbox) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
        events = await read_all(inbox.open(handle, payload))
        whole = await handle.generate.remote(payload)
        return events, whole

    async def main() -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
        inbox = ch.Inbox()  # this node's address, as the ingress's
        await inbox.start()
        try:
            return await asyncio.wait_for(go(inbox), 60)
        finally:
            inbox.close()

    messages, whole = asyncio.run(main())
    flat = [e for m in messages for e in m]
    assert flat[0]["event"] == "start" and flat[-1]["event"] == "end"
    text = "".join(e["text"] for e in flat if e["event"] == "delta")
    assert text == whole["choices"][0]["text"]
    assert flat[-1]["usage"]["completion_tokens"] == 12
    nobody = {"address": "127.0.0.1:9", "key": "k"}  # the discard port: nothing listens
    reply = handle.stream_to.remote(payload, nobody, "r").result(timeout_s=60)
    assert set(reply) == {"unreachable"}, reply
