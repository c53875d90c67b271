"""Generation for the ingress's routes: a request in, a replica call, the OpenAI answer out.

`completion` serves `/v1/completions` and `/v1/chat/completions` (a chat request is a
completion of the rendered template with the chat stop string), non-streamed as one JSON
response, streamed as Server-Sent Events whose status line waits for the first frame
(`ReplicaClient.open_stream`). `infer` serves the older projects' `/infer`. The replica calls,
their retries and their errors are deployments.replica_client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from deployments.channel import ChannelLost
from deployments.errors import RETRYABLE, stream_error
from deployments.messages import chat_params, completion_params, job
from deployments.replica_client import Event, ReplicaClient, Stream, cancel
from deployments.sse import DONE, ChunkFormatter, Kind, chat_logprobs, completion_logprobs, frame
from slimserve.protocol import (
    CHAT_STOP,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    InferRequest,
    InferResponse,
    Timings,
    TokenProb,
    Usage,
)

log = logging.getLogger("ray.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def completion(
    client: ReplicaClient,
    handle: DeploymentHandle,
    kind: Kind,
    body: CompletionRequest | ChatCompletionRequest,
    deadline: float,
) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
    """One completion or chat request on `handle` (its variant already admitted)."""
    if isinstance(body, ChatCompletionRequest):
        params = chat_params(body, [CHAT_STOP])
        payload = job(body.prompt_text(), params, body.n, logprobs=bool(body.logprobs))
    else:
        logprobs = body.logprobs is not None
        payload = job(
            body.prompt, completion_params(body), body.n, echo=body.echo, logprobs=logprobs
        )
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        gen, first = await client.open_stream(handle, payload, deadline, body.model)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        fmt = ChunkFormatter(kind, rid, body.model, body.n, usage)
        return StreamingResponse(
            sse(client, gen, first, fmt, deadline),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    result = await client.call(lambda: handle.generate.remote(payload), deadline, body.model)
    usage, timings = Usage(**result["usage"]), Timings(**result["timings"])
    if kind == "chat":
        chat = [
            ChatChoice(
                index=c["index"],
                message=ChatMessageOut(content=c["text"]),
                finish_reason=c["finish_reason"],
                logprobs=chat_logprobs(c["logprobs"]) if "logprobs" in c else None,
            )
            for c in result["choices"]
        ]
        return ChatCompletionResponse(
            id=rid, model=body.model, choices=chat, usage=usage, timings=timings
        )
    choices = [
        CompletionChoice(
            index=c["index"],
            text=c["text"],
            finish_reason=c["finish_reason"],
            logprobs=completion_logprobs(c["logprobs"]) if "logprobs" in c else None,
        )
        for c in result["choices"]
    ]
    return CompletionResponse(
        id=rid, model=body.model, choices=choices, usage=usage, timings=timings
    )


async def sse(
    client: ReplicaClient,
    gen: Stream,
    first: list[Event],
    fmt: ChunkFormatter,
    deadline: float,
) -> AsyncIterator[str]:
    """The SSE body: frames until the replica ends, then `[DONE]`. Leaving early (client
    gone, timeout, error) cancels the replica's generation.

    Each replica message (a list of events) becomes ONE body chunk, however many frames it
    makes: every chunk is a message from the ingress to the proxy, so the opening frames go
    with the first delta, and the last delta, the usage frame and `[DONE]` go together.
    """
    finished = False
    out = "".join(fmt.opening())
    tail = ""
    try:
        batch = first
        while True:
            out += "".join(f for event in batch for f in fmt.feed(event))
            if any(event["event"] == "end" for event in batch):
                finished = True
                break
            if out:
                yield out
                out = ""
            try:
                async with asyncio.timeout(client.left(deadline)):  # no task per message
                    batch = await gen.__anext__()
            except StopAsyncIteration:
                finished = True
                break
    except TimeoutError:
        tail = frame(client.timeout().payload())
    except Exception as exc:  # mid-stream: the status line is gone, send an error frame
        log.warning("stream failed for %s: %r", fmt.model, exc)
        if isinstance(exc, RETRYABLE) and not isinstance(exc, ChannelLost):
            client.replica_lost()  # a cut events connection is no replica outage
        tail = frame(stream_error(exc))
    finally:
        if not finished:
            cancel(gen)
        client.queues.freed(fmt.model)
    yield out + tail + DONE
    if finished:  # let the replica's stream end, so Serve counts the call as done
        with contextlib.suppress(Exception):
            async with asyncio.timeout(client.left(deadline)):
                await gen.__anext__()


async def infer(
    client: ReplicaClient, handle: DeploymentHandle, model: str, body: InferRequest
) -> InferResponse:
    """`/infer` on `handle` (variant `model`, already admitted): top-k next tokens and an
    optional greedy continuation."""
    t0 = time.perf_counter()
    result = await client.call(
        lambda: handle.next_token.remote(body.prompt, body.top_k, body.max_new_tokens),
        client.deadline(),
        model,
    )
    top = [TokenProb(**t) for t in result["top_k"]]
    return InferResponse(
        model=model,
        next_token=top[0],
        top_k=top,
        continuation=result["continuation"],
        latency_ms=(time.perf_counter() - t0) * 1000,
    )
