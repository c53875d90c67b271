"""One OpenAI-shaped error envelope for every failure the ingress answers.

`{"error": {"message", "type", "param", "code"}}` with `code` = the HTTP status. FastAPI's own
422 becomes a 400 naming the offending field in `param` (OpenAI clients expect 400); Starlette's
404 / 405 and anything unexpected (500, logged) get the same envelope, so a client parses one
shape whatever went wrong.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.channel import ChannelLost
from deployments.messages import error
from slimserve.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An error the ingress answers as an envelope (raise it from any route)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.data = error(status, message, param=param, type=type, headers=headers)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> ApiError:
        """From `deployments.messages.error(...)` as a replica returned it."""
        return cls(
            data["status"],
            data["message"],
            param=data.get("param"),
            type=data.get("type"),
            headers=data.get("headers"),
        )

    def response(self) -> JSONResponse:
        return error_response(self.data)

    def payload(self) -> dict[str, Any]:
        """The envelope as a dict (for an SSE error event)."""
        return envelope(self.data)


def envelope(data: dict[str, Any]) -> dict[str, Any]:
    body = ErrorBody(
        message=data["message"], type=data["type"], param=data.get("param"), code=data["status"]
    )
    return ErrorResponse(error=body).model_dump()


def error_response(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(envelope(data), status_code=data["status"], headers=data.get("headers"))


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages.0.content"; the bare body -> None.

    Pydantic names the member of a union that failed ("prompt", "list[int]", 0) or a
    constrained type ("constrained-str"): those tags are dropped, so `param` is the request's
    own field path.
    """
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Our field names never hold "-" or "[": those are pydantic's union-member tags.
    parts = [p for p in parts if p not in _TYPE_TAGS and not re.search(r"[-\[]", p)]
    return ".".join(parts) or None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(exc: RequestValidationError) -> dict[str, Any]:
    """FastAPI's 422 as a 400: `param` names the first bad field, the message lists them all."""
    errors = exc.errors()
    lines, params = [], []
    for err in errors:
        kind = err.get("type", "")
        if kind == "json_invalid":
            ctx = err.get("ctx") or {}
            lines.append(f"body is not valid JSON ({ctx.get('error', 'parse error')})")
            continue
        param = _param(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        field, _, rest = msg.partition(": ")
        if param is None and rest and field.isidentifier():  # "messages: ..." from a model rule
            param, msg = field, rest
        params.append(param)
        where = param or "request body"
        got = "" if kind == "missing" else f" (got {_short(err.get('input'))})"
        lines.append(f"{where}: {msg}{got}")
    first = next((p for p in params if p), None)
    return error(400, "; ".join(lines) or "invalid request", param=first)


def install(app: FastAPI) -> None:
    """Register the envelope handlers on `app`."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(error(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(error(500, f"internal error: {type(exc).__name__}"))


# -- Serve's failures of a replica call, as HTTP errors -------------------------------------

RETRYABLE = (RayActorError, DeploymentUnavailableError, ChannelLost)
"""A replica died or is unreachable (ActorDiedError, ActorUnavailableError), or the connection
that carried a stream's events was lost (deployments.channel): safe to resend."""


class ReplicaOverloaded(Exception):
    """The replica's own engine queue was full (its 503 error reply), as an exception so the
    retry policy treats it like Serve's BackPressureError."""

    def __init__(self, data: dict[str, Any]):
        super().__init__(data["message"])
        self.data = data


OVERLOADED = (BackPressureError, ReplicaOverloaded)


def replica_error(data: dict[str, Any]) -> Exception:
    """A replica's error reply: 503 (its queue is full) may be retried, the rest is final."""
    return ReplicaOverloaded(data) if data["status"] == 503 else ApiError.from_data(data)


def stream_error(exc: Exception) -> dict[str, Any]:
    """The error event of a stream that broke after its first frame (then `[DONE]` follows).

    A lost replica or a lost events connection is a 503 (retry the request); anything else is
    a 500.
    """
    if isinstance(exc, ChannelLost):
        msg = f"the connection carrying this stream was lost ({exc}); retry the request"
        return envelope(error(503, msg))
    if isinstance(exc, RETRYABLE):
        msg = f"the replica serving this stream was lost ({type(exc).__name__}); retry the request"
        return envelope(error(503, msg))
    return envelope(error(500, f"generation failed: {type(exc).__name__}"))


def unavailable(exc: Exception) -> Exception:
    """Serve's overload / failure exceptions as 503s; anything else stays a 500."""
    if isinstance(exc, ReplicaOverloaded):
        return ApiError.from_data(exc.data)
    if isinstance(exc, BackPressureError):
        retry = max(1, math.ceil(exc.retry_after_s or 1))
        return ApiError(
            503,
            f"server overloaded: {exc.message} Retry later.",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, RETRYABLE):
        return ApiError(503, f"model unavailable ({type(exc).__name__}); retry later")
    return exc
