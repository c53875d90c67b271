"""An open-loop HTTP load generator that accounts for every request it sends.

Each request ends in exactly one outcome: `ok`, `failed` (an HTTP error status, or a stream
that ended with an error event and `[DONE]`: `mid_stream`, it had started), or `lost` (no
answer at all: the connection broke, the client's own deadline passed, or a stream stopped
without `[DONE]`). A stream also records how many frames it had received, and whether an
error event and `[DONE]` came, so a failure before the first frame (which the ingress
should have retried) is told apart from one mid-way (which can only be reported). Arrivals are
scheduled at a fixed rate regardless of how fast answers come back (open loop), so a slow
or dead replica shows up as queueing and errors instead of quietly lowering the offered load.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from slimserve import stats


@dataclass
class Outcome:
    kind: str  # "plain" | "stream"
    start: float  # seconds since the run began
    latency_s: float
    result: str  # "ok" | "failed" | "lost"
    status: int | None = None  # HTTP status, or the stream's error event code
    retry_after: str | None = None
    detail: str = ""
    mid_stream: bool = False  # a stream that failed after its status line (an error event)
    frames: int = 0  # a stream's data frames before the end (the error event and [DONE] apart)
    error_event: bool = False  # a stream's error event came
    done: bool = False  # a stream's `data: [DONE]` came

    def label(self) -> str:
        """`503 server overloaded`: the status and the start of the error message, so a
        capacity 503 and a lost-replica 503 are told apart."""
        message = ""
        try:
            message = json.loads(self.detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = self.detail
        head = re.split(r"[:(;]", message, maxsplit=1)[0].strip()[:40]
        return f"{self.status} {head}".strip()


@dataclass
class Tally:
    """What a run's outcomes add up to (the report's figures)."""

    outcomes: list[Outcome] = field(default_factory=list)

    def of(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if kind is None or o.kind == kind]

    def summary(self, kind: str | None = None) -> dict[str, Any]:
        rows = self.of(kind)
        failed = Counter(o.label() for o in rows if o.result == "failed")
        return {
            "sent": len(rows),
            "ok": sum(o.result == "ok" for o in rows),
            "failed": sum(failed.values()),
            "failed_by_status": dict(sorted(failed.items())),
            "failed_mid_stream": sum(o.result == "failed" and o.mid_stream for o in rows),
            "lost": sum(o.result == "lost" for o in rows),
        }


def percentile(values: list[float], q: float) -> float:
    """`slimserve.stats.percentile` (the benchmarks' rule), 0.0 for no values."""
    return stats.percentile(values, q) or 0.0


async def plain(client: httpx.AsyncClient, url: str, body: dict[str, Any], t0: float) -> Outcome:
    start = time.monotonic()
    try:
        r = await client.post(url, json={**body, "stream": False})
    except httpx.HTTPError as exc:
        return Outcome("plain", start - t0, time.monotonic() - start, "lost", None, None, repr(exc))
    latency = time.monotonic() - start
    if r.status_code == 200:
        ok = bool(r.json().get("choices"))
        return Outcome("plain", start - t0, latency, "ok" if ok else "failed", 200)
    return Outcome(
        "plain",
        start - t0,
        latency,
        "failed",
        r.status_code,
        r.headers.get("retry-after"),
        r.text[:2000],
    )


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], t0: float) -> Outcome:
    start = time.monotonic()
    error: dict[str, Any] | None = None
    frames, done = 0, False

    def outcome(result: str, status: int | None, detail: str = "", **kw: Any) -> Outcome:
        latency = time.monotonic() - start
        return Outcome(
            "stream",
            start - t0,
            latency,
            result,
            status,
            detail=detail,
            frames=frames,
            error_event=error is not None,
            done=done,
            **kw,
        )

    try:
        async with client.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                retry_after = r.headers.get("retry-after")
                return outcome("failed", r.status_code, r.text[:2000], retry_after=retry_after)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                elif '"error"' in data:
                    error = json.loads(data).get("error") or {}
                else:
                    frames += 1
    except httpx.HTTPError as exc:
        return outcome("lost", None, repr(exc))
    if not done:
        return outcome("lost", None, "no [DONE]")
    if error is not None:
        detail = json.dumps({"error": error})
        return outcome("failed", error.get("code"), detail, mid_stream=True)
    return outcome("ok", 200)


async def steady(
    base: str,
    body: dict[str, Any],
    rate: float,
    seconds: float,
    *,
    stream_every: int = 2,
    timeout_s: float = 120.0,
    events: list[tuple[float, Any]] | None = None,
) -> Tally:
    """`rate` requests/s for `seconds` (every `stream_every`-th one streamed), then wait for all.

    `events` are (at_s, callable) run in a thread at those times (a fault to inject).
    """
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    tally = Tally()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.monotonic()
        tasks: list[asyncio.Task[Outcome]] = []
        pending = sorted(events or [], key=lambda e: e[0])
        fault_tasks = []
        total = int(rate * seconds)
        for i in range(total):
            at = t0 + i / rate
            while pending and pending[0][0] <= at - t0:
                fault_tasks.append(asyncio.create_task(asyncio.to_thread(pending.pop(0)[1])))
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            go = stream if stream_every and i % stream_every == stream_every - 1 else plain
            tasks.append(asyncio.create_task(go(client, url, body, t0)))
        tally.outcomes = list(await asyncio.gather(*tasks))
        for f in fault_tasks:
            await f
    return tally
