"""Streamed events from the model replicas to the ingress over one socket per replica.

A streamed request is one ordinary Serve call (`ModelServer.stream_to`): Serve still picks the
replica, enforces `max_ongoing_requests` and the queue limit, cancels the work when the ingress
cancels the call, and raises RayActorError when the replica dies, exactly as for a non-streamed
call. Only the events travel another way. Sent back as the items of a Serve streaming response,
each message costs both processes a gRPC round of its own (about 0.9 ms of CPU on a 2-core
machine; reports/profile_serving.md), so streaming cost a third more CPU per token than a
non-streamed answer. Here the replica writes them to a TCP connection the ingress listens on
(its `Inbox`; the replica's end is deployments.outbox), and one write per event-loop turn
carries the events of every stream that turn produced, for every request from that ingress: at
16 streams, about one write per engine step instead of one message per stream. This is how
vLLM's engine core hands its API server one batch of outputs per step.

Wire format: msgpack. The replica's first message is `[key, connection id]`: the inbox's key
(a random token the ingress hands out with each call, so only processes that received a call
through Ray can write events) and a random id of this connection. After it, every message is
a list of `[request id, [event, ...]]` pairs, each event list being one message of
deployments.model's `stream` (so the SSE frames are the same). Events are plain dicts, and
msgpack decodes data only, never code.

Before the key is verified a connection costs the ingress almost nothing: at most
KEY_MAX_BYTES are read (the key message is about 60 bytes), within KEY_TIMEOUT_S, at most
MAX_UNAUTHENTICATED such connections at once (more are closed at once), and the key is compared
in constant time. Only a verified connection gets the unpacker that buffers up to
MAX_BUFFER_BYTES. The channel is meant for a trusted cluster network all the same (anyone who
can reach the port can hold those unauthenticated slots); `args.ingress.stream_channel: false`
turns it off.

Failure handling. The ingress learns that a replica died from the Serve call (RayActorError),
not from the socket. The call's reply says how many event lists the replica wrote and on which
connection, so the ingress knows at once whether some are still missing. A connection that is
lost (a reset, a bad frame, `Inbox.cut`, keepalive or TCP_USER_TIMEOUT giving up on a peer
that is gone) fails the streams it carried, and only those, with ChannelLost: retried like a
lost replica before the stream's first SSE frame (deployments.replica_client), an error event
and `[DONE]` after it (deployments.serving). A replica that cannot reach the inbox answers
`{"unreachable": reason}` without generating; the ingress then streams that variant through
Serve's own responses for a while and tries the socket again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack
from ray.serve.handle import DeploymentHandle, DeploymentResponse

log = logging.getLogger("ray.serve")
Event = dict[str, Any]

END_GRACE_S = 10.0
"""How long the ingress waits, after a replica's call returned, for event lists the reply says
were written but that have not arrived yet on a connection that is still open."""
CONNECT_TIMEOUT_S = 2.0
"""A replica that cannot connect to the inbox within this answers `unreachable`. A connect
inside a cluster takes well under a millisecond; 2 s leaves room for one lost SYN (resent
after 1 s) and bounds what the request that found the inbox unreachable waits."""
KEY_TIMEOUT_S = 2.0
"""A connection that has not sent the inbox's key by then is closed."""
KEY_MAX_BYTES = 256
"""A connection whose first KEY_MAX_BYTES bytes do not hold the key message is closed."""
MAX_UNAUTHENTICATED = 64
"""Connections that have not sent the key yet, at most; one more is closed at once."""
MAX_MESSAGE_BYTES = 16 << 20
"""The largest message a replica writes (deployments.outbox splits bigger writes, and fails
the one stream whose single event list would exceed it)."""
MAX_BUFFER_BYTES = 2 * MAX_MESSAGE_BYTES + (1 << 20)
"""What a verified connection's unpacker may hold: one whole message and the next read."""
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
"""TCP keepalive on both ends: a silent connection is probed after 5 s, then every 2 s, and
dropped after 3 unanswered probes (a peer gone without a word is seen in about 11 s)."""
USER_TIMEOUT_S = 10
"""TCP_USER_TIMEOUT (Linux) on both ends: data left unacknowledged this long drops the
connection, so a replica writing to an ingress that vanished fails in 10 s, not in minutes."""
RECENT_LOST = 4096  # connection ids remembered after their loss
CALL_DONE = object()  # queued when the Serve call returns or fails
LOST = object()  # queued when the connection that carried the stream is lost


class ChannelUnreachable(Exception):
    """The replica could not connect to this ingress's inbox (nothing was generated)."""


class ChannelLost(ConnectionError):
    """The connection that carried a stream's events was lost, or some of its events never
    arrived: safe to send again before the stream's first SSE frame."""


