"""serve_config.yaml's Ray knobs: each one is read by the installed Ray, and `serve run` of the
file really puts HAProxy on the HTTP port.

The other deployments tests start Serve in-process with its Python proxy (conftest.py); here
`serve run` itself runs a copy of serve_config.yaml in a process of its own, with its own
local Ray, the file's `controller_options` untouched and only the ports, the profile and one
variant's size changed. One start (~30-60 s on 2 busy cores) serves every check below.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from serve_helpers import PROFILE, TORCH_VARIANTS, build_tiny_store, wait_until

from deployments.preflight import config_env, preflight
from slimserve.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.yaml"
SIDE_PORT_VARS = (
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
START_TIMEOUT_S = 240


def knobs() -> dict[str, str]:
    return config_env(yaml.safe_load(SERVE_CONFIG.read_text()))


# ---------------------------------------------------------------- every knob exists in Ray


def test_every_ray_knob_in_serve_config_is_read_by_the_installed_ray():
    """A renamed or removed variable would be ignored without a word: look for each name in
    the installed Ray Serve's source, where it is read."""
    import ray.serve

    serve_src = Path(ray.serve.__file__).parent
    source = "\n".join(p.read_text(errors="replace") for p in serve_src.rglob("*.py"))
    assert knobs(), "serve_config.yaml sets no controller env vars"
    for name in knobs():
        assert name.startswith("RAY_SERVE_"), name
        assert re.search(rf"""["']{name}["']""", source), f"the installed Ray never reads {name}"


