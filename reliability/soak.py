"""Soak: a steady load at the edge of capacity for minutes; replica memory must stay bounded.

Closed loop: `concurrency` clients each send the next request when the last one is answered,
with concurrency = what the replicas admit at once (`replicas × max_ongoing_requests`), so the
batches stay full and the queue stays near its limit. Each replica's resident memory (VmRSS
of its worker process) is read after the warm-up and at the end: growth must stay under 10 %.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from reliability import replicas
from reliability.load import Outcome, Tally, plain, stream


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _clients(
    base: str, body: dict[str, Any], concurrency: int, until: float, tally: Tally
) -> None:
    url = f"{base}/v1/completions"
    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            n = 0
            while time.monotonic() < until:
                go = stream if (i + n) % 2 else plain
                out: Outcome = await go(client, url, body, t0)
                tally.outcomes.append(out)
                n += 1

        await asyncio.gather(*(one(i) for i in range(concurrency)))


def soak_run(
    base: str,
    app: str,
    deployment: str,
    body: dict[str, Any],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    """Warm up, read RSS, soak, read RSS again; the report row."""
    names = replicas.replica_names(app, deployment)
    pids = {n: replicas.pid(n) for n in names}
    warm = Tally()
    asyncio.run(_clients(base, body, concurrency, time.monotonic() + warmup_s, warm))
    before = {n: rss_mib(p) for n, p in pids.items()}
    tally = Tally()
    t0 = time.monotonic()
    asyncio.run(_clients(base, body, concurrency, t0 + seconds, tally))
    elapsed = time.monotonic() - t0
    after = {n: rss_mib(p) for n, p in pids.items()}
    growth = max((after[n] - before[n]) / before[n] * 100 for n in pids)
    s = tally.summary()
    return {
        "seconds": round(elapsed, 1),
        "warmup_s": warmup_s,
        "concurrency": concurrency,
        "sent": s["sent"],
        "ok": s["ok"],
        "failed": s["failed"],
        "failed_by_status": ", ".join(f"{k}: {v}" for k, v in s["failed_by_status"].items())
        or "none",
        "lost": s["lost"],
        "req_per_s": round(s["sent"] / elapsed, 1),
        "rss_after_warmup_mib": round(max(before.values()), 1),
        "rss_end_mib": round(max(after.values()), 1),
        "max_rss_growth_pct": round(growth, 2),
        "same_replicas": replicas.replica_names(app, deployment) == names,
    }
