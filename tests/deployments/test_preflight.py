"""`python -m deployments.preflight`: a HAProxy left by a dead Ray is stopped, nothing else is.

No Ray here: each case runs real processes that look to the preflight the way Ray's do. A
"HAProxy" is a Python process started through a symlink named `haproxy` (so its process name
is `haproxy`) with Ray's command line (`-db -f <dir>/<node id>/haproxy.cfg`), listening on a
port; a "Ray worker" parent is one started through a symlink named `ray::HAProxyManager`, a
"raylet" one named `raylet` with `--node_id=...`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from serve_helpers import wait_until

from deployments.preflight import (
    HAPROXY_CONFIG_DEFAULT,
    HAPROXY_CONFIG_ENV,
    SIDE_PORTS,
    main,
    preflight,
    ray_haproxy_node,
)
from slimserve.net import free_port

pytestmark = pytest.mark.timeout(60)

NODE = "8ac3efccf61705faed3d1f38e5f39db79c05a258d4b448ded6311f6a"
PYTHON = os.path.realpath(sys.executable)  # the interpreter itself, not the venv's link
PYTHON_VENV = sys.executable
LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "time.sleep(600)\n"
)
# Starts argv[1:] in a new session and exits at once: the child is orphaned (adopted by init).
ORPHAN = (
    "import subprocess, sys\n"
    "d = subprocess.DEVNULL\n"
    "p = subprocess.Popen(sys.argv[1:], start_new_session=True, stdout=d, stderr=d)\n"
    "print(p.pid, flush=True)\n"
)
# Starts argv[1:] and waits for it, like Ray's HAProxyManager with its haproxy.
PARENT = "import subprocess, sys\nsubprocess.Popen(sys.argv[1:]).wait()\n"


def named(tmp_path: Path, name: str) -> str:
    """A link to the interpreter whose process name is `name` (the kernel takes the name of the
    file that was executed)."""
    link = tmp_path / "bin" / name
    link.parent.mkdir(exist_ok=True)
    if not link.exists():
        link.symlink_to(PYTHON)
    return str(link)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_to_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Procs:
    """Processes a test starts, each ended by its pid when the test ends."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def add(self, pid: int) -> int:
        self.pids.append(pid)
        return pid

    def end(self) -> None:
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.end()


@pytest.fixture
def layout(tmp_path: Path) -> dict:
    """A serve config like serve_config.yaml (HAProxy on), every port free, Ray's HAProxy
    config file under tmp_path."""
    cfg = tmp_path / "haproxy-serve" / "haproxy.cfg"
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", HAPROXY_CONFIG_ENV: str(cfg)}
    env |= {name: str(free_port()) for name in SIDE_PORTS}
    port = free_port()
    config = {
        "controller_options": {"runtime_env": {"env_vars": env}},
        "http_options": {"host": "127.0.0.1", "port": port},
    }
    return {"config": config, "port": port, "cfg": cfg, "stats": int(env[next(iter(SIDE_PORTS))])}


def haproxy_argv(tmp_path: Path, layout: dict, node: str = NODE) -> list[str]:
    ray_cfg = layout["cfg"].parent / node / layout["cfg"].name
    return [
        named(tmp_path, "haproxy"),
        "-c",
        LISTEN,
        str(layout["port"]),
        "-db",
        "-f",
        str(ray_cfg),
    ]


def start_orphan(procs: Procs, argv: list[str]) -> int:
    out = subprocess.run([PYTHON, "-c", ORPHAN, *argv], capture_output=True, text=True, timeout=20)
    return procs.add(int(out.stdout.split()[0]))


def run(config: dict, clean: bool = True) -> tuple[int, str]:
    out = io.StringIO()
    return preflight(config, clean=clean, out=out), out.getvalue()


