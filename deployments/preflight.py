"""Before `serve run`: clear the HAProxy a crashed Serve left behind, or name what holds a port.

Serve's HTTP front is HAProxy (`RAY_SERVE_ENABLE_HA_PROXY` in serve_config.yaml). Ray starts it
as a child of the node's proxy actor, and `ray stop` does not know it: when that actor dies
without cleaning up (a `serve run` killed with SIGKILL, then `ray stop --force`; the OOM
killer), HAProxy lives on, adopted by init, still holding the HTTP port and its stats and
metrics ports. The next `serve run` then fails some seconds later with "HAProxy crashed during
startup ... Address already in use", deep in Ray's log.

    python -m deployments.preflight [serve_config.yaml] [--check]

(`make serve` and `make demo` run it before `serve run`.) It looks at every port the config
makes Serve bind (the HTTP port, HAProxy's stats and metrics ports, the fallback proxy's):

- a Ray Serve HAProxy whose Ray is gone is stopped (SIGTERM, then SIGKILL), one line each.
  It is recognised by its command line: `haproxy ... -f /tmp/haproxy-serve/<node id>/haproxy.cfg`
  (Ray's config file, one folder per Ray node). It is stale only when both its owners are gone:
  no live raylet on this machine has that node id, and its parent is not a Ray worker (Ray
  starts it from `ray::HAProxyManager`; an orphan is adopted by init or a subreaper);
- anything else on one of those ports (a Serve that is running, another server) is named in
  one line with what to do, left alone, and the exit status is 1.

`--check` reports the stale HAProxy too, and stops nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

DEFAULT_CONFIG = "serve_config.yaml"
DEFAULT_HTTP_PORT = 8000  # Serve's, when http_options.port is unset
HAPROXY_CONFIG_ENV = "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"
HAPROXY_CONFIG_DEFAULT = "/tmp/haproxy-serve/haproxy.cfg"
SIDE_PORTS: dict[str, tuple[str, int]] = {
    "RAY_SERVE_HAPROXY_STATS_PORT": ("HAProxy stats", 8404),
    "RAY_SERVE_HAPROXY_METRICS_PORT": ("HAProxy metrics", 9101),
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": ("fallback proxy HTTP", 8500),
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": ("fallback proxy gRPC", 9500),
}
"""The other ports Serve binds on a node with HAProxy on: env var -> (role, Ray's default)."""

STOP_WAIT_S = 5.0
COMMAND_CHARS = 400  # a holder's command line is cut to this in messages


@dataclass(frozen=True)
class Holder:
    """A process listening on one or more of Serve's ports."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    ports: tuple[int, ...]
    node_id: str | None = None  # a Ray Serve HAProxy: the Ray node it serves ("" if unnamed)
    owner: str | None = None  # its parent's name when that is a live Ray worker
    node_alive: bool = False  # a live raylet on this machine has its node id

    @property
    def ray_haproxy(self) -> bool:
        return self.node_id is not None

    @property
    def stale(self) -> bool:
        """A Ray Serve HAProxy whose Ray node and Ray worker are gone: nothing will stop it."""
        return self.ray_haproxy and self.owner is None and not self.node_alive

    def describe(self) -> str:
        ports = ", ".join(f":{p}" for p in self.ports)
        command = " ".join(" ".join(self.cmdline).split()) or self.name  # one line
        if len(command) > COMMAND_CHARS:
            command = command[: COMMAND_CHARS - 3] + "..."
        return f"pid {self.pid} (`{command}`) holding {ports}"


def serve_ports(config: Mapping[str, Any]) -> dict[int, str]:
    """Port -> role, for every port `serve run` of this config binds on the head node."""
    env = {**os.environ, **config_env(config)}
    http = (config.get("http_options") or {}).get("port") or DEFAULT_HTTP_PORT
    ports = {int(http): "HTTP"}
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for name, (role, default) in SIDE_PORTS.items():
            ports.setdefault(int(env.get(name, default)), role)
    return ports


def config_env(config: Mapping[str, Any]) -> dict[str, str]:
    """The env vars the config gives Serve's controller (and so the proxies and replicas)."""
    options = config.get("controller_options") or {}
    env = (options.get("runtime_env") or {}).get("env_vars") or {}
    return {str(k): str(v) for k, v in env.items()}


def haproxy_config_path(config: Mapping[str, Any]) -> str:
    """Where Ray's HAProxy config goes, before Ray adds the node's folder to it."""
    env = {**os.environ, **config_env(config)}
    return env.get(HAPROXY_CONFIG_ENV, HAPROXY_CONFIG_DEFAULT)


def ray_haproxy_node(name: str, cmdline: Iterable[str], config_path: str) -> str | None:
    """The Ray node id of a HAProxy that Ray Serve started, else None.

    Ray runs `haproxy -db -f <dir>/<node id>/<file>` for a config path `<dir>/<file>` (the
    node id "" for a HAProxy given `<dir>/<file>` itself).
    """
    args = list(cmdline)
    if name != "haproxy" and not (args and Path(args[0]).name == "haproxy"):
        return None
    base = Path(os.path.normpath(config_path))
    for flag, value in zip(args, args[1:], strict=False):
        if flag != "-f":
            continue
        path = Path(os.path.normpath(value))
        if path == base:
            return ""
        if path.name == base.name and path.parent.parent == base.parent:
            return path.parent.name
    return None


def live_node_ids() -> set[str]:
    """The node ids of the raylets running on this machine (`raylet --node_id=...`)."""
    ids = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] != "raylet":
            continue
        for arg in proc.info["cmdline"] or ():
            if arg.startswith("--node_id="):
                ids.add(arg.split("=", 1)[1])
    return ids


