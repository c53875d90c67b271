"""The ingress's front door, as plain ASGI (no BaseHTTPMiddleware: it breaks streaming and
client-disconnect cancellation): API key, JSON-only bodies and a body size cap.

Order: the API key first (an unauthenticated caller learns nothing else), then the media type,
then the size. The body is read here, up to the cap, and replayed to the app, so an oversized
or endless chunked upload costs at most `max_body_bytes` of memory before its 413.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import envelope
from deployments.messages import error

BODY_METHODS = {"POST", "PUT", "PATCH"}


class Guard:
    """ASGI middleware: auth (`Authorization: Bearer <key>`), JSON-only, body cap."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        open_paths: frozenset[str] = frozenset({"/healthz"}),
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = get_route_path(scope) or "/"
        needs_key = self.api_key is not None and path not in self.open_paths
        if needs_key and not self._authorized(headers.get("authorization", b"")):
            msg = "missing or invalid API key: send `Authorization: Bearer <key>`"
            await _reply(send, error(401, msg, headers={"WWW-Authenticate": "Bearer"}))
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        media = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media != "application/json":
            shown = media or "none"
            msg = f"Content-Type must be application/json (got {shown})"
            await _reply(send, error(415, msg, param="Content-Type"))
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _reply(send, self._too_large())
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _reply(send, self._too_large())
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or self.api_key is None:
            return False
        return hmac.compare_digest(token.strip(), self.api_key)  # constant time

    def _too_large(self) -> dict[str, Any]:
        return error(413, f"request body larger than {self.max_body_bytes} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the buffered body once, then the client's later messages
    (so the app still hears `http.disconnect`)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, data: dict[str, Any]) -> None:
    payload = json.dumps(envelope(data)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in (data.get("headers") or {}).items()]
    await send({"type": "http.response.start", "status": data["status"], "headers": headers})
    await send({"type": "http.response.body", "body": payload})
