"""The stream events channel (deployments.channel, deployments.outbox) on a real local socket,
without Serve: a fake handle's `stream_to` plays the replica (an Outbox writing to the Inbox)
and returns like a Serve call. Through Serve it is exercised by every streamed test of
test_ingress.py, by the replica-loss stream test of test_retry.py and by the last tests here.
The limits before the key and the per-variant fallback are in test_channel_limits.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import deployments.channel as ch
import deployments.outbox as ob
import deployments.replica_client as rc

START = {"event": "start", "prompt_tokens": 3}
DELTA = {"event": "delta", "index": 0, "text": "hi", "token_ids": [1], "finish_reason": None}
LAST = {"event": "delta", "index": 0, "text": "!", "token_ids": [2], "finish_reason": "length"}
END = {"event": "end", "usage": {}, "timings": {}}
Replica = Callable[[ob.Outbox, str], Awaitable[dict[str, Any]]]


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

    def __init__(self, replica: Replica, outboxes: ob.Outboxes | None = None):
        self.replica = replica
        self.outboxes = outboxes or ob.Outboxes()
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
    """A replica that sends `messages` one loop turn apart as `ModelServer.stream_to` does
    (`outbox.send_all`), then awaits `tail` before it returns."""

    async def replica(box: ob.Outbox, rid: str) -> dict[str, Any]:
        async def lists():
            for events in messages:
                yield events
                await asyncio.sleep(0)

        reply = await ob.send_all(box, rid, lists())
        if tail is not None:
            await tail()
        return reply

    return replica


class Tally:
    """A Prometheus counter's `inc`, recorded."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        model = (tags or {})["model"]
        self.counts[model] = self.counts.get(model, 0) + value


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
        assert stream.call.done() and not inbox.streams  # the call returned; nothing kept

    run(go)


@pytest.mark.timeout(20)
def test_one_write_per_loop_turn_carries_every_request_s_events():
    """Sixteen streams that each send in the same loop turn reach the inbox as ONE message."""
    got: list[int] = []

    async def go(inbox: ch.Inbox) -> None:
        real = inbox.deliver
        inbox.deliver = lambda pairs, reader: (got.append(len(pairs)), real(pairs, reader))  # type: ignore[method-assign]
        outboxes = ob.Outboxes()
        await outboxes.get({"address": inbox.address or "", "key": inbox.key})  # connected
        steps = [asyncio.Event(), asyncio.Event()]

        async def replica(box: ob.Outbox, rid: str) -> dict[str, Any]:
            await steps[0].wait()  # all sixteen wake in one loop turn, like one engine step
            box.send(rid, [START, DELTA])
            await steps[1].wait()
            box.send(rid, [LAST, END])
            await box.drain()
            return {"sent": 2, "conn": box.conn}

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

    async def replica(box: ob.Outbox, rid: str) -> dict[str, Any]:
        reply = await sends([START, DELTA])(box, rid)
        return {**reply, "sent": 2}  # the second list is still on its way

    async def go(inbox: ch.Inbox) -> None:
        handle = FakeHandle(replica)
        stream = inbox.open(handle, {})  # type: ignore[arg-type]
        first = await stream.__anext__()
        await stream.call  # returned; `end` has not been written yet
        box = await handle.outboxes.get({"address": inbox.address or "", "key": inbox.key})
        asyncio.get_running_loop().call_later(0.1, box.send, stream.rid, [LAST, END])
        assert [first, *(await read_all(stream))] == [[START, DELTA], [LAST, END]]

    run(go)


@pytest.mark.timeout(20)
def test_events_that_never_come_end_the_stream_after_the_grace_kept_across_calls(monkeypatch):
    """The reply says 3 lists were written on a connection that is still open: the stream
    waits END_GRACE_S for the missing ones, one grace for all of them (a list that arrives
    late does not start it again), then fails with ChannelLost."""
    monkeypatch.setattr(ch, "END_GRACE_S", 0.3)

    async def replica(box: ob.Outbox, rid: str) -> dict[str, Any]:
        return {**(await sends([START, DELTA])(box, rid)), "sent": 3}

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(replica), {})  # type: ignore[arg-type]
        assert await stream.__anext__() == [START, DELTA]
        await stream.call
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, inbox.deliver, [[stream.rid, [DELTA]]], None)
        t0 = loop.time()
        assert await stream.__anext__() == [DELTA]  # within the grace
        with pytest.raises(ch.ChannelLost, match="never arrived"):
            await stream.__anext__()
        assert loop.time() - t0 < 0.3 + 0.15  # the same grace, not a second one
        assert not inbox.streams

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
        assert handle.responses[0].cancelled and not inbox.streams
        inbox.deliver([[stream.rid, [LAST]]])  # a late message for it: dropped, no error

    run(go)


