"""A flood of unauthenticated connections at the ingress's stream events inbox.

The inbox (deployments/channel.py) listens on a TCP port for the model replicas; a connection
must send the inbox's key before anything it sends is believed. A stranger who finds the port
can still open connections and send bytes before any key. This phase opens `connections`
of them to the inbox at once; `senders` of those send `send_mib` MiB each, as fast as the
socket takes it: the start of a msgpack bin 32 value announced at 2 GiB (`HEADER`), which
never finishes, so a reader that buffers until a message is whole would keep it all. The rest
send nothing and wait. Meanwhile a light load (`LIGHT_RPS` non-streamed req/s) is served; the
same light load alone, just before and just after, is the baseline (before and after, so a
machine getting busier or quieter meanwhile moves the baseline too). Measured: the ingress replica's resident
memory before and at its peak during the flood (sampled every 0.1 s), and the light load's
p99 with and without the flood. Targets: RSS growth < 50 MiB, p99 with the flood at most 1.5x
the p99 without, and streaming through the inbox still works after it.

Only addresses in 127.0.0.0/8 are ever connected to (the run's Ray node is 127.0.0.1); the
flood is bounded in connections, bytes and seconds, and every socket is closed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from reliability import replicas
from reliability.load import Tally, percentile, steady, stream
from reliability.soak import rss_mib

if TYPE_CHECKING:
    from reliability.context import Run

HEADER = b"\xc6" + (2**31).to_bytes(4, "big")  # msgpack bin 32, length 2 GiB: never complete
CHUNK = 1 << 20
LIGHT_RPS = 5.0
CONNECT_TIMEOUT_S = 5.0
RSS_GROWTH_MIB = 50.0
P99_FACTOR = 1.5


@dataclass
class Flood:
    """What the flood did, and what the inbox did to it."""

    connections: int = 0  # asked for
    opened: int = 0
    refused: int = 0  # the connect failed or timed out
    closed_by_inbox: int = 0  # the inbox closed (or reset) it before the flood ended
    senders: int = 0
    sent_mib: float = 0.0  # what the senders' sockets took (not all of it read by the inbox)
    senders_cut_short: int = 0  # senders that could not get their last byte out
    seconds: float = 0.0


def loopback(host: str) -> bool:
    """Whether `host` is an address in 127.0.0.0/8 (the only ones this phase connects to)."""
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        return False


async def _one(
    host: str, port: int, send_bytes: int, until: float, flood: Flood, opened: list[Any]
) -> None:
    """One connection: send `send_bytes` (0: none) of an unfinished value, then hold it open
    until `until` or until the inbox closes it."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
        )
    except OSError:  # refused, or TimeoutError
        flood.refused += 1
        return
    opened.append(writer)
    flood.opened += 1
    flood.senders += bool(send_bytes)
    left, payload = send_bytes, HEADER
    try:
        async with asyncio.timeout_at(until):
            while left > 0:
                part = payload or bytes(min(CHUNK, left))
                payload = b""
                writer.write(part)
                await writer.drain()
                left -= len(part)
                flood.sent_mib += len(part) / (1 << 20)
            if await reader.read(1) == b"":  # the inbox closed it (it sends nothing else)
                flood.closed_by_inbox += 1
    except TimeoutError:  # (an OSError too, so first)
        pass  # the flood's time is up with this connection still open
    except OSError:  # reset, broken pipe
        flood.closed_by_inbox += 1
    flood.senders_cut_short += left > 0


async def flood_inbox(
    address: str, connections: int, senders: int, send_mib: float, seconds: float
) -> Flood:
    """Open `connections` to `address` ("host:port"), `senders` of them sending `send_mib`
    MiB each; hold them for `seconds`, then close every one."""
    host, port = address.rsplit(":", 1)
    if not loopback(host):
        raise ValueError(f"refusing to flood {address}: not a 127.0.0.x address")
    flood = Flood(connections=connections)
    opened: list[asyncio.StreamWriter] = []
    t0 = time.monotonic()
    until = asyncio.get_running_loop().time() + seconds
    size = int(send_mib * (1 << 20))
    try:
        await asyncio.gather(
            *(
                _one(host, int(port), size if i < senders else 0, until, flood, opened)
                for i in range(connections)
            )
        )
    finally:
        for writer in opened:
            writer.close()
        for writer in opened:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
    flood.seconds = round(time.monotonic() - t0, 1)
    flood.sent_mib = round(flood.sent_mib, 1)
    return flood


