"""A body that never arrives, or arrives a few bytes a second: 408 within the body-read
timeout, while other clients are served.

The first tests drive the ASGI middleware directly (fast, no Serve); the others send raw HTTP
through Serve's proxy to the `main` application, whose ingress runs the shipped defaults
(`body_timeout_s` 5 s, `max_pending_bodies` 128). Their sockets time out after 30 s, so a
server that never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from typing import Any

import httpx
import pytest
from serve_helpers import ServeUrls

from deployments.middleware import BODY_TIMEOUT_S, MAX_PENDING_BODIES, Guard

NORMAL = {"model": "student", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
MARGIN_S = 3.0  # the proxy hop and a loaded 2-core machine, on top of the timeout


# ------------------------------------------------------------------ the middleware, no Serve


async def _echo(scope, receive, send) -> None:
    body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"5")],
    }


class Client:
    """One request against a Guard: `parts` are the body messages, then it stalls."""

    def __init__(self, guard: Guard, *parts: bytes, stall: bool = True):
        self.sent: list[dict[str, Any]] = []
        self.messages = [
            {"type": "http.request", "body": p, "more_body": stall or i < len(parts) - 1}
            for i, p in enumerate(parts)
        ]
        self.task = asyncio.ensure_future(guard(_scope(), self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()  # a client that never sends the rest
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    def error(self) -> dict[str, Any]:
        return json.loads(self.sent[1]["body"])["error"]


@pytest.mark.timeout(10)
def test_a_short_body_gets_408_after_the_body_timeout():
    async def main() -> tuple[Client, float]:
        guard = Guard(_echo, api_key=None, max_body_bytes=1024, body_timeout_s=0.3)
        t0 = time.monotonic()
        short = Client(guard, b"{}")  # Content-Length: 5, two bytes sent
        await short.task
        return short, time.monotonic() - t0

    short, took = asyncio.run(main())
    assert short.status == 408 and 0.3 <= took < 2.0
    headers = dict(short.sent[0]["headers"])
    assert headers[b"connection"] == b"close"
    assert short.error() == {
        "message": "request body not received within 0.3s",
        "type": "timeout_error",
        "param": None,
        "code": 408,
    }


@pytest.mark.timeout(10)
def test_past_the_cap_the_oldest_pending_body_is_answered_at_once():
    async def main() -> tuple[list[Client], Client, int]:
        guard = Guard(
            _echo, api_key=None, max_body_bytes=1024, body_timeout_s=60, max_pending_bodies=2
        )
        slow = []
        for _ in range(3):
            slow.append(Client(guard, b"{"))
            while len(guard.readers) < min(len(slow), 2):  # this one is reading its body
                await asyncio.sleep(0)
        await slow[0].task  # evicted by the third, long before its 60 s
        quick = Client(guard, b"{}", stall=False)  # a whole body at once
        await quick.task
        await slow[1].task  # the quick one evicted the next oldest on its way in
        return slow, quick, len(guard.readers)

    slow, quick, pending = asyncio.run(main())
    assert slow[0].status == 408 and "newer requests" in slow[0].error()["message"]
    assert quick.status == 200 and quick.sent[1]["body"] == b"{}"
    assert slow[1].status == 408
    assert slow[2].status is None and pending == 1  # still within its time


# ------------------------------------------------------------------ through Serve's proxy


def _open(url: str, declared: int, first: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
        + first
    )
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read one response until the server closes (it sends `Connection: close`)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def _served(url: str) -> bool:
    r = httpx.post(f"{url}/v1/completions", json=NORMAL, timeout=30)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def _assert_408(status: int, headers: dict[str, str], body: dict[str, Any], message: str) -> None:
    assert status == 408, body
    assert headers["connection"] == "close"
    assert body["error"]["code"] == 408 and body["error"]["type"] == "timeout_error"
    assert message in body["error"]["message"], body


def test_short_body_gets_408_through_serve_while_a_normal_client_is_served(
    serve_urls: ServeUrls,
):
    t0 = time.monotonic()
    sock = _open(serve_urls.main, 5, b"{}")
    assert _served(serve_urls.main)
    assert not select.select([sock], [], [], 0)[0]  # still waiting for its body meanwhile
    status, headers, body = _answer(sock)
    took = time.monotonic() - t0
    _assert_408(status, headers, body, f"not received within {BODY_TIMEOUT_S:g}s")
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + MARGIN_S, took


def test_slow_sender_gets_408_within_the_timeout(serve_urls: ServeUrls):
    """Four bytes a second of a valid body that would take 20 s to arrive."""
    body = json.dumps({**NORMAL, "prompt": "x" * 40}).encode()
    t0 = time.monotonic()
    sock = _open(serve_urls.main, len(body), body[:2])
    sent = 2
    # Two more bytes whenever half a second passes without an answer, until half a second
    # before the deadline: bytes that reach the server just as it closes after its 408 are
    # unread there, so its kernel answers them with a reset, which can drop the 408 before
    # this client reads it. The body stays unfinished either way.
    last_send = t0 + BODY_TIMEOUT_S - 0.5
    while not select.select([sock], [], [], 0.5)[0] and sent < len(body):
        if time.monotonic() < last_send:
            sock.sendall(body[sent : sent + 2])
            sent += 2
    assert sent < len(body) / 2
    status, headers, answer = _answer(sock)
    took = time.monotonic() - t0
    _assert_408(status, headers, answer, f"not received within {BODY_TIMEOUT_S:g}s")
    assert took < BODY_TIMEOUT_S + MARGIN_S, took


def test_a_crowd_of_short_bodies_evicts_its_oldest_and_normal_clients_are_served(
    serve_urls: ServeUrls,
):
    crowd = MAX_PENDING_BODIES + 40
    t0 = time.monotonic()
    socks = [_open(serve_urls.main, 5, b"{}") for _ in range(crowd)]
    assert _served(serve_urls.main) and _served(serve_urls.main)
    answers = [_answer(s) for s in socks]
    took = time.monotonic() - t0
    for status, headers, body in answers:
        _assert_408(status, headers, body, "request body")
    evicted = sum("newer requests" in body["error"]["message"] for _, _, body in answers)
    assert evicted >= crowd - MAX_PENDING_BODIES, evicted
    assert took < BODY_TIMEOUT_S + MARGIN_S + 5, took
