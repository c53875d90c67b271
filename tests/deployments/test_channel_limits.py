"""The stream events channel's limits (deployments.channel, deployments.outbox) and the
ingress's per-variant fallback to Serve streaming (deployments.replica_client), on real local
sockets without Serve. The fakes are test_channel.py's."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgpack
import pytest
from test_channel import DELTA, END, LAST, START, FakeHandle, FakeResponse, Tally, run, sends

import deployments.channel as ch
import deployments.outbox as ob
import deployments.replica_client as rc


async def connect(inbox: ch.Inbox) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = (inbox.address or "").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the inbox closed this connection (EOF or a reset), within 2 s."""
    try:
        async with asyncio.timeout(2):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def until(predicate: Any, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@pytest.mark.timeout(20)
def test_a_connection_without_the_key_is_closed_and_delivers_nothing():
    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends(tail=asyncio.Event().wait)), {})  # type: ignore[arg-type]
        reader, writer = await connect(inbox)
        hello = msgpack.packb(["not the key", "c"])
        writer.write(hello + msgpack.packb([[stream.rid, [START]]]))
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
            await ob.Outbox.connect("192.0.2.1:9", "k")
        return loop.time() - t0

    assert asyncio.run(go()) < 2


@pytest.mark.timeout(20)
def test_a_connection_that_sends_no_key_is_closed(monkeypatch):
    monkeypatch.setattr(ch, "KEY_TIMEOUT_S", 0.1)

    async def go(inbox: ch.Inbox) -> None:
        reader, _ = await connect(inbox)
        assert await reader.read() == b""  # closed by the inbox after KEY_TIMEOUT_S
        assert not inbox.readers

    run(go)


@pytest.mark.timeout(20)
def test_a_keyless_connection_that_sends_more_than_the_key_limit_is_closed(monkeypatch):
    """The start of a 32 MiB msgpack value and no key: the inbox reads no more than a chunk
    past KEY_MAX_BYTES and closes the connection (long before the key's deadline)."""
    monkeypatch.setattr(ch, "KEY_TIMEOUT_S", 60)

    async def go(inbox: ch.Inbox) -> None:
        reader, writer = await connect(inbox)
        writer.write(b"\xc6" + (32 << 20).to_bytes(4, "big") + b"x" * (ch.KEY_MAX_BYTES + 1))
        assert await closed(reader)
        assert not inbox.readers and inbox.strangers == 0
        writer.close()

    run(go)


@pytest.mark.timeout(20)
def test_a_key_sent_in_pieces_is_read_once_whole():
    """A key sent in pieces (each under the limit) is read once whole; events sent in the same
    write as the key are delivered."""

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends(tail=asyncio.Event().wait)), {})  # type: ignore[arg-type]
        reader, writer = await connect(inbox)
        hello = msgpack.packb([inbox.key, "conn-1"])
        writer.write(hello[:10])
        await writer.drain()
        await until(lambda: any(r.head for r in inbox.readers), "the first piece")
        writer.write(hello[10:] + msgpack.packb([[stream.rid, [START, DELTA]]]))
        assert await stream.__anext__() == [START, DELTA]
        assert inbox.strangers == 0 and {r.conn for r in inbox.readers} >= {"conn-1"}
        stream.cancel()
        writer.close()

    run(go)


@pytest.mark.timeout(20)
def test_connections_without_a_key_are_capped(monkeypatch):
    """At most MAX_UNAUTHENTICATED wait for their key; one more is closed at once. A verified
    connection frees its slot."""
    monkeypatch.setattr(ch, "MAX_UNAUTHENTICATED", 3)
    monkeypatch.setattr(ch, "KEY_TIMEOUT_S", 60)

    async def go(inbox: ch.Inbox) -> None:
        held = [await connect(inbox) for _ in range(3)]
        await until(lambda: inbox.strangers == 3, "3 connections waiting for their key")
        extra, _ = await connect(inbox)
        assert await closed(extra)
        assert inbox.strangers == 3 and len(inbox.readers) == 3
        held[0][1].write(msgpack.packb([inbox.key, "c"]))
        await until(lambda: inbox.strangers == 2, "the key verified")
        another, _ = await connect(inbox)
        await until(lambda: inbox.strangers == 3, "a new connection let in")
        for _, writer in held:
            writer.close()

    run(go)


