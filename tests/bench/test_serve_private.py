"""`bench.run_all.deploy_config` uses Ray Serve's private controller client (what `serve run`
uses): this fails, without starting Ray, when a Ray upgrade moves or renames it."""

from __future__ import annotations

import inspect
from importlib import import_module

from bench.run_all import SERVE_PRIVATE_API


def test_serve_start_and_deploy_apps_are_where_deploy_config_looks():
    api = import_module(SERVE_PRIVATE_API)
    params = inspect.signature(api.serve_start).parameters
    assert {"http_options", "proxy_location", "controller_options"} <= set(params)
    client = inspect.signature(api.serve_start).return_annotation
    if isinstance(client, str):  # postponed annotations
        client = import_module("ray.serve._private.client").ServeControllerClient
    assert callable(getattr(client, "deploy_apps", None))
