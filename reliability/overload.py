"""Overload: a burst far past the queue limits gets 503 + Retry-After quickly, and every
request that was accepted still finishes.

Serve admits `max_ongoing_requests` per replica plus `max_queued_requests` waiting in the
ingress's handle; past that the handle raises BackPressureError at once, which the ingress
answers as 503 with `Retry-After`. The figure that matters is how fast a rejection comes back
(p99 < 100 ms): a client told to back off late has already waited.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from reliability.load import Outcome, percentile, plain


async def _burst(base: str, body: dict[str, Any], count: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await client.get(f"{base}/healthz")  # open a connection before the clock matters
        t0 = time.monotonic()
        url = f"{base}/v1/completions"
        return list(await asyncio.gather(*(plain(client, url, body, t0) for _ in range(count))))


def overload_run(base: str, body: dict[str, Any], count: int) -> dict[str, Any]:
    """`count` requests at once; the report row."""
    outcomes = asyncio.run(_burst(base, body, count))
    rejected = [o for o in outcomes if o.status == 503]
    accepted = [o for o in outcomes if o.status != 503]
    return {
        "burst": count,
        "rejected_503": len(rejected),
        "with_retry_after": sum(bool(o.retry_after) for o in rejected),
        "p50_503_ms": round(percentile([o.latency_s for o in rejected], 50) * 1000, 1),
        "p99_503_ms": round(percentile([o.latency_s for o in rejected], 99) * 1000, 1),
        "accepted": len(accepted),
        "accepted_ok": sum(o.result == "ok" for o in accepted),
        "accepted_failed": sum(o.result == "failed" for o in accepted),
        "lost": sum(o.result == "lost" for o in outcomes),
        "p99_accepted_s": round(percentile([o.latency_s for o in accepted], 99), 2),
    }
