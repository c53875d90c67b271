"""Security of the ingress app: the API key guards every route but /healthz (compared in
constant time), CORS is off unless configured, and the body cap holds.

These build the ingress's FastAPI app around a stand-in for the Serve replica and call it
in-process (no Ray), so every route the app has, including FastAPI's own docs routes, is
checked, and a route added later is checked too.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route
from starlette.testclient import TestClient

import deployments.middleware as middleware
from deployments.ingress import cors_origins, create_app
from deployments.settings import IngressSettings
from slimserve.protocol import ModelList

KEY = "sk-unit-3f9a"
ORIGIN = "https://dashboard.example"


def app_for(api_key: str | None = KEY, origins: list[str] | None = None, cap: int = 4096):
    ing = SimpleNamespace(
        api_key=api_key,
        settings=IngressSettings(max_body_bytes=cap),
        cors_origins=origins or [],
        profile="unit",
        models={},
        cards=[],
        model_list=lambda: ModelList(data=[], profile="unit"),
    )
    return create_app(ing)  # type: ignore[arg-type]


def routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute | Route):
            for method in sorted(r.methods or {"GET"}):
                if method != "HEAD":
                    out.append((method, r.path.replace("{model_id}", "student")))
    return out


APP = app_for()
ALL = routes(APP)


def test_every_route_is_listed():
    paths = {p for _, p in ALL}
    assert {"/v1/completions", "/v1/models", "/infer", "/compare", "/healthz", "/docs"} <= paths
    assert {"/openapi.json", "/redoc", "/v1/models/student"} <= paths


@pytest.mark.parametrize("method,path", [r for r in ALL if r[1] != "/healthz"])
@pytest.mark.parametrize("auth", [None, "Bearer nope", f"bearer {KEY}0", f"Token {KEY}", KEY])
def test_api_key_guards_every_route_but_healthz(method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    r = TestClient(APP).request(method, path, headers=headers, json={})
    assert r.status_code == 401, (method, path, r.text)
    assert r.json()["error"]["code"] == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method,path", ALL)
def test_the_key_opens_every_route(method, path):
    # The stand-in has no models: past the guard a route may fail, but never with a 401.
    client = TestClient(APP, raise_server_exceptions=False)
    r = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code != 401, (method, path)


def test_unknown_routes_need_the_key_too():
    client = TestClient(APP)
    assert client.get("/nothing/here").status_code == 401  # no route map for strangers
    assert client.get("/healthz").status_code == 200
    ok = client.get("/nothing/here", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 404


def test_key_is_compared_in_constant_time(monkeypatch):
    seen: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return a == b

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    client = TestClient(app_for())
    assert client.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert seen == [(b"x", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_no_key_configured_means_open():
    assert TestClient(app_for(api_key=None)).get("/v1/models").status_code == 200


def test_cors_is_off_by_default():
    client = TestClient(app_for(api_key=None))
    r = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = client.options(
        "/v1/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers and pre.status_code >= 400


def test_cors_allows_only_the_configured_origins_and_preflight_needs_no_key():
    client = TestClient(app_for(origins=[ORIGIN]))
    pre = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = client.options("/v1/completions", headers={"Origin": ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    other = client.options("/v1/completions", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in other.headers
    r = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401  # CORS is not auth: the key is still needed
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_setting_parses_a_comma_list():
    assert cors_origins("") == [] and cors_origins(" , ") == []
    assert cors_origins(f" {ORIGIN} , http://localhost:8501,") == [ORIGIN, "http://localhost:8501"]


def test_body_cap_before_parsing():
    client = TestClient(app_for(api_key=None, cap=2048))
    big = b'{"model": "m", "prompt": "' + b"x" * 4096 + b'"}'
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
