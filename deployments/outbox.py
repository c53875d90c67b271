"""A model replica's end of the stream events channel (the ingress's end, the wire format and
the limits are deployments.channel's).

One connection per ingress inbox, shared by every stream from that ingress. `send` packs a
stream's event list at once, so data msgpack cannot pack, or one list over the message limit,
fails that stream's call only; `flush` writes, once per event-loop turn, every list queued in
that turn, as one or more messages under MAX_MESSAGE_BYTES, and always resolves what `drain`
waits on (with the error when the write failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

import msgpack

from deployments import channel
from deployments.channel import Event, tune_socket

log = logging.getLogger("ray.serve")


class Outbox:
    """A replica's connection to one ingress's inbox, shared by every request from it.

    `send` only queues; one write per event-loop turn carries all that was queued in it (the
    streams of one engine step wake together, so it is about one write per step).
    """

    def __init__(self, transport: asyncio.WriteTransport, protocol: _Writer, conn: str):
        self.transport = transport
        self.protocol = protocol
        self.conn = conn  # this connection's id: the inbox knows it, the call's reply names it
        self.pending: list[bytes] = []  # packed `[request id, events]` pairs
        self.flushed: asyncio.Future[None] | None = None  # set while a flush is scheduled
        self.packer = msgpack.Packer()

    @classmethod
    async def connect(cls, address: str, key: str) -> Outbox:
        """Connect and send the key; OSError (TimeoutError after CONNECT_TIMEOUT_S included)
        when the inbox cannot be reached."""
        host, port = address.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(channel.CONNECT_TIMEOUT_S):  # a firewall that drops packets
            transport, protocol = await loop.create_connection(_Writer, host.strip("[]"), int(port))
        tune_socket(transport.get_extra_info("socket"))
        conn = secrets.token_hex(8)
        transport.write(msgpack.packb([key, conn]))
        return cls(transport, protocol, conn)

    @property
    def broken(self) -> bool:
        return self.protocol.lost or self.transport.is_closing()

    def send(self, rid: str, events: list[Event]) -> None:
        """Queue one event list for request `rid`. Raises ConnectionError once the ingress is
        gone, and TypeError / ValueError for events that cannot be sent (the caller's
        generation then stops; the other streams on this connection go on)."""
        if self.broken:
            raise ConnectionError("the ingress's stream events inbox is gone")
        part = self.packer.pack([rid, events])
        if len(part) > channel.MAX_MESSAGE_BYTES:
            limit = channel.MAX_MESSAGE_BYTES
            raise ValueError(f"an event list of {len(part)} bytes is over {limit}")
        if self.flushed is None:
            loop = asyncio.get_running_loop()
            self.flushed = loop.create_future()
            self.flushed.add_done_callback(_retrieved)
            loop.call_soon(self.flush)
        self.pending.append(part)

    def flush(self) -> None:
        """Write what was queued (as messages under MAX_MESSAGE_BYTES) and resolve `flushed`:
        a write that fails closes the connection and sets its error there."""
        parts, self.pending = self.pending, []
        flushed, self.flushed = self.flushed, None
        try:
            if parts and not self.broken:
                self.transport.write(b"".join(self._messages(parts)))
        except Exception as exc:
            log.warning("stream events: a write to the ingress failed (%r)", exc)
            self.transport.abort()
            if flushed is not None:
                flushed.set_exception(ConnectionError(f"write to the inbox failed: {exc!r}"))
            return
        if flushed is not None:
            flushed.set_result(None)

    def _messages(self, parts: list[bytes]) -> list[bytes]:
        """`parts` as msgpack lists of pairs, each message under MAX_MESSAGE_BYTES."""
        out: list[bytes] = []
        group: list[bytes] = []
        size = 0
        for part in [*parts, b""]:
            if group and (not part or size + len(part) > channel.MAX_MESSAGE_BYTES - 16):
                out += [self.packer.pack_array_header(len(group)), *group]
                group, size = [], 0
            if part:
                group.append(part)
                size += len(part)
        return out

    async def drain(self) -> None:
        """Wait until what is queued is written (with the rest of this loop turn's events)
        and the socket has taken it."""
        if self.flushed is not None:
            await asyncio.shield(self.flushed)
        await self.protocol.drained()
        if self.broken:
            raise ConnectionError("the ingress's stream events inbox is gone")


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark a flush's error as seen: the streams that wait on it get it from `drain`."""
    if not future.cancelled():
        future.exception()


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
    """A replica's connections, one per ingress inbox, made on first use.

    Keyed by address and key: an ingress restarted on the same host and port has a new key,
    so its calls get a new connection, never the old one's socket (which may not have seen
    the old ingress go yet)."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[str, str], Outbox] = {}
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, target: dict[str, str]) -> Outbox:
        which = (target["address"], target["key"])
        box = self.boxes.get(which)
        if box is not None and not box.broken:
            return box
        lock = self.locks.setdefault(which, asyncio.Lock())
        async with lock:
            box = self.boxes.get(which)
            if box is None or box.broken:
                for gone in [w for w, b in self.boxes.items() if b.broken]:  # old ingresses
                    del self.boxes[gone]
                    if gone != which:
                        self.locks.pop(gone, None)
                box = self.boxes[which] = await Outbox.connect(*which)
        return box


async def send_all(
    box: Outbox, rid: str, messages: AsyncGenerator[list[Event], None]
) -> dict[str, Any]:
    """Send each event list of `messages` as request `rid`, then wait until the socket took
    them: the reply of `ModelServer.stream_to`, `{"sent", "conn"}`, with `"lost"` when the
    connection broke. The generator is closed on the way out, whatever ended it, so its
    batch slots are freed at once."""
    sent = 0
    try:
        async with contextlib.aclosing(messages):
            async for events in messages:
                box.send(rid, events)
                sent += 1
        await box.drain()
    except ConnectionError as exc:
        return {"lost": f"{exc}", "sent": sent, "conn": box.conn}
    return {"sent": sent, "conn": box.conn}