def test_the_knobs_give_the_request_path_serve_config_describes():
    """What Ray's constants become under the file's env vars (in a fresh interpreter, where
    they are read): the throughput switch's settings and the explicit ones on top."""
    code = (
        "import json; from ray.serve._private import constants as c; print(json.dumps({k: "
        "getattr(c, k) for k in dir(c) if k.startswith(('RAY_SERVE_', 'CONTROL_LOOP'))}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | knobs()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    c = json.loads(out.stdout.strip().splitlines()[-1])
    assert c["RAY_SERVE_THROUGHPUT_OPTIMIZED"] is True
    # what the throughput switch covers (no explicit variable for these any more)
    assert c["RAY_SERVE_USE_GRPC_BY_DEFAULT"] is True
    assert c["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] is False
    assert c["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] is False
    assert c["RAY_SERVE_ENABLE_DIRECT_INGRESS"] is True
    # the explicit ones
    assert c["RAY_SERVE_LOG_TO_STDERR"] is True
    assert c["RAY_SERVE_PROXY_USE_GRPC"] is True
    assert c["RAY_SERVE_ENABLE_HA_PROXY"] is True
    assert c["RAY_SERVE_HAPROXY_NBTHREAD"] == 1
    assert c["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == 5.0
    assert c["CONTROL_LOOP_INTERVAL_S"] == 0.5
    assert c["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == 1000


# ---------------------------------------------------------------- `serve run` of the file


def local_copy(base: Path, store_root: Path, profile_path: Path) -> tuple[Path, int]:
    """serve_config.yaml with free ports, the tiny profile, and only `student` deployed."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    env = config["controller_options"]["runtime_env"]["env_vars"]
    for name in SIDE_PORT_VARS:  # a `serve run` on this machine may hold Ray's defaults
        env.setdefault(name, str(free_port()))
    (app,) = config["applications"]
    app["args"].update(config=str(profile_path), artifacts_dir=str(store_root))
    app["args"]["defaults"].update(num_cpus=0.1, max_batch_size=4, stream_min_interval_ms=0)
    app["args"]["variants"] = {v: {"enabled": v == "student"} for v in TORCH_VARIANTS}
    path = base / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, port


def get(url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def models(url: str) -> list[str]:
    try:
        _, _, body = get(f"{url}/v1/models", timeout=5)
    except OSError:
        return []
    return [m["id"] for m in json.loads(body)["data"] if m.get("deployed")]


def stop_serve_run(proc: subprocess.Popen[bytes], tree: list[psutil.Process]) -> None:
    """Ctrl-C (Serve and its Ray shut down cleanly), then end what is left of its tree."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in tree:
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("haproxy-front")
    profile_path = base / "deploytest.yaml"
    profile_path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    build_tiny_store(base / "store", profile_path)
    config_path, port = local_copy(base, base / "store", profile_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    # Ray gives a new proxy (HAProxy's manager) 3 readiness checks of 5 s before it kills it
    # and `serve run` fails; on 2 cores shared with other tests that start can take longer.
    # The process env, not the YAML: the file's own options stay as they are.
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "30"
    log = base / "serve_run.log"
    serve_bin = Path(sys.executable).with_name("serve")
    t0 = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            # `--address local`: a Ray of its own even when this machine records another one
            # (`ray start` writes /tmp/ray/ray_current_cluster, which `serve run` would join)
            [str(serve_bin), "run", "--address", "local", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    tree: list[psutil.Process] = []
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve run exited {proc.returncode}:\n{tail(log)}")
            return "student" in models(url)

        wait_until(up, timeout=START_TIMEOUT_S, interval=0.5, what="serve run to serve student")
        tree = _tree(proc.pid)
        print(f"serve run of serve_config.yaml up in {time.monotonic() - t0:.1f}s")
        yield {
            "url": url,
            "port": port,
            "pid": proc.pid,
            "config": yaml.safe_load(config_path.read_text()),
        }
    finally:
        # HAProxy reloads replace its process: what runs now, and what ran at the start
        seen = {p.pid: p for p in [*tree, *_tree(proc.pid)]}
        stop_serve_run(proc, list(seen.values()))


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def listeners(port: int) -> list[tuple[int, str, list[tuple[int, str]]]] | None:
    """(pid, name, its ancestors' (pid, name)) of each process listening on `port`; None
    while one of them is exiting (a HAProxy reload hands the socket to a new process)."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN or not c.laddr or c.laddr.port != port:
            continue
        try:
            proc = psutil.Process(c.pid)
            out.append((proc.pid, proc.name(), [(p.pid, p.name()) for p in proc.parents()]))
        except psutil.Error:
            return None
    return out or None


@pytest.mark.timeout(START_TIMEOUT_S + 120)
def test_haproxy_is_the_process_listening_on_the_http_port(served: dict[str, Any]):
    """The listening socket on the HTTP port belongs to `haproxy`, started by Ray's
    HAProxyManager under this `serve run`, and not to Serve's Python proxy."""
    found = wait_until(
        lambda: listeners(served["port"]), timeout=30, what="the HTTP port's listeners"
    )
    for pid, name, parents in found:
        assert name == "haproxy", (pid, name)
        assert parents[0][1].startswith("ray::HAProxyMan"), parents[0]
        # this serve run's (its Ray's raylet started the manager), not another one's
        assert served["pid"] in {p for p, _ in parents}, parents
    status, _, body = get(f"{served['url']}/-/healthz")  # Serve's health route, at HAProxy
    assert status == 200, body


@pytest.mark.timeout(120)
def test_completions_and_streams_are_answered_through_haproxy(served: dict[str, Any]):
    url = served["url"]
    body = {"model": "student", "prompt": "The quick brown", "max_tokens": 4}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] == 4, answer
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = [line for line in resp.read().decode().splitlines() if line.startswith("data:")]
    assert frames[-1] == "data: [DONE]", frames
    texts = [json.loads(f[5:])["choices"][0]["text"] for f in frames[:-1]]
    assert len(texts) >= 2 and all(isinstance(t, str) for t in texts), frames


@pytest.mark.timeout(60)
def test_preflight_leaves_a_running_serves_haproxy_alone(served: dict[str, Any]):
    """The preflight's other side, for real: this Serve's HAProxy is named, never stopped."""
    import io

    out = io.StringIO()
    assert preflight(served["config"], out=out) == 1
    said = out.getvalue()
    assert f"HTTP port {served['port']}" in said and "Ray Serve that is running" in said, said
    assert models(served["url"]) == ["student"]  # still serving