def test_rays_haproxy_is_recognised_by_its_command_line():
    cfg = "/tmp/haproxy-serve/haproxy.cfg"
    bin_ = "/x/ray_haproxy/bin/haproxy"
    seen = [bin_, "-db", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg", "-dR", "-sf", "8719"]
    assert ray_haproxy_node("haproxy", seen, cfg) == NODE
    assert ray_haproxy_node("haproxy", [bin_, "-db", "-f", cfg], cfg) == ""
    assert ray_haproxy_node("haproxy", ["haproxy", "-f", "/etc/haproxy/haproxy.cfg"], cfg) is None
    assert (
        ray_haproxy_node(
            "python3", ["python3", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg"], cfg
        )
        is None
    )
    assert ray_haproxy_node("haproxy", ["haproxy", "-db"], cfg) is None


def test_a_stale_haproxy_is_named_then_stopped(tmp_path: Path, layout: dict, procs: Procs):
    port = layout["port"]
    pid = start_orphan(procs, haproxy_argv(tmp_path, layout))
    wait_until(lambda: listening(port), timeout=20, what="the stale HAProxy to listen")
    assert psutil.Process(pid).name() == "haproxy"
    assert psutil.Process(pid).ppid() != os.getpid()  # adopted: its starter has exited

    status, said = run(layout["config"], clean=False)
    assert status == 1
    assert said.count("\n") == 1 and "stale Ray Serve HAProxy" in said, said
    assert f"pid {pid}" in said and f":{port}" in said and f"kill {pid}" in said, said
    assert psutil.pid_exists(pid) and listening(port)  # --check touches nothing

    status, said = run(layout["config"])
    assert status == 0, said
    assert said.startswith("preflight: stopped a stale Ray Serve HAProxy") and f"pid {pid}" in said
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert free_to_bind(port)
    assert run(layout["config"]) == (0, "")  # nothing left to say


def test_a_haproxy_whose_ray_worker_lives_is_left_alone(tmp_path: Path, layout: dict, procs: Procs):
    port = layout["port"]
    manager = subprocess.Popen(
        [named(tmp_path, "ray::HAProxyManager"), "-c", PARENT, *haproxy_argv(tmp_path, layout)]
    )
    procs.add(manager.pid)
    wait_until(lambda: listening(port), timeout=20, what="the live HAProxy to listen")
    (child,) = psutil.Process(manager.pid).children()
    procs.add(child.pid)

    status, said = run(layout["config"])
    assert status == 1
    assert "running" in said and f"pid {child.pid}" in said and "ray::HAProxyMan" in said, said
    assert "serve shutdown" in said
    assert child.is_running() and listening(port)


def test_an_orphan_whose_raylet_lives_is_left_alone(tmp_path: Path, layout: dict, procs: Procs):
    """A live raylet with the HAProxy's node id still owns it (its worker may be restarting)."""
    raylet = subprocess.Popen(
        [named(tmp_path, "raylet"), "-c", "import time; time.sleep(600)", f"--node_id={NODE}"]
    )
    procs.add(raylet.pid)
    port = layout["port"]
    pid = start_orphan(procs, haproxy_argv(tmp_path, layout))
    wait_until(lambda: listening(port), timeout=20, what="the HAProxy to listen")

    status, said = run(layout["config"])
    assert status == 1 and "running" in said and f"pid {pid}" in said, said
    assert psutil.pid_exists(pid) and listening(port)


def test_another_server_on_a_port_is_named_and_left_alone(
    tmp_path: Path, layout: dict, procs: Procs
):
    stats = layout["stats"]
    server = subprocess.Popen([PYTHON, "-c", LISTEN, str(stats)])
    procs.add(server.pid)
    wait_until(lambda: listening(stats), timeout=20, what="the other server to listen")

    status, said = run(layout["config"])
    assert status == 1
    assert f"HAProxy stats port {stats}" in said and f"pid {server.pid}" in said, said
    assert "stop it, or move the port" in said
    assert server.poll() is None


def test_main_reads_the_yaml_and_exits_0_when_the_ports_are_free(
    tmp_path: Path, layout: dict, capsys
):
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(layout["config"]))
    assert main([str(path)]) == 0
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_names_and_defaults_it_assumes_are_rays():
    """Ray's constants (read in a fresh interpreter, without RAY_SERVE_* set): a renamed
    variable or a moved default would make the preflight look at the wrong ports or files."""
    names = [*SIDE_PORTS, HAPROXY_CONFIG_ENV]
    code = (
        "import json; from ray.serve._private import constants as c; "
        f"print(json.dumps({{n: getattr(c, n, None) for n in {names!r}}}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run(
        [PYTHON_VENV, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ray_values = json.loads(out.stdout.strip().splitlines()[-1])
    assert ray_values == {
        **{name: default for name, (_, default) in SIDE_PORTS.items()},
        HAPROXY_CONFIG_ENV: HAPROXY_CONFIG_DEFAULT,
    }
