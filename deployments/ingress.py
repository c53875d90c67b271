"""The one HTTP ingress: OpenAI-compatible routes, the older `/infer`, and the live `/compare`.

A FastAPI app behind `@serve.ingress`, built per replica by `__serve_build_asgi_app__` so its
routes and middleware see this replica's settings (the API key, the body cap). Every variant
is a separate deployment reached through a `DeploymentHandle`; `model` in a request picks it.
This module holds the Serve deployment and its routes only: generation and the SSE body are
deployments.serving's, the replica calls (deadline, retries, overload, the outage window and
how each failure maps to an HTTP error) deployments.replica_client's, `/compare`
deployments.compare's. CORS is off unless SLIMSERVE_CORS_ORIGINS lists origins.

At start the ingress asks Serve's controller where the HTTP front listens
(`http_options.host`): it warns when that is not loopback and no API key is set, and, unless
`stream_channel_host` says otherwise, its events inbox listens on loopback too when the front
is loopback on a one-node cluster (deployments.channel `bind_host`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import compare, serving
from deployments.channel import Inbox, bind_host, is_loopback
from deployments.errors import ApiError, install
from deployments.middleware import Guard
from deployments.replica_client import ReplicaClient
from deployments.settings import INGRESS_NAME, IngressSettings
from deployments.sse import Kind
from slimserve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompareRequest,
    CompareResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    InferRequest,
    InferResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger("ray.serve")
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
        self.settings = IngressSettings.model_validate(settings)
        inbox = None
        if self.settings.stream_channel:
            inbox = Inbox(host=self.settings.stream_channel_host, locate=self._inbox_host)
        self.client = ReplicaClient(self.settings.request_timeout_s, inbox=inbox)
        self.cards = [ModelCard.model_validate(c) for c in catalogue["cards"]]
        self.profile: str = catalogue["profile"]
        self.teacher: str = catalogue["teacher"]
        self.message: str | None = catalogue.get("message")
        self.machine: dict[str, Any] = catalogue.get("machine", {})
        # Read once per replica: a key set in the environment that started Serve.
        self.api_key = os.environ.get(self.settings.api_key_env) or None
        self.cors_origins = cors_origins(os.environ.get(CORS_ENV, ""))
        self._front: tuple[str | None, int] | None = None  # (HTTP host, alive nodes), once known
        self._checked: asyncio.Task[None] | None = None  # kept: a task nobody holds may vanish
        with contextlib.suppress(RuntimeError):  # no event loop: not started by Serve
            self._checked = asyncio.get_running_loop().create_task(self._check_front())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)

    # -- where the front listens ------------------------------------------------------------

    async def front(self) -> tuple[str | None, int]:
        """(the host Serve's HTTP front binds, the cluster's alive nodes); (None, 0) when
        Serve's controller cannot say."""
        if self._front is None:
            try:
                from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

                def look() -> tuple[Any, int]:
                    actor = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
                    return actor, sum(1 for n in ray.nodes() if n.get("Alive"))

                controller, nodes = await asyncio.to_thread(look)
                options = await controller.get_http_config.remote()
                self._front = (str(options.host), nodes)
            except Exception as exc:  # no controller to ask (outside Serve)
                log.info("ingress: where the HTTP front listens is unknown (%r)", exc)
                self._front = (None, 0)
        return self._front

    async def _check_front(self) -> None:
        host, _ = await self.front()
        if host is not None and not is_loopback(host) and not self.api_key:
            log.warning(
                "ingress: serving on %s without an API key: anyone who can reach the port may "
                "generate; set $%s (args.ingress.api_key_env) or bind http_options.host to "
                "127.0.0.1",
                host,
                self.settings.api_key_env,
            )

    async def _inbox_host(self) -> str | None:
        host, nodes = await self.front()
        return bind_host(self.settings.stream_channel_host, host, nodes)

    # -- hooks for the reliability runs (through a Serve handle; not on HTTP) ------------------

    async def cut_stream_connections(self) -> int:
        """Close every replica's connection to this ingress replica's events inbox, from the
        ingress's side, as a network blip would; returns how many were open (0 without an
        inbox). Streams that had not sent their first frame are sent again; the others end
        with an error event and `[DONE]`. The replicas connect again on their next call."""
        inbox = self.client.inbox
        return inbox.cut() if inbox is not None else 0

    def stream_inbox_address(self) -> str | None:
        """The "host:port" this ingress replica's events inbox listens on; None before its
        first streamed request, or when it streams through Serve (`stream_channel: false`)."""
        inbox = self.client.inbox
        return inbox.address if inbox is not None else None

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
        """`handle(model)`, or at once the 503 of a queue that was full a moment ago."""
        handle = self.handle(model)
        self.client.admit(model)
        return handle

    async def generation(
        self, kind: Kind, body: CompletionRequest | ChatCompletionRequest
    ) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
        deadline = self.client.deadline()
        handle = self.admit(body.model)
        return await serving.completion(self.client, handle, kind, body, deadline)

    async def infer(self, body: InferRequest) -> InferResponse:
        name = body.model or (self.teacher if self.teacher in self.models else None)
        name = name or next(iter(self.models), self.teacher)
        return await serving.infer(self.client, self.admit(name), name, body)

    def model_list(self) -> ModelList:
        return ModelList(data=self.cards, profile=self.profile, message=self.message)


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
        return await compare.run(
            ing.client, ing, body, warmup_tokens=ing.settings.compare_warmup_tokens
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness of the ingress (no API key needed) and the deployed variants."""
        return {"status": "ok", "profile": ing.profile, "deployed": list(ing.models)}

    return app