@pytest.mark.timeout(20)
def test_the_key_is_compared_in_constant_time(monkeypatch):
    import hmac

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(ch.hmac, "compare_digest", spy)

    async def go(inbox: ch.Inbox) -> None:
        stream = inbox.open(FakeHandle(sends([START, DELTA], [LAST, END])), {})  # type: ignore[arg-type]
        assert [m async for m in stream] == [[START, DELTA], [LAST, END]]
        reader, writer = await connect(inbox)
        writer.write(msgpack.packb(["f" * 32, "c"]))
        assert await closed(reader)
        writer.close()
        key = inbox.key.encode()
        assert compared == [(key, key), (b"f" * 32, key)]

    run(go)


@pytest.mark.timeout(20)
def test_big_writes_are_split_and_an_oversized_list_fails_its_stream_only(monkeypatch):
    monkeypatch.setattr(ch, "MAX_MESSAGE_BYTES", 400)
    messages: list[int] = []

    async def go(inbox: ch.Inbox) -> None:
        real = inbox.deliver
        inbox.deliver = lambda pairs, r: (messages.append(len(pairs)), real(pairs, r))  # type: ignore[method-assign]
        outboxes = ob.Outboxes()
        handles = [FakeHandle(sends([START, DELTA], [LAST, END]), outboxes) for _ in range(6)]
        streams = [inbox.open(h, {}) for h in handles]  # type: ignore[arg-type]
        huge = inbox.open(FakeHandle(sends([{**DELTA, "text": "x" * 500}]), outboxes), {})  # type: ignore[arg-type]
        for stream in streams:
            assert [m async for m in stream] == [[START, DELTA], [LAST, END]]
        with pytest.raises(ValueError, match="over 400"):
            await huge.__anext__()

    run(go)
    assert sum(messages) == 12 and len(messages) > 2  # 6 lists per turn, in several messages


def test_the_inbox_listens_where_the_front_is_reachable_from():
    assert ch.bind_host(None, "127.0.0.1", nodes=1) == "127.0.0.1"
    assert ch.bind_host(None, "localhost", nodes=1) == "127.0.0.1"
    assert ch.bind_host(None, "127.0.0.1", nodes=2) is None  # other nodes' replicas need it
    assert ch.bind_host(None, "0.0.0.0", nodes=1) is None  # this node's address
    assert ch.bind_host(None, None, nodes=0) is None  # unknown front: this node's address
    assert ch.bind_host("10.0.0.5", "127.0.0.1", nodes=1) == "10.0.0.5"  # the setting wins


@pytest.mark.timeout(20)
def test_a_wildcard_inbox_tells_replicas_this_node_s_address():
    async def main() -> str:
        inbox = ch.Inbox(host="0.0.0.0")
        try:
            return await inbox.start()
        finally:
            inbox.close()

    address = asyncio.run(main())
    assert not address.startswith("0.0.0.0") and address.rsplit(":", 1)[0] == ch.node_address()


class Both(FakeHandle):
    """A variant's handle: `stream_to` (the channel; `unreachable` while `blocked`) and
    `options(stream=True).stream` (Serve's streaming response)."""

    def __init__(self) -> None:
        super().__init__(sends([START, DELTA], [LAST, END]))
        self.blocked = False
        self.probes = 0  # stream_to calls
        self.served = 0  # Serve streaming calls

    def options(self, **_: object) -> Both:
        return self

    @property
    def stream(self) -> Both:
        return self

    def remote(self, payload: Any, *args: Any) -> Any:  # type: ignore[override]
        if not args:
            self.served += 1
            return ServeStream([START, DELTA], [LAST, END])
        self.probes += 1
        if self.blocked:

            async def unreachable() -> dict[str, Any]:
                return {"unreachable": "connection refused"}

            self.responses.append(FakeResponse(unreachable()))
            return self.responses[-1]
        return super().remote(payload, *args)


