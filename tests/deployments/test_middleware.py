"""The guard's route path agrees with Starlette's router, so `open_paths` (the routes that need
no API key) name exactly the routes the app serves, mounted under a prefix or not."""

from __future__ import annotations

import pytest
from starlette.responses import PlainTextResponse
from starlette.routing import Match, Route

from deployments.middleware import route_path

CASES = [
    ("/healthz", ""),
    ("/retry/healthz", "/retry"),  # Serve mounts an application under its route_prefix
    ("/retry", "/retry"),
    ("/retryx/healthz", "/retry"),  # a prefix that only looks like the mount
    ("/other/healthz", "/retry"),
    ("/healthz/", ""),
    ("/v1/models", "/retry"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("path", "root"), CASES)
def test_route_path_matches_the_route_starlette_would_pick(path: str, root: str):
    route = Route("/healthz", PlainTextResponse)
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root}
    starlette_matches = route.matches(scope)[0] == Match.FULL
    assert (route_path(scope) == "/healthz") == starlette_matches, (path, root)


@pytest.mark.timeout(10)
def test_route_path_strips_the_mount_prefix():
    assert route_path({"path": "/retry/v1/models", "root_path": "/retry"}) == "/v1/models"
    assert route_path({"path": "/retry", "root_path": "/retry"}) == ""
    assert route_path({"path": "/retryx", "root_path": "/retry"}) == "/retryx"
    assert route_path({"path": "/v1/models"}) == "/v1/models"