def tune_socket(sock: socket.socket | None) -> None:
    """Keepalive and TCP_USER_TIMEOUT on one end of a channel connection (where supported)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = [
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_S * 1000),  # milliseconds
    ]
    for name, value in options:
        option = getattr(socket, name, None)  # Linux has all four; others some
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


class Inbox:
    """The ingress's listening socket; hands each request the event lists sent for it.

    `host`: where to listen; else `locate()` says (once, when it starts); else this node's
    address. A wildcard host ("0.0.0.0") listens everywhere and tells replicas this node's
    address.
    """

    def __init__(
        self,
        host: str | None = None,
        locate: Callable[[], Awaitable[str | None]] | None = None,
        port: int = 0,
    ):
        self.host = host
        self.locate = locate
        self.port = port
        self.key = secrets.token_hex(16)
        self.address: str | None = None  # "host:port" once listening
        self.target: dict[str, str] = {}  # what a replica needs to connect, once listening
        self.streams: weakref.WeakValueDictionary[str, ChannelStream] = (
            weakref.WeakValueDictionary()
        )
        self.readers: set[_Reader] = set()  # open connections from replicas
        self.strangers = 0  # of them, those that have not sent the key yet
        self.lost: dict[str, None] = {}  # ids of recently lost connections (oldest first)
        self._server: asyncio.Server | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> str:
        """Listen (once) on a free port; returns the "host:port" replicas connect to."""
        if self.address is not None:
            return self.address
        async with self._starting:
            if self.address is None:
                host = self.host or (await self.locate() if self.locate else None)
                host = host or node_address()
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(lambda: _Reader(self), host, self.port)
                port = self._server.sockets[0].getsockname()[1]
                shown = node_address() if host in ("0.0.0.0", "::") else host
                self.address = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
                self.target = {"address": self.address, "key": self.key}
                log.info("stream events inbox listening on %s (bound to %s)", self.address, host)
        return self.address

    def open(self, handle: DeploymentHandle, payload: dict[str, Any]) -> ChannelStream:
        """Start one streamed call whose events come to this inbox (after `start`)."""
        assert self.address is not None, "Inbox.start() first"
        rid = secrets.token_hex(8)
        response = handle.stream_to.remote(payload, self.target, rid)
        stream = ChannelStream(self, rid, response)
        self.streams[rid] = stream
        return stream

    def deliver(self, pairs: Iterable[Any], reader: _Reader | None = None) -> None:
        """Hand each `[request id, events]` pair to its request (gone requests: dropped)."""
        for rid, events in pairs:
            stream = self.streams.get(rid)
            if stream is not None:
                stream.push(events, reader)

    def connection_lost(self, reader: _Reader) -> None:
        """A replica's connection closed: the streams it carried get no more events."""
        self.readers.discard(reader)
        if reader.conn is None:
            return
        self.lost[reader.conn] = None
        while len(self.lost) > RECENT_LOST:
            del self.lost[next(iter(self.lost))]
        for stream in list(self.streams.values()):
            if stream.reader is reader:
                stream.queue.put_nowait(LOST)

    def cut(self) -> int:
        """Close every replica's connection from this end (the replicas connect again on
        their next call); returns how many were open."""
        readers = list(self.readers)
        for reader in readers:
            reader.close()
        return len(readers)

    def close(self) -> None:
        """Stop listening and drop every replica's connection."""
        if self._server is not None:
            self._server.close()
        self.cut()


