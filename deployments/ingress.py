"""The one HTTP ingress: OpenAI-compatible routes, the older `/infer`, and the live `/compare`.

A FastAPI app behind `@serve.ingress`, built per replica by `__serve_build_asgi_app__` so its
routes and middleware see this replica's settings (the API key, the body cap). Every variant
is a separate deployment reached through a `DeploymentHandle`; `model` in a request picks it.
This module holds the Serve deployment and its routes only: generation and the SSE body are
deployments.serving's, the replica calls (deadline, retries, overload, the outage window and
how each failure maps to an HTTP error) deployments.replica_client's, `/compare`
deployments.compare's. CORS is off unless SLIMSERVE_CORS_ORIGINS lists origins.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import compare, serving
from deployments.channel import Inbox
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
        inbox = Inbox() if self.settings.stream_channel else None
        self.client = ReplicaClient(self.settings.request_timeout_s, inbox=inbox)
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
