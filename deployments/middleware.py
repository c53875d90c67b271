"""The ingress's front door, as plain ASGI (no BaseHTTPMiddleware: it breaks streaming and
client-disconnect cancellation): API key, JSON-only bodies, a body size cap and a body-read
deadline.

Order: the API key first (an unauthenticated caller learns nothing else), then the media type,
then the size. The body is read here, up to the cap, and replayed to the app, so an oversized
or endless chunked upload costs at most `max_body_bytes` of memory before its 413.

Reading the body is where a client can hold the server without sending anything: Serve's
HTTP proxy (uvicorn) forwards a request as soon as its headers are in, and this replica pulls
the body from the proxy message by message (`receive()`), so a `Content-Length` larger than
what comes, or a few bytes a second, would keep the request, its connection and an ingress
slot forever. Hence two limits, both answered 408 with `Connection: close`:

* `body_timeout_s`: the whole body must be in within this many seconds of the request
  reaching the ingress;
* `max_pending_bodies`: at most this many requests may be reading their body at once; one
  more, and the request that has been sending longest gets its 408 at once. A normal client
  sends its body with its headers and is done in one message, so a crowd of slow senders
  (slowloris) evicts its own oldest members, not the clients that are quick.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import envelope
from deployments.messages import error

BODY_METHODS = {"POST", "PUT", "PATCH"}
BODY_TIMEOUT_S = 5.0
MAX_PENDING_BODIES = 128


class _Reader:
    """One request reading its body: its deadline, and whether a newer request evicted it."""

    __slots__ = ("deadline", "evicted")

    def __init__(self, deadline: asyncio.Timeout):
        self.deadline = deadline
        self.evicted = False


class Guard:
    """ASGI middleware: auth (`Authorization: Bearer <key>`), JSON-only, body cap."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_pending_bodies: int = MAX_PENDING_BODIES,
        open_paths: frozenset[str] = frozenset({"/healthz"}),
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_pending_bodies = max_pending_bodies
        self.open_paths = open_paths
        self.readers: dict[int, _Reader] = {}  # insertion order = oldest first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = route_path(scope) or "/"
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
        body = await self._read_body(receive)
        if isinstance(body, dict):  # an error to answer
            await _reply(send, body)
        elif body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | dict[str, Any] | None:
        """The whole body; an error to answer (413, 408); None when the client left."""
        body = bytearray()
        reader: _Reader | None = None
        try:
            async with asyncio.timeout(self.body_timeout_s) as deadline:
                reader = self._admit(deadline)
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None  # the client left before sending its body
                    body += message.get("body", b"")
                    if len(body) > self.max_body_bytes:
                        return self._too_large()
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            if reader is not None and reader.evicted:
                msg = (
                    f"request body still incomplete while {self.max_pending_bodies} newer "
                    "requests were sending theirs; send the body with the request"
                )
            else:
                msg = f"request body not received within {self.body_timeout_s:g}s"
            return error(408, msg, headers={"Connection": "close"})
        finally:
            if reader is not None:
                self.readers.pop(id(reader), None)

    def _admit(self, deadline: asyncio.Timeout) -> _Reader:
        """Register a body reader; past `max_pending_bodies`, end the oldest one's wait now."""
        while len(self.readers) >= self.max_pending_bodies:
            oldest = self.readers.pop(next(iter(self.readers)))
            if not oldest.deadline.expired():  # else its own 408 is already on its way
                oldest.evicted = True
                oldest.deadline.reschedule(asyncio.get_running_loop().time())
        reader = _Reader(deadline)
        self.readers[id(reader)] = reader
        return reader

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or self.api_key is None:
            return False
        return hmac.compare_digest(token.strip(), self.api_key)  # constant time

    def _too_large(self) -> dict[str, Any]:
        return error(413, f"request body larger than {self.max_body_bytes} bytes")


def route_path(scope: Scope) -> str:
    """The request's path inside the app: `path` less the `root_path` it is mounted under
    (Serve mounts an application under its `route_prefix`). The ASGI spec's two fields only;
    this is the rule Starlette's router matches routes with, so `open_paths` name the same
    paths as the routes (a test holds the two to the same answers)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


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