@pytest.mark.timeout(20)
def test_a_replica_whose_ingress_is_gone_fails_its_next_send():
    async def go(inbox: ch.Inbox) -> None:
        outboxes = ob.Outboxes()
        box = await outboxes.get({"address": inbox.address or "", "key": inbox.key})
        inbox.close()  # stops listening and drops the replicas' connections
        with pytest.raises(ConnectionError):
            for _ in range(100):  # the loss is seen once the close reaches this end
                box.send("r", [DELTA])
                await asyncio.sleep(0.01)

    run(go)


async def until(predicate: Callable[[], object], what: str) -> None:
    """Wait (a loop turn at a time, at most 2 s) until `predicate()` holds."""
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@pytest.mark.timeout(20)
def test_an_event_that_cannot_be_sent_fails_its_stream_only():
    """Data msgpack cannot pack fails that stream's call; the other stream on the same
    connection, and the connection, go on."""
    bad = {"event": "delta", "index": 0, "text": object()}

    async def go(inbox: ch.Inbox) -> None:
        outboxes = ob.Outboxes()
        broken = inbox.open(FakeHandle(sends([START, DELTA], [bad]), outboxes), {})  # type: ignore[arg-type]
        fine = inbox.open(FakeHandle(sends([START, DELTA], [LAST, END]), outboxes), {})  # type: ignore[arg-type]
        assert await broken.__anext__() == [START, DELTA]
        with pytest.raises(TypeError):
            await broken.__anext__()
        assert await read_all(fine) == [[START, DELTA], [LAST, END]]
        assert len(outboxes.boxes) == 1 and not next(iter(outboxes.boxes.values())).broken
        assert len(inbox.readers) == 1

    run(go)


@pytest.mark.timeout(20)
def test_a_failed_write_resolves_every_waiter_and_the_next_stream_reconnects():
    async def go(inbox: ch.Inbox) -> None:
        outboxes = ob.Outboxes()
        box = await outboxes.get(inbox.target)

        def refuse(_: bytes) -> None:
            raise RuntimeError("the socket refuses")

        box.transport.write = refuse  # type: ignore[method-assign]
        box.send("r1", [DELTA])
        box.send("r2", [DELTA])
        waits = await asyncio.gather(box.drain(), box.drain(), return_exceptions=True)
        assert all(isinstance(w, ConnectionError) for w in waits), waits
        assert box.broken
        stream = inbox.open(FakeHandle(sends([START, DELTA], [LAST, END]), outboxes), {})  # type: ignore[arg-type]
        assert await read_all(stream) == [[START, DELTA], [LAST, END]]
        assert outboxes.boxes[(inbox.address or "", inbox.key)] is not box

    run(go)


@pytest.mark.timeout(20)
def test_the_reply_s_count_ends_a_stream_at_once(monkeypatch):
    """With a grace far longer than the test may run: every list the reply counts arrived ->
    the stream ends at once, `end` or not; lists missing on a connection that was lost ->
    ChannelLost at once."""
    monkeypatch.setattr(ch, "END_GRACE_S", 60)

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends([START, DELTA])), {})  # type: ignore[arg-type]
        assert await read_all(stream) == [[START, DELTA]]

        cut = asyncio.Event()

        async def lost_on_the_way(box: ob.Outbox, rid: str) -> dict[str, Any]:
            await cut.wait()
            return {"sent": 1, "conn": box.conn}  # written, but the connection then went

        stream = inbox.open(FakeHandle(lost_on_the_way), {})  # type: ignore[arg-type]
        await until(lambda: sum(r.trusted for r in inbox.readers) == 2, "its own connection")
        assert inbox.cut() == 2  # the first stream's (its own handle's) and this one's
        await until(lambda: inbox.lost, "the connection's loss")
        cut.set()
        with pytest.raises(ch.ChannelLost, match="lost with the connection"):
            await stream.__anext__()

    run(go)