class ServeStream:
    def __init__(self, *messages: list[dict[str, Any]]):
        self.messages = list(messages)

    async def __anext__(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise StopAsyncIteration
        return self.messages.pop(0)

    def cancel(self) -> None:
        pass


@pytest.mark.timeout(20)
def test_an_unreachable_inbox_falls_back_to_serve_streaming(caplog):
    """A replica that cannot connect (nobody listens) generates nothing; the ingress sends
    that request again through Serve's streaming response at once, and the variant's next
    one too, without connecting."""

    async def go() -> None:
        inbox = ch.Inbox(host="127.0.0.1")
        await inbox.start()
        inbox.close()  # nobody listens there any more
        client = rc.ReplicaClient(60, inbox=inbox, fallbacks=Tally())
        handle = Both()
        for served in (1, 2):
            _, first = await client.open_stream(handle, {}, client.deadline(), "student")  # type: ignore[arg-type]
            assert first == [START, DELTA] and handle.served == served
        assert handle.probes == 1 and set(client.fallen_back) == {"student"}
        assert client.inbox is inbox and client.fallbacks.counts == {"student": 1}  # type: ignore[attr-defined]

    asyncio.run(asyncio.wait_for(go(), 5))
    assert "inbox unreachable for student" in caplog.text


@pytest.mark.timeout(20)
def test_a_variant_that_cannot_reach_the_inbox_falls_back_alone_and_probes_again(monkeypatch):
    """Variant a's replica cannot connect: a streams through Serve (that request at once),
    b keeps the channel; after the backoff a tries the inbox again, a failure doubles the
    wait, a success ends the fallback. Each fallback is counted."""
    monkeypatch.setattr(rc, "CHANNEL_RETRY_S", 0.05)

    async def go(inbox: ch.Inbox) -> None:
        client = rc.ReplicaClient(60, inbox=inbox, fallbacks=Tally())
        a, b = Both(), Both()
        a.blocked = True

        async def stream(handle: Both, model: str) -> None:
            gen, first = await client.open_stream(handle, {}, client.deadline(), model)  # type: ignore[arg-type]
            assert first == [START, DELTA]
            with contextlib.suppress(StopAsyncIteration):
                while True:
                    await gen.__anext__()

        await stream(a, "a")
        assert (a.probes, a.served) == (1, 1)  # tried the inbox, then Serve at once
        await stream(b, "b")
        await stream(a, "a")
        assert (a.probes, a.served, b.probes, b.served) == (1, 2, 1, 0)
        assert client.fallen_back["a"].wait_s == 0.05 and "b" not in client.fallen_back
        await asyncio.sleep(0.06)
        await stream(a, "a")  # probes again, fails again: the wait doubles
        assert (a.probes, a.served) == (2, 3) and client.fallen_back["a"].wait_s == 0.1
        a.blocked = False
        await asyncio.sleep(0.11)
        await stream(a, "a")  # probes again, and the inbox answers
        assert (a.probes, a.served) == (3, 3) and "a" not in client.fallen_back
        assert client.fallbacks.counts == {"a": 2}  # type: ignore[attr-defined]

    run(go)


@pytest.mark.timeout(20)
def test_the_fallback_wait_is_capped(monkeypatch):
    monkeypatch.setattr(rc, "CHANNEL_RETRY_S", 30.0)
    client = rc.ReplicaClient(60, inbox=ch.Inbox(), fallbacks=Tally())
    for _ in range(6):
        client._fall_back("a", ch.ChannelUnreachable("refused"))
    assert client.fallen_back["a"].wait_s == rc.CHANNEL_RETRY_MAX_S == 300.0
    assert not client.channel_for("a") and client.channel_for("b")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("host", "api_key", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)],
)
def test_the_ingress_warns_when_its_front_is_open_without_an_api_key(caplog, host, api_key, warned):
    from types import SimpleNamespace

    from deployments.ingress import Ingress
    from deployments.settings import IngressSettings

    async def front() -> tuple[str, int]:
        return host, 1

    ingress = SimpleNamespace(front=front, api_key=api_key, settings=IngressSettings())
    asyncio.run(Ingress.func_or_class._check_front(ingress))  # type: ignore[attr-defined]
    assert ("without an API key" in caplog.text) is warned
