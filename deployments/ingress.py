"""The one HTTP ingress: OpenAI-compatible routes, the older `/infer`, and the live `/compare`.

A FastAPI app behind `@serve.ingress`, built per replica by `__serve_build_asgi_app__` so its
routes and middleware see this replica's settings (the API key, the body cap). Every variant
is a separate deployment reached through a `DeploymentHandle`; `model` in a request picks it.

Failure mapping (all in the envelope of deployments.errors): a replica's client-fault reply
-> 400/404; a full queue (Serve's `max_queued_requests`, BackPressureError) -> 503 with
`Retry-After`; past `request_timeout_s` -> 408 (the replica's work is cancelled); a client
that disconnects cancels its replica call, which frees the engine's batch slot at the next step.

Replica loss: a non-streamed call, or a stream before its first SSE frame, whose replica dies
is sent again (RETRY_ATTEMPTS in all, within the request's deadline); a stream that loses its
replica later ends with a 503 error event and `[DONE]`. CORS is off unless
SLIMSERVE_CORS_ORIGINS lists origins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments import compare
from deployments.admission import FullQueues
from deployments.errors import (
    OVERLOADED,
    RETRYABLE,
    ApiError,
    install,
    replica_error,
    stream_error,
    unavailable,
)
from deployments.messages import job, sampling
from deployments.middleware import Guard
from deployments.settings import INGRESS_NAME, IngressSettings
from deployments.sse import DONE, ChunkFormatter, Kind, frame
from slimserve.protocol import (
    CHAT_STOP,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompareRequest,
    CompareResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelList,
    Timings,
    TokenProb,
    Usage,
)

log = logging.getLogger("ray.serve")
Event = dict[str, Any]  # one event of a replica's stream (deployments.model)
RETRY_ATTEMPTS = 3  # tries in all per request, each on whatever replica Serve picks
RETRY_BACKOFF_S = 0.05  # doubled per retry; the request's deadline bounds the total
OUTAGE_WINDOW_S = 30.0
"""For this long after the ingress saw a replica lost, a full queue (Serve's BackPressureError,
or the replica's own engine queue answering 503) is the outage's doing, not the client's: the
call waits and tries again (every OUTAGE_RETRY_S, within its deadline) until the replacement
replica takes load. Outside the window a full queue is plain overload and the client gets its
503 at once."""
OUTAGE_RETRY_S = 0.25
CORS_ENV = "SLIMSERVE_CORS_ORIGINS"
"""Comma-separated origins allowed to call the API from a browser; unset = CORS off."""
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 503)
}


@serve.deployment(
    name=INGRESS_NAME,
    num_replicas=1,
    max_ongoing_requests=1024,  # above every variant queue combined: they say 503 first
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress()
class Ingress:
    """Routes requests to the variant deployments; holds the catalogue cards."""

    def __init__(
        self,
        models: dict[str, DeploymentHandle],
        catalogue: dict[str, Any],
        settings: dict[str, Any],
    ):
        self.models = models
        self._lost_at = -math.inf  # monotonic time a replica was last seen lost
        self.queues = FullQueues()  # variants whose queue was full a moment ago
        self.settings = IngressSettings.model_validate(settings)
        self.cards = [ModelCard.model_validate(c) for c in catalogue["cards"]]
        self.profile: str = catalogue["profile"]
        self.teacher: str = catalogue["teacher"]
        self.message: str | None = catalogue.get("message")
        self.machine: dict[str, Any] = catalogue.get("machine", {})
        # Read once per replica: a key set in the environment that started Serve.
        self.api_key = os.environ.get(self.settings.api_key_env) or None
        self.cors_origins = cors_origins(os.environ.get(CORS_ENV, ""))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    # -- routing ------------------------------------------------------------------------------

    def handle(self, model: str) -> DeploymentHandle:
        """The deployment serving `model`, or a 404 saying what is deployed (or why not)."""
        if model in self.models:
            return self.models[model]
        deployed = ", ".join(self.models) or "none"
        card = next((c for c in self.cards if c.id == model), None)
        if card is not None:
            msg = f"model {model!r} is not deployed ({card.reason}); deployed: {deployed}"
        elif not self.models and self.message:
            msg = f"model {model!r} does not exist; no model is deployed: {self.message}"
        else:
            msg = f"model {model!r} does not exist; deployed: {deployed}"
        raise ApiError(404, msg, param="model")

    def admit(self, model: str) -> DeploymentHandle:
        """`handle(model)`, or at once the 503 of a queue that was full a moment ago (outside
        the outage window, where a full queue is waited out instead)."""
        handle = self.handle(model)
        if time.monotonic() - self._lost_at >= OUTAGE_WINDOW_S:
            self.queues.check(model)
        return handle

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    def _left(self, deadline: float) -> float:
        return max(0.001, deadline - time.monotonic())

    def _timeout(self) -> ApiError:
        return ApiError(408, f"request timed out after {self.settings.request_timeout_s:g}s")

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
                result = await asyncio.wait_for(_wait(response), self._left(deadline))
                if isinstance(result, dict) and "error" in result:
                    raise replica_error(result["error"])
            except TimeoutError:
                _cancel(response)
                raise self._timeout() from None
            except asyncio.CancelledError:  # the client disconnected: stop the replica's work
                _cancel(response)
                raise
            except Exception as exc:
                lost += isinstance(exc, RETRYABLE)
                if not await self._retry(exc, lost, deadline):
                    raise self._give_up(exc, model) from exc
                continue
            if model is not None:
                self.queues.freed(model)
            return result

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
        if isinstance(exc, OVERLOADED) and now - self._lost_at < OUTAGE_WINDOW_S:
            if now + OUTAGE_RETRY_S >= deadline:
                return False
            await asyncio.sleep(OUTAGE_RETRY_S)  # a replacement replica is on its way
            return True
        if not isinstance(exc, RETRYABLE):
            return False
        self._lost_at = now
        if attempt >= RETRY_ATTEMPTS:
            return False
        pause = RETRY_BACKOFF_S * 2 ** (attempt - 1)
        if time.monotonic() + pause >= deadline:
            return False
        log.warning(
            "replica lost (%s); retry %d of %d", type(exc).__name__, attempt, RETRY_ATTEMPTS - 1
        )
        await asyncio.sleep(pause)
        return True

    async def open_stream(
        self, handle: DeploymentHandle, payload: dict[str, Any], deadline: float, model: str
    ) -> tuple[DeploymentResponseGenerator, list[Event]]:
        """Start a streamed call and wait for the events of its first SSE frame.

        Nothing has reached the client until then (not even the status line), so errors are
        still HTTP 4xx / 503, and a replica lost or a full queue by then is retried exactly like
        a non-streamed call. After it, `sse` ends the stream with an error event instead.
        """
        lost = 0  # tries that met a dead replica
        while True:
            gen = handle.options(stream=True).stream.remote(payload)
            try:
                return gen, await self._first_frame(gen, deadline)
            except TimeoutError:
                _cancel(gen)
                raise self._timeout() from None
            except asyncio.CancelledError:
                _cancel(gen)
                raise
            except Exception as exc:
                _cancel(gen)
                lost += isinstance(exc, RETRYABLE)
                if not await self._retry(exc, lost, deadline):
                    raise self._give_up(exc, model) from exc

    async def _first_frame(self, gen: DeploymentResponseGenerator, deadline: float) -> list[Event]:
        """The replica's events up to the first that makes a frame (a delta or the end)."""
        events: list[Event] = []
        while True:
            try:
                event = await asyncio.wait_for(gen.__anext__(), self._left(deadline))
            except StopAsyncIteration:
                return events
            if event["event"] == "error":
                raise replica_error(event["error"])
            events.append(event)
            if event["event"] != "start":
                return events

    async def sse(
        self,
        gen: DeploymentResponseGenerator,
        first: list[Event],
        fmt: ChunkFormatter,
        deadline: float,
    ) -> AsyncIterator[str]:
        """The SSE body: frames until the replica ends, then `[DONE]`. Leaving early (client
        gone, timeout, error) cancels the replica's generation."""
        finished = False
        try:
            for f in fmt.opening():
                yield f
            for event in first:
                for f in fmt.feed(event):
                    yield f
            while True:
                try:
                    event = await asyncio.wait_for(gen.__anext__(), self._left(deadline))
                except StopAsyncIteration:
                    break
                for f in fmt.feed(event):
                    yield f
            finished = True
        except TimeoutError:
            yield frame(self._timeout().payload())
        except Exception as exc:  # mid-stream: the status line is gone, send an error frame
            log.warning("stream failed for %s: %r", fmt.model, exc)
            if isinstance(exc, RETRYABLE):
                self._lost_at = time.monotonic()  # full queues meanwhile: the outage's doing
            yield frame(stream_error(exc))
        finally:
            if not finished:
                _cancel(gen)
            self.queues.freed(fmt.model)
        yield DONE

    async def generation(
        self, kind: Kind, body: CompletionRequest | ChatCompletionRequest
    ) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
        deadline = self.deadline()
        handle = self.admit(body.model)
        if isinstance(body, ChatCompletionRequest):
            payload = job(body.prompt_text(), sampling(body, [CHAT_STOP]), body.n)
        else:
            payload = job(body.prompt, sampling(body), body.n)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            gen, first = await self.open_stream(handle, payload, deadline, body.model)
            usage = bool(body.stream_options and body.stream_options.include_usage)
            fmt = ChunkFormatter(kind, rid, body.model, body.n, usage)
            return StreamingResponse(
                self.sse(gen, first, fmt, deadline),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self.call(lambda: handle.generate.remote(payload), deadline, body.model)
        usage, timings = Usage(**result["usage"]), Timings(**result["timings"])
        if kind == "chat":
            chat = [
                ChatChoice(
                    index=c["index"],
                    message=ChatMessageOut(content=c["text"]),
                    finish_reason=c["finish_reason"],
                )
                for c in result["choices"]
            ]
            return ChatCompletionResponse(
                id=rid, model=body.model, choices=chat, usage=usage, timings=timings
            )
        choices = [
            CompletionChoice(index=c["index"], text=c["text"], finish_reason=c["finish_reason"])
            for c in result["choices"]
        ]
        return CompletionResponse(
            id=rid, model=body.model, choices=choices, usage=usage, timings=timings
        )

    async def infer(self, body: InferRequest) -> InferResponse:
        t0 = time.perf_counter()
        name = body.model or (self.teacher if self.teacher in self.models else None)
        name = name or next(iter(self.models), self.teacher)
        handle = self.admit(name)
        result = await self.call(
            lambda: handle.next_token.remote(body.prompt, body.top_k, body.max_new_tokens),
            self.deadline(),
            name,
        )
        top = [TokenProb(**t) for t in result["top_k"]]
        return InferResponse(
            model=name,
            next_token=top[0],
            top_k=top,
            continuation=result["continuation"],
            latency_ms=(time.perf_counter() - t0) * 1000,
        )

    def model_list(self) -> ModelList:
        return ModelList(data=self.cards, profile=self.profile, message=self.message)


async def _wait(response: DeploymentResponse) -> Any:
    return await response


def _cancel(response: DeploymentResponse | DeploymentResponseGenerator) -> None:
    """Cancel a replica call, best effort. Serve's `cancel()` raises the call's own error again
    when the call failed before reaching a replica (a full queue, no replica): there is nothing
    to cancel then, and that error must not escape past the retry."""
    with contextlib.suppress(Exception):
        response.cancel()


def cors_origins(value: str) -> list[str]:
    """`SLIMSERVE_CORS_ORIGINS` as a list ("" = CORS off: browsers on other origins are refused)."""
    return [o.strip() for o in value.split(",") if o.strip()]


def create_app(ing: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica (docs at /docs)."""
    app = FastAPI(
        title="slimserve",
        description=(
            "Every built variant of the catalogue behind one OpenAI-compatible API. "
            "`model` picks the variant; `GET /v1/models` lists them."
        ),
        version="0.1.0",
    )
    install(app)
    app.add_middleware(
        Guard,
        api_key=ing.api_key,
        max_body_bytes=ing.settings.max_body_bytes,
        body_timeout_s=ing.settings.body_timeout_s,
        max_pending_bodies=ing.settings.max_pending_bodies,
    )
    if ing.cors_origins:  # outermost, so a browser's preflight (no API key) is answered here
        app.add_middleware(
            CORSMiddleware,
            allow_origins=ing.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest) -> Any:
        """OpenAI completions; `stream: true` answers Server-Sent Events ending in [DONE]."""
        return await ing.generation("completion", body)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        """OpenAI chat completions over the documented template (slimserve.protocol)."""
        return await ing.generation("chat", body)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        """Every catalogue variant: facts, metrics, and whether (or why not) it is deployed."""
        return ing.model_list()

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model_card(model_id: str) -> ModelCard:
        """One catalogue variant (404 for a name the catalogue does not have)."""
        card = next((c for c in ing.cards if c.id == model_id), None)
        if card is None:
            ing.handle(model_id)  # raises the 404 listing what is deployed
        return card  # type: ignore[return-value]

    @app.post("/infer", response_model=InferResponse, responses=ERRORS)
    async def infer(body: InferRequest) -> InferResponse:
        """The older projects' API: top-k next tokens and an optional greedy continuation."""
        return await ing.infer(body)

    @app.post("/compare", response_model=CompareResponse, responses=ERRORS)
    async def compare_route(body: CompareRequest) -> CompareResponse:
        """Run variants one after another on one prompt; timings, speedup and agreement."""
        return await compare.run(ing, body)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness of the ingress (no API key needed) and the deployed variants."""
        return {"status": "ok", "profile": ing.profile, "deployed": list(ing.models)}

    return app
