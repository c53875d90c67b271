"""Streamed events from the model replicas to the ingress over one socket per replica.

A streamed request is one ordinary Serve call (`ModelServer.stream_to`): Serve still picks the
replica, enforces `max_ongoing_requests` and the queue limit, cancels the work when the ingress
cancels the call, and raises RayActorError when the replica dies, exactly as for a non-streamed
call. Only the events travel another way. Sent back as the items of a Serve streaming response,
each message costs both processes a gRPC round of its own (about 0.9 ms of CPU on a 2-core
machine; reports/profile_serving.md), so streaming cost a third more CPU per token than a
non-streamed answer. Here the replica writes them to a TCP connection the ingress listens on
(its `Inbox`), and one write per event-loop turn carries the events of every stream that turn
produced, for every request from that ingress: at 16 streams, about one write per engine step
instead of one message per stream. This is how vLLM's engine core hands its API server one
batch of outputs per step.

Wire format: msgpack. The replica's first message is the inbox's key (a random token the
ingress hands out with each call, so only processes that received a call through Ray can
write events); after it, every message is a list of `[request id, [event, ...]]` pairs, each
event list being one message of deployments.model's `stream` (so the SSE frames are the same).
A connection whose first message is not the key, or that sends none within KEY_TIMEOUT_S, is
closed. Events are plain dicts, and msgpack decodes data only, never code.

Failure handling: the ingress learns that a replica died from the Serve call (RayActorError),
not from the socket, so replica loss is retried or reported by deployments.replica_client as
before. A replica that cannot reach the inbox answers `{"unreachable": reason}` without
generating; the ingress then streams through Serve's own responses from then on (logged once).
An ingress that goes away makes the replica's next write fail, which ends the call and frees
its batch slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import weakref
from collections.abc import Iterable
from typing import Any

import msgpack
from ray.serve.handle import DeploymentHandle, DeploymentResponse

log = logging.getLogger("ray.serve")
Event = dict[str, Any]

END_GRACE_S = 10.0
"""How long the ingress waits, after a replica's call returned, for the stream's last events
(they were written before it returned, but travel on the socket, not with the reply)."""
CONNECT_TIMEOUT_S = 5.0
"""A replica that cannot connect to the inbox within this answers `unreachable`."""
KEY_TIMEOUT_S = 10.0
"""A connection that has not sent the inbox's key by then is closed."""
CALL_DONE = object()  # queued when the Serve call returns or fails


class ChannelUnreachable(Exception):
    """The replica could not connect to this ingress's inbox (nothing was generated)."""


class Inbox:
    """The ingress's listening socket; hands each request the event lists sent for it."""

    def __init__(self, host: str | None = None):
        self.host = host
        self.key = secrets.token_hex(16)
        self.address: str | None = None  # "host:port" once listening
        self.target: dict[str, str] = {}  # what a replica needs to connect, once listening
        self.queues: weakref.WeakValueDictionary[str, asyncio.Queue[Any]] = (
            weakref.WeakValueDictionary()
        )
        self.readers: set[_Reader] = set()  # open connections from replicas
        self._server: asyncio.Server | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> str:
        """Listen (once) on this node's address, on a free port; returns "host:port"."""
        if self.address is not None:
            return self.address
        async with self._starting:
            if self.address is None:
                host = self.host or node_address()
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(lambda: _Reader(self), host, 0)
                port = self._server.sockets[0].getsockname()[1]
                self.address = f"{host}:{port}"
                self.target = {"address": self.address, "key": self.key}
                log.info("stream events inbox listening on %s", self.address)
        return self.address

    def open(self, handle: DeploymentHandle, payload: dict[str, Any]) -> ChannelStream:
        """Start one streamed call whose events come to this inbox (after `start`)."""
        assert self.address is not None, "Inbox.start() first"
        rid = secrets.token_hex(8)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[rid] = queue
        response = handle.stream_to.remote(payload, self.target, rid)
        return ChannelStream(self, rid, queue, response)

    def deliver(self, pairs: Iterable[Any]) -> None:
        """Hand each `[request id, events]` pair to its request (gone requests: dropped)."""
        for rid, events in pairs:
            queue = self.queues.get(rid)
            if queue is not None:
                queue.put_nowait(events)

    def close(self) -> None:
        """Stop listening and drop every replica's connection."""
        if self._server is not None:
            self._server.close()
        for reader in list(self.readers):
            reader.close()


