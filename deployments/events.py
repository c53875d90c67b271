"""The events a model replica yields for one job: its streams merged, coalesced and summed up.

Streamed tokens are coalesced under load. Every event a replica yields becomes an SSE frame
in the ingress, a chunk through its ASGI stack and HAProxy, and a frame the client parses;
each costs CPU per frame, not per token (reports/profile_serving.md has the per-process
profile), so one event per token would spend a small machine on moving frames. (The events
themselves travel replica -> ingress in one socket write per engine step for all streams,
deployments.channel.) With R requests running and `STREAM_FRAMES_PER_STEP` = F, each
request's deltas are merged and sent every ceil(R / F) tokens, so a replica emits about F
events per engine step however many streams it runs (vLLM's `stream_interval`, scaled with the load): at 16 streams, one event per 8 tokens.
With R <= F every token is its own event; the first delta always goes at once (time to first
token is unchanged), the last one (with `finish_reason`) too. The text is the same; only the
number of SSE frames it arrives in changes. Live via `reconfigure` (`stream_frames_per_step`;
0 turns coalescing off).

Light load gets a time rule instead: after the first delta, a request's deltas go at most every
`STREAM_MIN_INTERVAL_MS` (20 ms, 50 frames a second: smoother than a reader can tell), so a
lone stream sends a few tokens per frame instead of paying for a frame per token. The first
delta and the last still go at once. Live via `reconfigure` (`stream_min_interval_ms`; 0 turns
it off).

Logprobs travel as entries (`deployments.messages`): a token's text and bytes, its logprob and
its alternatives, built here once per token from the engine's ids (`TokenTexts` caches each
id's text). With echo, each choice's first delta starts with the prompt's text and entries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from slimserve.engine import Completion, RequestStream, StreamChunk
from slimserve.sampling_logprobs import TokenLogprob
from slimserve.textstream import TokenTexts

Event = dict[str, Any]
Describe = Callable[[list[TokenLogprob]], list[Event]]
LOGPROB_FLOOR = -9999.0  # -inf is not JSON: the floor vLLM and OpenAI report instead

STREAM_FRAMES_PER_STEP = 2
"""About how many streamed events a replica sends per engine step (0 = one per token)."""
STREAM_MIN_INTERVAL_MS = 20.0
"""A request's deltas after its first go at most this often (0 = no time rule)."""


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """Chunks of several streams (n > 1 choices) as they come, tagged with their index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for chunk in s:
                queue.put_nowait((i, chunk))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def describer(texts: TokenTexts) -> Describe:
    """Engine logprob entries -> message entries (`deployments.messages`), one per token."""

    def describe(entries: list[TokenLogprob]) -> list[Event]:
        out = []
        for e in entries:
            token, raw = texts(e.token_id)
            top = None if e.top is None else [[*texts(t), max(v, LOGPROB_FLOOR)] for t, v in e.top]
            lp = None if e.logprob is None else max(e.logprob, LOGPROB_FLOOR)
            out.append({"token": token, "bytes": raw, "logprob": lp, "top": top})
        return out

    return describe


def echoed(chunk: StreamChunk, prompt_text: str) -> StreamChunk:
    """A choice's first chunk with the prompt's text (and its logprob entries) in front."""
    logprobs = [*(chunk.prompt_logprobs or ()), *(chunk.logprobs or ())]
    return dataclasses.replace(chunk, text=prompt_text + chunk.text, logprobs=logprobs)


async def echo_first(
    chunks: AsyncIterator[tuple[int, StreamChunk]], prompt_text: str
) -> AsyncIterator[tuple[int, StreamChunk]]:
    """`chunks` with each choice's first one `echoed`."""
    started: set[int] = set()
    async for index, chunk in chunks:
        if index not in started:
            started.add(index)
            chunk = echoed(chunk, prompt_text)
        yield index, chunk


def completed(
    index: int, done: Completion, prompt_text: str | None, describe: Describe | None
) -> Event:
    """The one delta of a finished choice (non-streamed); echo when `prompt_text` is set."""
    chunk = StreamChunk(done.text, done.token_ids, done.finish_reason, done.logprobs)
    if prompt_text is not None:
        chunk = echoed(
            dataclasses.replace(chunk, prompt_logprobs=done.prompt_logprobs), prompt_text
        )
    event = delta(index, chunk.text, chunk.token_ids, chunk.finish_reason)
    if describe is not None:
        event["logprobs"] = describe(chunk.logprobs or [])
    return event


async def coalesce(
    chunks: AsyncIterator[tuple[int, StreamChunk]],
    every: Callable[[], int],
    min_interval_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    describe: Describe | None = None,
) -> AsyncIterator[Event]:
    """`delta` events from (choice index, chunk) pairs, merging a choice's consecutive chunks
    until it holds `every()` of them and `min_interval_s` has passed since the last event
    (see the module docstring).

    The first delta and every delta with a `finish_reason` flush at once (and take every
    other choice's pending text with them); chunks without text (held back: an incomplete
    character, a possible stop string) add their token ids to the next delta instead of being
    dropped. No timer: a request gets a chunk at every engine step. `describe`: the chunks'
    logprobs go along as entries (`"logprobs"`, one per token id).
    """
    pending: dict[int, Event] = {}
    counts: dict[int, int] = {}  # chunks merged into each pending event
    sent = False
    last = 0.0  # clock() when the last event went
    async for index, chunk in chunks:
        event = pending.get(index)
        if event is None:
            event = pending[index] = delta(index, "", [], None)
        event["text"] += chunk.text
        event["token_ids"] += chunk.token_ids
        event["finish_reason"] = chunk.finish_reason
        if describe is not None:
            event.setdefault("logprobs", []).extend(describe(chunk.logprobs or []))
        counts[index] = counts.get(index, 0) + 1
        if (
            sent
            and chunk.finish_reason is None
            and (counts[index] < every() or clock() - last < min_interval_s)
        ):
            continue
        for i in sorted(pending):
            ready = pending[i]
            if ready["text"] or ready["finish_reason"] is not None:
                yield pending.pop(i)
                counts.pop(i)
                sent, last = True, clock()


def delta(index: int, text: str, token_ids: list[int], reason: str | None) -> Event:
    return {
        "event": "delta",
        "index": index,
        "text": text,
        "token_ids": token_ids,
        "finish_reason": reason,
    }


def summary(streams: list[RequestStream]) -> dict[str, Any]:
    """Usage and server-side timings of finished streams (n choices: the slowest one)."""
    done = [s.completion() for s in streams]
    completion_tokens = sum(c.completion_tokens for c in done)
    e2e = max(c.timings.e2e_s for c in done)
    return {
        "usage": {
            "prompt_tokens": done[0].prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": done[0].prompt_tokens + completion_tokens,
        },
        "timings": {
            "queue_s": min(c.timings.queue_s for c in done),
            "ttft_s": min(c.timings.ttft_s for c in done),
            "e2e_s": e2e,
            "tokens_per_s": completion_tokens / e2e if e2e > 0 else 0.0,
        },
    }
