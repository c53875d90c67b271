"""Overload: offered load well past capacity; the excess gets 503 + Retry-After quickly, and
every request that was accepted still finishes.

Serve admits `max_ongoing_requests` per replica plus `max_queued_requests` waiting in the
ingress's handle; past that the handle raises BackPressureError at once, which the ingress
answers as 503 with `Retry-After`. The load is open loop (a fixed arrival rate, several times
what the replicas can serve), so after the first second the queue is full and stays full,
and the figure that matters is how fast a rejection comes back (p99 < 100 ms): a client told
to back off late has already waited. (A single burst of simultaneous connections would
measure the HTTP proxy's accept queue instead.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from reliability.load import percentile, steady


def overload_run(base: str, body: dict[str, Any], rate: float, seconds: float) -> dict[str, Any]:
    """`rate` non-streamed requests/s for `seconds`; the report row."""
    tally = asyncio.run(steady(base, body, rate, seconds, stream_every=0))
    outcomes = tally.of()
    rejected = [o for o in outcomes if o.status == 503]
    accepted = [o for o in outcomes if o.status != 503 and o.result != "lost"]
    others = sorted({str(o.status) for o in accepted if o.result == "failed"})
    return {
        "rate_rps": rate,
        "seconds": seconds,
        "sent": len(outcomes),
        "rejected_503": len(rejected),
        "with_retry_after": sum(bool(o.retry_after) for o in rejected),
        "p50_503_ms": round(percentile([o.latency_s for o in rejected], 50) * 1000, 1),
        "p99_503_ms": round(percentile([o.latency_s for o in rejected], 99) * 1000, 1),
        "accepted": len(accepted),
        "accepted_ok": sum(o.result == "ok" for o in accepted),
        "accepted_failed": sum(o.result == "failed" for o in accepted),
        "failed_statuses": ", ".join(others) or "none",
        "lost": sum(o.result == "lost" for o in outcomes),
        "p99_accepted_s": round(percentile([o.latency_s for o in accepted], 99), 2),
    }
