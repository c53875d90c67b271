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


def test_side_ports_are_rays_names_and_move_to_free_ports(tmp_path):
    """Serve binds HAProxy's metrics and stats ports and the fallback proxy's ports at fixed
    defaults; a bench or test Serve next to a `serve run` must move them, by the names Ray
    reads (a renamed variable would silently bring the clash back)."""
    import yaml

    from bench.run_all import SIDE_PORTS, local_config

    constants = import_module("ray.serve._private.constants")
    for name in SIDE_PORTS:
        assert hasattr(constants, name), name
    config = tmp_path / "serve.yaml"
    kept = {"RAY_SERVE_HAPROXY_STATS_PORT": "18404", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    raw = {
        "controller_options": {"runtime_env": {"env_vars": dict(kept)}},
        "applications": [{"name": "app", "import_path": "x:y"}],
    }
    config.write_text(yaml.safe_dump(raw))
    out = local_config(config, 8123, artifacts_dir=tmp_path)
    env = out["controller_options"]["runtime_env"]["env_vars"]
    assert out["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert {k: env[k] for k in kept} == kept  # what the YAML sets stays
    moved = {n: int(env[n]) for n in SIDE_PORTS if n not in kept}
    assert len(moved) == len(SIDE_PORTS) - 1 and len(set(moved.values())) == len(moved)
    assert all(SIDE_PORTS[n] <= p < 32768 for n, p in moved.items())  # below ephemeral ports
    assert out["applications"][0]["args"] == {"artifacts_dir": str(tmp_path.resolve())}


def test_a_side_port_held_by_another_server_moves_up():
    import socket

    from slimserve.net import port_from

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        taken = held.getsockname()[1]
        held.listen()
        assert port_from(taken) > taken
