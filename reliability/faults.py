"""Replica faults under a steady load: (a) a replica actor killed, (b) a replica process
crashed (SIGKILL) in the middle of requests.

Two replicas of the variant under test serve a steady open-loop load (half streamed). At a
third of the run the busiest replica is lost. The ingress retries the non-streamed requests
it had in flight, and the streams that had not sent their first frame, on the other replica;
the streams already under way end with an error event and `[DONE]`. Figures: sent, ok,
failed by status, lost, and the seconds until Serve's replacement replica is RUNNING again.
Target: 0 lost, 0 failed non-streamed requests, 0 streams refused (failed before their first
frame, which the ingress retries like a non-streamed call); a stream already under way when its
replica dies cannot be retried and is counted apart (`stream_failed_mid_stream`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from reliability import replicas
from reliability.load import Tally, percentile, steady

Mode = Literal["kill", "crash"]


def inject(app: str, deployment: str, mode: Mode, record: dict[str, Any]) -> None:
    """Lose the busiest replica (the one with most requests in flight), time its replacement."""
    deadline = time.monotonic() + 10
    busy = replicas.busiest(app, deployment)
    while busy is None and time.monotonic() < deadline:
        time.sleep(0.02)
        busy = replicas.busiest(app, deployment)
    name, in_flight = busy if busy else (replicas.replica_names(app, deployment)[0], 0)
    count = len(replicas.replica_names(app, deployment))
    record["in_flight_on_lost_replica"] = in_flight
    if mode == "kill":
        replicas.kill(name)
    else:
        record["pid"] = replicas.crash(name)
    record["replacement_s"] = round(replicas.wait_replaced(app, deployment, name, count), 2)


def fault_run(
    base: str,
    app: str,
    deployment: str,
    mode: Mode,
    *,
    rate: float,
    seconds: float,
    body: dict[str, Any],
) -> dict[str, Any]:
    """One steady-load run with one replica lost a third of the way in; the report row."""
    record: dict[str, Any] = {}
    tally: Tally = asyncio.run(
        steady(
            base,
            body,
            rate,
            seconds,
            events=[(seconds / 3, lambda: inject(app, deployment, mode, record))],
        )
    )
    plain, streamed = tally.summary("plain"), tally.summary("stream")
    latencies = [o.latency_s for o in tally.of() if o.result == "ok"]
    return {
        "fault": "replica actor killed (ray.kill)" if mode == "kill" else "replica process SIGKILL",
        "rate_rps": rate,
        "seconds": seconds,
        "sent": plain["sent"] + streamed["sent"],
        "ok": plain["ok"] + streamed["ok"],
        "plain_failed": plain["failed"],
        "plain_lost": plain["lost"],
        "stream_failed": streamed["failed"],
        "stream_failed_mid_stream": streamed["failed_mid_stream"],
        "stream_lost": streamed["lost"],
        "failed_by_status": _merge(plain["failed_by_status"], streamed["failed_by_status"]),
        "in_flight_on_lost_replica": record.get("in_flight_on_lost_replica"),
        "replacement_s": record.get("replacement_s"),
        "p99_latency_s": round(percentile(latencies, 99), 3),
    }


def _merge(a: dict[str, int], b: dict[str, int]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k, 0) + b.get(k, 0)}" for k in keys) or "none"