@pytest.mark.timeout(20)
def test_an_ingress_restarted_on_the_same_port_gets_a_new_connection():
    """Connections are keyed by address and key: a new inbox on the old one's host and port,
    while the old connection still looks open to the replica, gets its events."""

    async def main() -> None:
        old = ch.Inbox(host="127.0.0.1")
        await old.start()
        outboxes = ob.Outboxes()
        stale = await outboxes.get(old.target)
        assert old._server is not None
        old._server.close()  # stops listening; the replica's connection stays up
        port = int((old.address or "").rsplit(":", 1)[1])
        new = ch.Inbox(host="127.0.0.1", port=port)
        await new.start()
        try:
            assert new.address == old.address and new.key != old.key
            stream = new.open(FakeHandle(sends([START, DELTA], [LAST, END]), outboxes), {})  # type: ignore[arg-type]
            assert await read_all(stream) == [[START, DELTA], [LAST, END]]
            assert not stale.broken and len(outboxes.boxes) == 2
        finally:
            new.close()
            old.close()

    asyncio.run(asyncio.wait_for(main(), 5))


@pytest.mark.timeout(20)
def test_a_cut_connection_retries_streams_without_a_frame_and_ends_the_others():
    """The ingress drops the replica's connection under two streams: the one that had sent
    its first frame ends with the 503 error event and `[DONE]`; the one that had sent only
    `start` is sent again, on a new connection, and the client sees one clean stream."""
    import json

    from deployments.serving import sse
    from deployments.sse import ChunkFormatter

    gate = asyncio.Event()

    def replica(*before: list[dict[str, Any]]) -> Replica:
        async def run_it(box: ob.Outbox, rid: str) -> dict[str, Any]:
            async def lists():
                for events in before:
                    yield events
                await gate.wait()
                yield [DELTA]
                yield [LAST, END]

            return await ob.send_all(box, rid, lists())

        return run_it

    async def body(client: rc.ReplicaClient, gen: Any, first: Any) -> list[Any]:
        fmt = ChunkFormatter("completion", "cmpl-1", "student", 1, False)
        chunks = [c async for c in sse(client, gen, first, fmt, client.deadline())]
        frames = [f.removeprefix("data: ") for c in chunks for f in c.split("\n\n") if f]
        return [f if f == "[DONE]" else json.loads(f) for f in frames]

    async def go(inbox: ch.Inbox) -> None:
        client = rc.ReplicaClient(60, inbox=inbox, fallbacks=Tally())
        outboxes = ob.Outboxes()
        framed = FakeHandle(replica([START, DELTA]), outboxes)
        quiet = FakeHandle(replica([START]), outboxes)
        gen, first = await client.open_stream(framed, {}, client.deadline(), "student")  # type: ignore[arg-type]
        opening = asyncio.ensure_future(
            client.open_stream(quiet, {}, client.deadline(), "student")  # type: ignore[arg-type]
        )
        await until(lambda: sum(s.received for s in inbox.streams.values()) == 2, "2 lists")
        assert inbox.cut() == 1
        gate.set()
        again, again_first = await opening
        assert len(quiet.responses) == 2 and again_first == [START, DELTA]  # sent again
        cut_short, whole = await body(client, gen, first), await body(client, again, again_first)
        assert [f["choices"][0]["text"] for f in whole[:-1]] == ["hi", "!"]
        assert whole[-1] == "[DONE]"
        assert cut_short[0]["choices"][0]["text"] == "hi" and cut_short[-1] == "[DONE]"
        assert (
            cut_short[1]["error"]["code"] == 503
            and "connection" in cut_short[1]["error"]["message"]
        )
        assert len(cut_short) == 3 and len(outboxes.boxes) == 1

    run(go)


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


@pytest.mark.timeout(180)
def test_the_ingress_hooks_show_and_cut_its_inbox_connections(serve_urls):
    """Through Serve: the ingress's inbox listens on loopback (the HTTP front is on loopback,
    one node); `cut_stream_connections` drops the replicas' connections and the next stream
    connects again."""
    import httpx
    from ray import serve

    from deployments.settings import INGRESS_NAME

    ingress = serve.get_deployment_handle(INGRESS_NAME, app_name="main")
    body = {"model": "student", "prompt": "Once", "max_tokens": 8, "stream": True}

    def stream() -> list[str]:
        url = f"{serve_urls.main}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            assert r.status_code == 200
            return [ln for ln in r.iter_lines() if ln.startswith("data:")]

    assert stream()[-1] == "data: [DONE]"
    address = ingress.stream_inbox_address.remote().result(timeout_s=30)
    assert address is not None and address.startswith("127.0.0.1:"), address
    assert ingress.cut_stream_connections.remote().result(timeout_s=30) >= 1
    again = stream()
    assert again[-1] == "data: [DONE]" and not any('"error"' in f for f in again), again
