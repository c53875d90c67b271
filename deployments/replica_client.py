"""The ingress's transport to the variant replicas: deadlines, retries and the outage window.

Every replica call of the ingress (and of `/compare`) goes through one `ReplicaClient`, which
maps Serve's failures to HTTP errors in the envelope of deployments.errors: a replica's
client-fault reply -> 400/404; a full queue (Serve's `max_queued_requests`, BackPressureError)
-> 503 with `Retry-After`; past `request_timeout_s` -> 408 (the replica's work is cancelled);
a client that disconnects cancels its replica call, which frees the engine's batch slot at the
next step.

A streamed call's events arrive through the ingress's inbox (deployments.channel), or, when
the ingress has none or a variant's replica cannot reach it, as the items of Serve's
streaming response; the rules below are the same either way. A variant whose replica found the
inbox unreachable streams through Serve (that request at once, without waiting again) for
CHANNEL_RETRY_S, then tries the inbox again; each failure doubles the wait, up to
CHANNEL_RETRY_MAX_S (counted in `slimserve_stream_channel_fallbacks`).

Replica loss: a non-streamed call, or a stream before its first SSE frame, whose replica dies
or whose events connection is lost is sent again (RETRY_ATTEMPTS in all, within the request's
deadline); a stream that loses either later ends with a 503 error event and `[DONE]`
(deployments.serving).

Overload is answered as cheaply as possible: a variant whose queue Serve reported full a
moment ago gets its 503 from `admit` without asking Serve again (deployments.admission),
except within the outage window after a lost replica, when a full queue is waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from ray.serve.metrics import Counter

from deployments.admission import FullQueues
from deployments.channel import ChannelLost, ChannelStream, ChannelUnreachable, Inbox
from deployments.errors import OVERLOADED, RETRYABLE, ApiError, replica_error, unavailable

log = logging.getLogger("ray.serve")
Event = dict[str, Any]  # one event of a replica's stream (deployments.model)
Stream = DeploymentResponseGenerator | ChannelStream  # a streamed call's event lists
RETRY_ATTEMPTS = 3  # tries in all per request, each on whatever replica Serve picks
RETRY_BACKOFF_S = 0.05  # doubled per retry; the request's deadline bounds the total
OUTAGE_WINDOW_S = 30.0
"""For this long after the ingress saw a replica lost, a full queue (Serve's BackPressureError,
or the replica's own engine queue answering 503) is the outage's doing, not the client's: the
call waits and tries again (every OUTAGE_RETRY_S, within its deadline) until the replacement
replica takes load. Outside the window a full queue is plain overload and the client gets its
503 at once."""
OUTAGE_RETRY_S = 0.25
CHANNEL_RETRY_S = 30.0
"""A variant whose replica could not reach the inbox streams through Serve this long before
the inbox is tried again; doubled after each failed try, up to CHANNEL_RETRY_MAX_S."""
CHANNEL_RETRY_MAX_S = 300.0


class Fallback(NamedTuple):
    """A variant streaming through Serve: until when, and the wait that got it there."""

    until: float  # monotonic
    wait_s: float


class CounterLike(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


def fallback_counter() -> CounterLike:
    return Counter(
        "slimserve_stream_channel_fallbacks",
        "Streamed requests whose replica could not reach the ingress's events inbox (the "
        "variant then streams through Serve for a while).",
        ("model",),
    )


class ReplicaClient:
    """Calls replicas for one ingress replica: one deadline per request, retries on a lost
    replica, and the memory of which variants' queues are full."""

    def __init__(
        self,
        request_timeout_s: float,
        queues: FullQueues | None = None,
        inbox: Inbox | None = None,
        fallbacks: CounterLike | None = None,
    ):
        self.request_timeout_s = request_timeout_s
        self.inbox = inbox  # where streamed events arrive; None: Serve's streaming responses
        self.queues = queues if queues is not None else FullQueues()
        self.lost_at = -math.inf  # monotonic time a replica was last seen lost
        self.fallen_back: dict[str, Fallback] = {}  # variants streaming through Serve
        self.fallbacks = fallbacks if fallbacks is not None else fallback_counter()

    # -- deadlines and admission ---------------------------------------------------------------

    def deadline(self) -> float:
        """The monotonic time by which a request starting now must be answered."""
        return time.monotonic() + self.request_timeout_s

    def left(self, deadline: float) -> float:
        return max(0.001, deadline - time.monotonic())

    def timeout(self) -> ApiError:
        return ApiError(408, f"request timed out after {self.request_timeout_s:g}s")

    def admit(self, model: str) -> None:
        """Raise at once the 503 of `model`'s queue when it was full a moment ago (outside the
        outage window, where a full queue is waited out instead)."""
        if time.monotonic() - self.lost_at >= OUTAGE_WINDOW_S:
            self.queues.check(model)

    def replica_lost(self) -> None:
        """A replica was seen lost: full queues from now on are the outage's doing."""
        self.lost_at = time.monotonic()

    # -- calls -----------------------------------------------------------------------------------

    async def call(
        self, make: Callable[[], DeploymentResponse], deadline: float, model: str | None = None
    ) -> Any:
        """Await one non-streamed replica call; map Serve's failures to HTTP errors.

        A replica that dies under a request (killed, crashed, OOM) loses it, and Serve does not
        resend it: generation has no side effects, so the call is retried on another replica,
        until RETRY_ATTEMPTS tries have met a dead replica, and never past the deadline.
        Overload (a full queue) is not retried (the client gets its 503 at once), except
        within OUTAGE_WINDOW_S of a lost replica, when the surviving replicas' queues fill only
        because one replica is gone. `model` names the variant, for `queues`.
        """
        lost = 0  # tries that met a dead replica
        while True:
            response = make()
            try:
                async with asyncio.timeout(self.left(deadline)):  # no task per call
                    result = await response
                if isinstance(result, dict) and "error" in result:
                    raise replica_error(result["error"])
            except TimeoutError:
                cancel(response)
                raise self.timeout() from None
            except asyncio.CancelledError:  # the client disconnected: stop the replica's work
                cancel(response)
                raise
            except Exception as exc:
                lost += isinstance(exc, RETRYABLE)
                if not await self._retry(exc, lost, deadline):
                    raise self._give_up(exc, model) from exc
                continue
            if model is not None:
                self.queues.freed(model)
            return result

    async def open_stream(
        self, handle: DeploymentHandle, payload: dict[str, Any], deadline: float, model: str
    ) -> tuple[Stream, list[Event]]:
        """Start a streamed call and wait for the events of its first SSE frame.

        Nothing has reached the client until then (not even the status line), so errors are
        still HTTP 4xx / 503, and a replica lost or a full queue by then is retried exactly like
        a non-streamed call. After it, the SSE body ends the stream with an error event instead.
        """
        lost = 0  # tries that met a dead replica
        while True:
            gen = await self._start(handle, payload, model)
            try:
                first = await self._first_frame(gen, deadline)
                if isinstance(gen, ChannelStream) and self.fallen_back.pop(model, None):
                    log.info("stream events inbox reachable again for %s", model)
                return gen, first
            except ChannelUnreachable as exc:  # nothing generated: go again through Serve
                self._fall_back(model, exc)
            except TimeoutError:
                cancel(gen)
                raise self.timeout() from None
            except asyncio.CancelledError:
                cancel(gen)
                raise
            except Exception as exc:
                cancel(gen)
                lost += isinstance(exc, RETRYABLE)
                if not await self._retry(exc, lost, deadline):
                    raise self._give_up(exc, model) from exc

    def _fall_back(self, model: str, exc: ChannelUnreachable) -> None:
        """Stream `model` through Serve for a while: its replica could not reach the inbox."""
        before = self.fallen_back.get(model)
        wait = CHANNEL_RETRY_S if before is None else min(2 * before.wait_s, CHANNEL_RETRY_MAX_S)
        self.fallen_back[model] = Fallback(time.monotonic() + wait, wait)
        self.fallbacks.inc(1, {"model": model})
        log.warning(
            "stream events inbox unreachable for %s (%s); streaming it through Serve for %gs",
            model,
            exc,
            wait,
        )

    def channel_for(self, model: str) -> bool:
        """Whether `model`'s next stream goes through the inbox (not within a fallback)."""
        if self.inbox is None:
            return False
        fallback = self.fallen_back.get(model)
        return fallback is None or time.monotonic() >= fallback.until

    async def _start(self, handle: DeploymentHandle, payload: dict[str, Any], model: str) -> Stream:
        """A streamed call: its events through the inbox when there is one and `model` is not
        falling back, else as the items of Serve's streaming response."""
        if self.inbox is not None and self.channel_for(model):
            try:
                await self.inbox.start()
                return self.inbox.open(handle, payload)
            except OSError as exc:
                log.warning("stream events inbox cannot listen (%s); streaming through Serve", exc)
                self.inbox = None
        return handle.options(stream=True).stream.remote(payload)

    async def _first_frame(self, gen: Stream, deadline: float) -> list[Event]:
        """The replica's events up to the first that makes a frame (a delta or the end); the
        replica sends them in lists (deployments.model `stream`)."""
        events: list[Event] = []
        while True:
            try:
                async with asyncio.timeout(self.left(deadline)):
                    batch = await gen.__anext__()
            except StopAsyncIteration:
                return events
            for event in batch:
                if event["event"] == "error":
                    raise replica_error(event["error"])
            events += batch
            if any(e["event"] != "start" for e in batch):
                return events

    def _give_up(self, exc: Exception, model: str | None) -> Exception:
        """The error a failed call ends with; a full queue is remembered for `admit`."""
        err = unavailable(exc)
        if model is not None:
            if isinstance(exc, BackPressureError) and isinstance(err, ApiError):
                self.queues.full(model, err)
            else:
                self.queues.freed(model)
        return err

    async def _retry(self, exc: Exception, attempt: int, deadline: float) -> bool:
        """Whether a failed call may go again (after a short backoff that fits the deadline);
        `attempt` counts the tries that met a dead replica, this one included."""
        now = time.monotonic()
        if isinstance(exc, OVERLOADED) and now - self.lost_at < OUTAGE_WINDOW_S:
            if now + OUTAGE_RETRY_S >= deadline:
                return False
            await asyncio.sleep(OUTAGE_RETRY_S)  # a replacement replica is on its way
            return True
        if not isinstance(exc, RETRYABLE):
            return False
        if not isinstance(exc, ChannelLost):  # a cut connection is no replica outage
            self.lost_at = now
        if attempt >= RETRY_ATTEMPTS:
            return False
        pause = RETRY_BACKOFF_S * 2 ** (attempt - 1)
        if time.monotonic() + pause >= deadline:
            return False
        what = "events connection lost" if isinstance(exc, ChannelLost) else "replica lost"
        log.warning("%s (%r); retry %d of %d", what, exc, attempt, RETRY_ATTEMPTS - 1)
        await asyncio.sleep(pause)
        return True


def cancel(response: DeploymentResponse | Stream) -> None:
    """Cancel a replica call, best effort. Serve's `cancel()` raises the call's own error again
    when the call failed before reaching a replica (a full queue, no replica): there is nothing
    to cancel then, and that error must not escape past the retry."""
    with contextlib.suppress(Exception):
        response.cancel()