class _Reader(asyncio.Protocol):
    """One replica's connection to the inbox: checks the key, then delivers every message."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
        self.trusted = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inbox.readers.add(self)
        asyncio.get_running_loop().call_later(KEY_TIMEOUT_S, self._key_overdue)

    def _key_overdue(self) -> None:
        if not self.trusted:
            log.warning("stream events inbox: dropping a connection that sent no key")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbox.readers.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        try:
            for message in self.unpacker:
                if self.trusted:
                    self.inbox.deliver(message)
                elif message == self.inbox.key:
                    self.trusted = True
                else:
                    raise ValueError("wrong key")
        except Exception as exc:  # a stranger, or a message not in the format
            log.warning("stream events inbox: dropping a connection (%s)", exc)
            self.close()


class ChannelStream:
    """One streamed request over the inbox, shaped like Serve's streaming response for
    deployments.serving: `__anext__` gives the replica's event lists in order, then raises
    StopAsyncIteration once the call has returned; `cancel()` cancels the call."""

    def __init__(
        self, inbox: Inbox, rid: str, queue: asyncio.Queue[Any], response: DeploymentResponse
    ):
        self.inbox = inbox
        self.rid = rid
        self.queue = queue
        self.response = response
        self.call: asyncio.Future[Any] = asyncio.ensure_future(_result(response))
        self.call.add_done_callback(lambda _: queue.put_nowait(CALL_DONE))
        self.ended = False  # the `end` (or an `error`) event was handed out

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> list[Event]:
        if self.ended:  # everything was handed out: wait for the call to return
            await self.call
            self._forget()
            raise StopAsyncIteration
        grace_until: float | None = None  # set once the call has returned
        while True:
            if grace_until is None:
                item = await self.queue.get()
            else:
                try:
                    async with asyncio.timeout_at(grace_until):
                        item = await self.queue.get()
                except TimeoutError:
                    self._forget()
                    raise ConnectionError("the stream's last events never arrived") from None
            if item is not CALL_DONE:
                self.ended = any(e["event"] in ("end", "error") for e in item)
                return item
            result = self.call.result()  # raises what the call raised (a lost replica)
            if "unreachable" in result:
                self._forget()
                raise ChannelUnreachable(result["unreachable"])
            # The call returned after writing every event: the rest are still on the socket.
            grace_until = asyncio.get_running_loop().time() + END_GRACE_S

    def cancel(self) -> None:
        """Stop the replica's generation (best effort) and drop the events still coming."""
        self._forget()
        self.call.cancel()
        with contextlib.suppress(Exception):  # Serve re-raises a call that never started
            self.response.cancel()

    def _forget(self) -> None:
        self.inbox.queues.pop(self.rid, None)


async def _result(response: DeploymentResponse) -> Any:
    return await response


class Outbox:
    """A replica's connection to one ingress's inbox, shared by every request from it.

    `send` only queues; one write per event-loop turn carries all that was queued in it (the
    streams of one engine step wake together, so it is about one write per step).
    """

    def __init__(self, transport: asyncio.WriteTransport, protocol: _Writer):
        self.transport = transport
        self.protocol = protocol
        self.pending: list[list[Any]] = []
        self.flushed: asyncio.Future[None] | None = None  # set while a flush is scheduled
        self.packer = msgpack.Packer()

    @classmethod
    async def connect(cls, address: str, key: str) -> Outbox:
        """Connect and send the key; OSError (TimeoutError after CONNECT_TIMEOUT_S included)
        when the inbox cannot be reached."""
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):  # a firewall that drops packets
            transport, protocol = await loop.create_connection(_Writer, host, int(port))
        transport.write(msgpack.packb(key))
        return cls(transport, protocol)

    @property
    def broken(self) -> bool:
        return self.protocol.lost or self.transport.is_closing()

    def send(self, rid: str, events: list[Event]) -> None:
        """Queue one event list for request `rid`; raises ConnectionError once the ingress is
        gone (the caller's generation then stops)."""
        if self.broken:
            raise ConnectionError("the ingress's stream events inbox is gone")
        if self.flushed is None:
            loop = asyncio.get_running_loop()
            self.flushed = loop.create_future()
            loop.call_soon(self.flush)
        self.pending.append([rid, events])

    def flush(self) -> None:
        if self.pending and not self.broken:
            self.transport.write(self.packer.pack(self.pending))
        self.pending = []
        if self.flushed is not None:
            self.flushed.set_result(None)
            self.flushed = None

    async def drain(self) -> None:
        """Wait until what is queued is written (with the rest of this loop turn's events)
        and the socket has taken it."""
        if self.flushed is not None:
            await asyncio.shield(self.flushed)
        await self.protocol.drained()
        if self.broken:
            raise ConnectionError("the ingress's stream events inbox is gone")


class _Writer(asyncio.Protocol):
    """The replica's end: nothing is read; tracks loss and write pressure."""

    def __init__(self) -> None:
        self.lost = False
        self._resumed: asyncio.Event | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._resumed is not None:
            self._resumed.set()

    def pause_writing(self) -> None:
        self._resumed = asyncio.Event()

    def resume_writing(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    async def drained(self) -> None:
        while self._resumed is not None and not self.lost:
            await self._resumed.wait()


class Outboxes:
    """A replica's connections, one per ingress inbox address, made on first use."""

    def __init__(self) -> None:
        self.boxes: dict[str, Outbox] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def get(self, target: dict[str, str]) -> Outbox:
        address = target["address"]
        box = self.boxes.get(address)
        if box is not None and not box.broken:
            return box
        lock = self.locks.setdefault(address, asyncio.Lock())
        async with lock:
            box = self.boxes.get(address)
            if box is None or box.broken:
                for gone in [a for a, b in self.boxes.items() if b.broken]:  # old ingresses
                    del self.boxes[gone]
                box = self.boxes[address] = await Outbox.connect(address, target["key"])
        return box


def node_address() -> str:
    """This node's address as Ray knows it (reachable by the other nodes' replicas)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # no Ray here (tests of the channel alone)
        return socket.gethostbyname("localhost")
