"""Overload: offered load well past capacity; the excess gets 503 + Retry-After quickly, and
every request that was accepted still finishes.

Serve admits `max_ongoing_requests` per replica plus `max_queued_requests` waiting in the
ingress's handle; past that the handle raises BackPressureError at once, which the ingress
answers as 503 with `Retry-After`. Whether a fixed rate overloads depends on the machine (a
fast one keeps up with what saturates a slow one), so the phase first measures what the
replicas sustain (`capacity`: a closed loop that keeps every admitted slot busy) and then
offers a multiple of that, open loop (a fixed arrival rate whatever comes back): after a
second or two the queue is full and stays full, and the figure that matters is how fast a
rejection comes back (p99 < 100 ms): a client told to back off late has already waited.
(A single burst of simultaneous connections would measure the HTTP proxy's accept queue
instead.)

Where a 503's time goes: while the load runs, two cheap probes cross the same hops at a low
rate: `GET /healthz` (proxy -> ingress, no body, no replica) and a completion for a model
that does not exist (the same, plus reading the body and parsing the request: a 404 before
any replica or queue). A 503 takes those hops plus the variant's queue check, so comparing
the three medians and tails says whether the proxy and ingress or the queue check is slow.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from reliability.load import percentile, plain, steady

PROBE_RPS = 4.0  # each probe's rate: low enough not to add load of its own
UNKNOWN_MODEL = "no-such-model"


async def _capacity(
    base: str, body: dict[str, Any], concurrency: int, seconds: float, warmup_s: float
) -> float:
    """Non-streamed requests/s the replicas sustain with `concurrency` clients in a closed
    loop (each sends its next request when the last is answered), counted after `warmup_s`."""
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.monotonic()
    counted_from, until = t0 + warmup_s, t0 + warmup_s + seconds
    done = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < until:
            outcome = await plain(client, url, body, t0)
            end = time.monotonic()
            if outcome.result == "ok" and counted_from <= end <= until:
                done += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return done / seconds


def capacity(
    base: str, body: dict[str, Any], concurrency: int, seconds: float, warmup_s: float = 2.0
) -> float:
    """`_capacity`, run to completion (requests/s)."""
    return asyncio.run(_capacity(base, body, concurrency, seconds, warmup_s))


async def _probes(base: str, body: dict[str, Any], seconds: float) -> dict[str, list[float]]:
    """Latencies (s) of the two cheap probes, sent at PROBE_RPS each for `seconds`."""
    got: dict[str, list[float]] = {"healthz": [], "unknown_model": []}
    async with httpx.AsyncClient(timeout=30) as client:

        async def timed(name: str, send: Any) -> None:
            start = time.monotonic()
            try:
                await send()
            except httpx.HTTPError:
                return  # a probe that got no answer says nothing about the hops' latency
            got[name].append(time.monotonic() - start)

        url = f"{base}/v1/completions"
        bad = {**body, "model": UNKNOWN_MODEL, "stream": False}
        tasks = []
        t0 = time.monotonic()
        for i in range(int(seconds * PROBE_RPS)):
            await asyncio.sleep(max(0.0, t0 + i / PROBE_RPS - time.monotonic()))
            tasks.append(
                asyncio.create_task(timed("healthz", lambda: client.get(f"{base}/healthz")))
            )
            tasks.append(
                asyncio.create_task(timed("unknown_model", lambda: client.post(url, json=bad)))
            )
        await asyncio.gather(*tasks)
    return got


async def _overload(
    base: str, body: dict[str, Any], rate: float, seconds: float
) -> tuple[Any, dict[str, list[float]]]:
    return await asyncio.gather(
        steady(base, body, rate, seconds, stream_every=0), _probes(base, body, seconds)
    )


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 1)


def overload_run(base: str, body: dict[str, Any], rate: float, seconds: float) -> dict[str, Any]:
    """`rate` non-streamed requests/s for `seconds`, with the probes beside; the report row."""
    tally, probes = asyncio.run(_overload(base, body, rate, seconds))
    outcomes = tally.of()
    rejected = [o for o in outcomes if o.status == 503]
    accepted = [o for o in outcomes if o.status != 503 and o.result != "lost"]
    others = sorted({str(o.status) for o in accepted if o.result == "failed"})
    latencies = [o.latency_s for o in rejected]
    return {
        "rate_rps": round(rate, 1),
        "seconds": seconds,
        "sent": len(outcomes),
        "rejected_503": len(rejected),
        "with_retry_after": sum(bool(o.retry_after) for o in rejected),
        "p50_503_ms": _ms(latencies, 50),
        "p99_503_ms": _ms(latencies, 99),
        "accepted": len(accepted),
        "accepted_ok": sum(o.result == "ok" for o in accepted),
        "accepted_failed": sum(o.result == "failed" for o in accepted),
        "failed_statuses": ", ".join(others) or "none",
        "lost": sum(o.result == "lost" for o in outcomes),
        "p99_accepted_s": round(percentile([o.latency_s for o in accepted], 99), 2),
        "healthz_p50_ms": _ms(probes["healthz"], 50),
        "healthz_p99_ms": _ms(probes["healthz"], 99),
        "unknown_model_404_p50_ms": _ms(probes["unknown_model"], 50),
        "unknown_model_404_p99_ms": _ms(probes["unknown_model"], 99),
    }