class _Reader(asyncio.Protocol):
    """One replica's connection to the inbox: checks the key, then delivers every message."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.head = bytearray()  # what came before the key was verified (< KEY_MAX_BYTES kept)
        self.unpacker: msgpack.Unpacker | None = None  # made once the key is verified
        self.conn: str | None = None  # the connection's id, from its key message
        self.transport: asyncio.Transport | None = None
        self._overdue: asyncio.TimerHandle | None = None

    @property
    def trusted(self) -> bool:
        return self.unpacker is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.inbox.strangers >= MAX_UNAUTHENTICATED:
            log.warning("stream events inbox: too many connections without a key; closing one")
            transport.abort()  # type: ignore[attr-defined]
            return
        self.inbox.strangers += 1
        self.inbox.readers.add(self)
        tune_socket(transport.get_extra_info("socket"))
        loop = asyncio.get_running_loop()
        self._overdue = loop.call_later(KEY_TIMEOUT_S, self._drop, "it sent no key in time")

    def connection_lost(self, exc: Exception | None) -> None:
        if self not in self.inbox.readers:
            return  # refused at once, or already counted
        if not self.trusted:
            self.inbox.strangers -= 1
        if self._overdue is not None:
            self._overdue.cancel()
        self.inbox.connection_lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _drop(self, why: str) -> None:
        log.warning("stream events inbox: dropping a connection (%s)", why)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.unpacker is None:
            data = self._verify(data)
            if self.unpacker is None or not data:
                return
        try:
            self.unpacker.feed(data)
            for message in self.unpacker:
                self.inbox.deliver(message, self)
        except Exception as exc:  # a message not in the format, or too big
            self._drop(repr(exc))

    def _verify(self, data: bytes) -> bytes:
        """Read the key message from the first KEY_MAX_BYTES; returns what follows it (once
        verified), or b"" while it is incomplete or after dropping the connection."""
        self.head += data
        reader = msgpack.Unpacker(raw=False, max_buffer_size=KEY_MAX_BYTES)
        reader.feed(bytes(self.head[:KEY_MAX_BYTES]))
        try:
            hello = reader.unpack()
        except msgpack.OutOfData:
            if len(self.head) >= KEY_MAX_BYTES:
                self._drop(f"no key in its first {KEY_MAX_BYTES} bytes")
            else:
                self.head = self.head[:KEY_MAX_BYTES]
            return b""
        except Exception as exc:
            self._drop(f"bad key message: {exc!r}")
            return b""
        if not (
            isinstance(hello, list)
            and len(hello) == 2
            and all(isinstance(part, str) for part in hello)
            and hmac.compare_digest(hello[0].encode(), self.inbox.key.encode())
        ):
            self._drop("wrong key")
            return b""
        rest = bytes(self.head[reader.tell() :])
        self.head = bytearray()
        self.conn = hello[1]
        self.inbox.strangers -= 1
        if self._overdue is not None:
            self._overdue.cancel()
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_BUFFER_BYTES)
        return rest


class ChannelStream:
    """One streamed request over the inbox, shaped like Serve's streaming response for
    deployments.serving: `__anext__` gives the replica's event lists in order, then raises
    StopAsyncIteration once the call has returned; `cancel()` cancels the call."""

    def __init__(self, inbox: Inbox, rid: str, response: DeploymentResponse):
        self.inbox = inbox
        self.rid = rid
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.response = response
        self.reader: _Reader | None = None  # the connection its events came on
        self.received = 0  # event lists delivered
        self.call: asyncio.Future[Any] = asyncio.ensure_future(_result(response))
        self.call.add_done_callback(lambda _: self.queue.put_nowait(CALL_DONE))
        self.ended = False  # the `end` (or an `error`) event was handed out
        self.grace_until: float | None = None  # set once the call returned with lists missing

    def push(self, events: list[Event], reader: _Reader | None) -> None:
        self.reader = reader
        self.received += 1
        self.queue.put_nowait(events)

    def __aiter__(self) -> ChannelStream:
        return self

    async def __anext__(self) -> list[Event]:
        if self.ended:  # everything was handed out: wait for the call to return
            await self.call
            self._forget()
            raise StopAsyncIteration
        while True:
            item = await self._next()
            if item is LOST:
                self._forget()
                raise ChannelLost("the connection carrying this stream's events was lost")
            if item is not CALL_DONE:
                self.ended = any(e["event"] in ("end", "error") for e in item)
                return item
            self._returned()

    async def _next(self) -> Any:
        if self.grace_until is None:
            return await self.queue.get()
        try:
            async with asyncio.timeout_at(self.grace_until):
                return await self.queue.get()
        except TimeoutError:
            self._forget()
            raise ChannelLost("the stream's last events never arrived") from None

    def _returned(self) -> None:
        """The call returned: raise what it says, StopAsyncIteration when every list it
        wrote was handed out, else start the grace for the lists still on the socket."""
        result = self.call.result()  # raises what the call raised (a lost replica)
        if "unreachable" in result:
            self._forget()
            raise ChannelUnreachable(result["unreachable"])
        if "lost" in result:
            self._forget()
            raise ChannelLost(result["lost"])
        sent = result.get("sent", self.received + 1)  # unknown: wait for the grace
        if self.received >= sent:
            self._forget()
            raise StopAsyncIteration
        if result.get("conn") in self.inbox.lost:
            self._forget()
            raise ChannelLost(f"{sent - self.received} event list(s) lost with the connection")
        self.grace_until = asyncio.get_running_loop().time() + END_GRACE_S

    def cancel(self) -> None:
        """Stop the replica's generation (best effort) and drop the events still coming."""
        self._forget()
        self.call.cancel()
        with contextlib.suppress(Exception):  # Serve re-raises a call that never started
            self.response.cancel()

    def _forget(self) -> None:
        self.inbox.streams.pop(self.rid, None)


async def _result(response: DeploymentResponse) -> Any:
    return await response


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_host(setting: str | None, http_host: str | None, nodes: int) -> str | None:
    """Where the inbox listens: `setting` when given; loopback when the HTTP front is bound
    to loopback on a one-node cluster (no replica elsewhere needs it); else None (this
    node's address)."""
    if setting:
        return setting
    if http_host is not None and is_loopback(http_host) and nodes == 1:
        return "127.0.0.1"
    return None


def node_address() -> str:
    """This node's address as Ray knows it (reachable by the other nodes' replicas)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # no Ray here (tests of the channel alone)
        return socket.gethostbyname("localhost")