class Peak:
    """Samples a process's RSS every 0.1 s in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, RuntimeError):  # the process is gone
                self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _p99_ms(tally: Tally) -> float:
    return round(percentile([o.latency_s for o in tally.of() if o.result == "ok"], 99) * 1000, 1)


async def _with_flood(
    base: str, body: dict[str, Any], seconds: float, address: str, flood_args: tuple[Any, ...]
) -> tuple[Tally, Flood]:
    """The light load and the flood at once (the flood on its own thread and event loop, so
    its writes never delay the light load's client)."""
    flood = asyncio.to_thread(asyncio.run, flood_inbox(address, *flood_args, seconds))
    return await asyncio.gather(steady(base, body, LIGHT_RPS, seconds, stream_every=0), flood)


async def _stream_ok(base: str, body: dict[str, Any]) -> bool:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        out = await stream(client, f"{base}/v1/completions", body, time.monotonic())
    return out.result == "ok"


def inbox_address(app: str) -> str | None:
    """The ingress's `stream_inbox_address()` (None: it streams through Serve)."""
    from ray import serve

    from deployments.settings import INGRESS_NAME

    handle = serve.get_deployment_handle(INGRESS_NAME, app_name=app)
    return handle.stream_inbox_address.remote().result(timeout_s=30)


def preauth_run(
    base: str,
    app: str,
    body: dict[str, Any],
    *,
    connections: int,
    senders: int,
    send_mib: float,
    seconds: float,
) -> dict[str, Any]:
    """The light load alone, under the flood, then alone again; the report row."""
    from deployments.settings import INGRESS_NAME

    asyncio.run(_stream_ok(base, body))  # the inbox listens from the first streamed request
    address = inbox_address(app)
    if address is None or not loopback(address.rsplit(":", 1)[0]):
        return {"skipped": f"the inbox is at {address}, not a 127.0.0.x address"}
    pid = replicas.pid(replicas.replica_names(app, INGRESS_NAME)[0])
    base_tally = asyncio.run(steady(base, body, LIGHT_RPS, seconds, stream_every=0))
    rss_before = rss_mib(pid)
    with Peak(pid) as peak:
        tally, flood = asyncio.run(
            _with_flood(base, body, seconds, address, (connections, senders, send_mib))
        )
    time.sleep(1.0)
    rss_after = rss_mib(pid)
    after_tally = asyncio.run(steady(base, body, LIGHT_RPS, seconds, stream_every=0))
    alone = Tally(base_tally.outcomes + after_tally.outcomes)
    under = tally.summary()
    return {
        "inbox": address,
        **asdict(flood),
        "send_mib_each": send_mib,
        "rss_before_mib": round(rss_before, 1),
        "rss_peak_mib": round(peak.peak, 1),
        "rss_growth_mib": round(peak.peak - rss_before, 1),
        "rss_after_mib": round(rss_after, 1),
        "light_rps": LIGHT_RPS,
        "p99_before_ms": _p99_ms(base_tally),
        "p99_after_ms": _p99_ms(after_tally),
        "p99_without_ms": _p99_ms(alone),
        "p99_with_flood_ms": _p99_ms(tally),
        "light_failed_or_lost": under["failed"] + under["lost"],
        "stream_ok_after": asyncio.run(_stream_ok(base, body)),
        "inbox_after": inbox_address(app),
    }


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    if "skipped" in r:
        return {"preauth flood: ran against a 127.0.0.x inbox": False}
    return {
        f"preauth flood: ingress RSS growth < {RSS_GROWTH_MIB:g} MiB": (
            r["rss_growth_mib"] < RSS_GROWTH_MIB
        ),
        f"preauth flood: p99 with the flood <= {P99_FACTOR:g}x without": (
            r["p99_with_flood_ms"] <= P99_FACTOR * r["p99_without_ms"]
        ),
        "preauth flood: the light load was served in full": r["light_failed_or_lost"] == 0,
        "preauth flood: streaming through the inbox works after it": (
            r["stream_ok_after"] and r["inbox_after"] == r["inbox"]
        ),
    }


def phase(run: Run) -> None:
    a = run.a
    r = preauth_run(
        run.base,
        run.app,
        run.body,
        connections=a.flood_connections,
        senders=a.flood_senders,
        send_mib=a.flood_mib,
        seconds=a.flood_s,
    )
    run.table("Unauthenticated connections at the stream events inbox", [r])
    if "skipped" in r:
        run.notes.append(f"preauth flood skipped: {r['skipped']}")
    run.verdicts.update(verdicts(r))
    print("preauth flood", r)