def ray_owner(proc: psutil.Process) -> str | None:
    """The name of `proc`'s parent when it is a Ray worker (`ray::...`), else None."""
    try:
        parent = proc.parent()
        if parent is None:
            return None
        name = parent.name()
        title = parent.cmdline()
    except psutil.Error:
        return None
    for candidate in (name, title[0] if title else ""):
        if candidate.startswith("ray::"):
            return candidate.split()[0]
    return None


def listeners(ports: Iterable[int]) -> dict[int, set[int]]:
    """pid -> the ports among `ports` it listens on (TCP, any address; -1: not ours to see)."""
    wanted = set(ports)
    found: dict[int, set[int]] = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in wanted:
            found.setdefault(conn.pid or -1, set()).add(conn.laddr.port)
    return found


def holders(ports: Iterable[int], config_path: str) -> list[Holder]:
    """Every process listening on one of `ports`, Ray Serve's HAProxy recognised."""
    out = []
    nodes = None
    for pid, held in sorted(listeners(ports).items()):
        if pid < 0:  # another user's process: the kernel does not say whose
            out.append(Holder(-1, "?", (), tuple(sorted(held))))
            continue
        try:
            proc = psutil.Process(pid)
            name, cmdline = proc.name(), tuple(proc.cmdline())
        except psutil.Error:
            continue  # gone since
        node = ray_haproxy_node(name, cmdline, config_path)
        if node is None:
            out.append(Holder(pid, name, cmdline, tuple(sorted(held))))
            continue
        nodes = live_node_ids() if nodes is None else nodes
        alive = node in nodes or (node == "" and bool(nodes))  # unnamed: any live Ray may own it
        out.append(Holder(pid, name, cmdline, tuple(sorted(held)), node, ray_owner(proc), alive))
    return out


def stop(holder: Holder, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM, then SIGKILL after `wait_s`: HAProxy stops on either."""
    try:
        proc = psutil.Process(holder.pid)
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=wait_s)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=wait_s)
    except psutil.NoSuchProcess:
        pass


def advice(holder: Holder, roles: Mapping[int, str]) -> str:
    """One line: who holds which of Serve's ports, and what to do about it."""
    what = ", ".join(f"{roles[p]} port {p}" for p in holder.ports)
    if holder.pid < 0:
        return f"{what}: held by another user's process; free it or move the port"
    if holder.ray_haproxy:
        return (
            f"{what}: held by the HAProxy of a Ray Serve that is running ({holder.describe()}, "
            f"{holder.owner or 'its Ray node still up'}): stop that Serve first (Ctrl-C its "
            "`serve run`, or `serve shutdown -y`)"
        )
    if holder.name.startswith("ray::"):
        return (
            f"{what}: held by a worker of a Ray that is running ({holder.describe()}): stop "
            "that Serve first (Ctrl-C its `serve run`, or `serve shutdown -y`)"
        )
    return (
        f"{what}: held by {holder.describe()}: stop it, or move the port "
        "(http_options.port, or the RAY_SERVE_*_PORT env vars in serve_config.yaml)"
    )


def preflight(config: Mapping[str, Any], *, clean: bool = True, out=sys.stderr) -> int:
    """Check (and with `clean`, clear) Serve's ports for `config`; 0 when `serve run` may go."""
    roles = serve_ports(config)
    found = holders(roles, haproxy_config_path(config))
    status = 0
    for holder in found:
        if holder.stale and clean:
            stop(holder)
            print(
                f"preflight: stopped a stale Ray Serve HAProxy left by a Ray that is gone: "
                f"{holder.describe()}",
                file=out,
            )
        elif holder.stale:
            status = 1
            print(
                f"preflight: a stale Ray Serve HAProxy left by a Ray that is gone: "
                f"{holder.describe()}; stop it (`kill {holder.pid}`) or run "
                "`python -m deployments.preflight` without --check",
                file=out,
            )
        else:
            status = 1
            print(f"preflight: {advice(holder, roles)}", file=out)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.preflight", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"Serve config (default {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--check", action="store_true", help="report a stale HAProxy instead of stopping it"
    )
    ns = parser.parse_args(argv)
    try:
        config = yaml.safe_load(Path(ns.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"preflight: cannot read {ns.config}: {exc}", file=sys.stderr)
        return 2
    return preflight(config, clean=not ns.check)


if __name__ == "__main__":
    sys.exit(main())
