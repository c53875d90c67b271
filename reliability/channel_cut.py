"""The stream events channel cut under load: the ingress drops every replica's connection to
its inbox, every few seconds, while a steady load (half streamed) runs.

Streamed events travel from the model replicas to the ingress on one TCP connection per
replica (deployments/channel.py); the request itself stays one Serve call. Cutting those
connections from the ingress side (`Ingress.cut_stream_connections`, called through a Serve
handle) is what a network blip or a restarted ingress socket looks like to the streams in
flight. Non-streamed requests do not use the channel and must not notice. A stream that had
not sent its first frame can be started again; one that had can only be ended, with the error
event and `data: [DONE]`. Targets: 0 lost, 0 failed non-streamed, 0 streams failed before
their first frame, every stream failed mid-way ended with the error event and `[DONE]`, and at
least one connection was actually cut (else the run proved nothing).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from reliability.load import Outcome, Tally, percentile, steady

if TYPE_CHECKING:
    from reliability.context import Run


def cut_times(seconds: float, every_s: float) -> list[float]:
    """When to cut (s into the load): every `every_s`, none in the load's last second (so
    every cut has requests in flight to catch)."""
    times, at = [], every_s
    while at < seconds - 1.0:
        times.append(at)
        at += every_s
    return times or [seconds / 2]


def cut(app: str, t0: float, cuts: list[tuple[float, int]]) -> None:
    """Call the ingress's `cut_stream_connections()` once; records when (s after `t0`) and
    how many connections it closed."""
    from ray import serve

    from deployments.settings import INGRESS_NAME

    handle = serve.get_deployment_handle(INGRESS_NAME, app_name=app)
    at = time.monotonic() - t0
    cuts.append((at, int(handle.cut_stream_connections.remote().result(timeout_s=30))))


def row(tally: Tally, cuts: list[tuple[float, int]], rate: float, seconds: float) -> dict[str, Any]:
    """The report row of one run: how each kind of request ended, how many connections were
    cut, and how many streams were under way at a cut (the ones it could have broken)."""
    plain, streamed = tally.summary("plain"), tally.summary("stream")
    failed: list[Outcome] = [o for o in tally.of("stream") if o.result == "failed"]
    mid = [o for o in failed if o.frames > 0]
    latencies = [o.latency_s for o in tally.of() if o.result == "ok"]
    statuses = {**plain["failed_by_status"]}
    for k, v in streamed["failed_by_status"].items():
        statuses[k] = statuses.get(k, 0) + v
    return {
        "rate_rps": rate,
        "seconds": seconds,
        "cuts": len(cuts),
        "connections_cut": sum(n for _, n in cuts),
        "streams_under_way_at_a_cut": sum(
            any(o.start <= at <= o.start + o.latency_s for at, _ in cuts)
            for o in tally.of("stream")
        ),
        "sent": plain["sent"] + streamed["sent"],
        "ok": plain["ok"] + streamed["ok"],
        "plain_failed": plain["failed"],
        "plain_lost": plain["lost"],
        "stream_failed_before_first_frame": len(failed) - len(mid),
        "stream_failed_after_first_frame": len(mid),
        "of_which_error_event_and_done": sum(o.error_event and o.done for o in mid),
        "stream_lost": streamed["lost"],
        "stream_lost_after_first_frame": sum(
            o.result == "lost" and o.frames > 0 for o in tally.of("stream")
        ),
        "failed_by_status": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())) or "none",
        "p99_latency_s": round(percentile(latencies, 99), 3),
    }


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "channel cut: connections were cut": r["connections_cut"] > 0,
        "channel cut: 0 lost": r["plain_lost"] + r["stream_lost"] == 0,
        "channel cut: 0 failed non-streamed": r["plain_failed"] == 0,
        "channel cut: 0 streams failed before their first frame": (
            r["stream_failed_before_first_frame"] == 0
        ),
        "channel cut: every stream failed mid-way got the error event and [DONE]": (
            r["of_which_error_event_and_done"] == r["stream_failed_after_first_frame"]
        ),
    }


def channel_cut_run(
    base: str, app: str, *, rate: float, seconds: float, body: dict[str, Any], every_s: float
) -> dict[str, Any]:
    """`rate` req/s (half streamed) for `seconds`, the channel cut every `every_s`; the row."""
    cuts: list[tuple[float, int]] = []
    t0 = time.monotonic()  # the load's own clock starts within a millisecond of this
    events = [(at, lambda: cut(app, t0, cuts)) for at in cut_times(seconds, every_s)]
    tally = asyncio.run(steady(base, body, rate, seconds, events=events))
    return row(tally, cuts, rate, seconds)


def phase(run: Run) -> None:
    a = run.a
    r = channel_cut_run(
        run.base, run.app, rate=a.rate, seconds=a.cut_s, body=run.body, every_s=a.cut_every_s
    )
    run.table("Stream channel cut under load", [r])
    run.verdicts.update(verdicts(r))
    print("channel cut", r)
