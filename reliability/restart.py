"""Restart after a crash: `serve run serve_config.yaml` killed hard, then started again.

What a user lives through when the terminal running `serve run` dies with it (or the machine's
OOM killer takes the process group): the process group is SIGKILLed, so nothing shuts down in
order, and what Ray started may live on, HAProxy included, still holding its ports. The user
runs `ray stop --force` and starts Serve again the documented way, `make serve`: the preflight
(deployments/preflight.py: stops a HAProxy that a crashed Serve left, names anything else on
Serve's ports in one line) and then `serve run`. Measured: the seconds from the preflight's
start until the restarted Serve answers a completion, and whether a HAProxy was still running
between the two runs (what `pgrep -a haproxy` lists, zombies aside). Target: serving again
within 90 s, or, when something else holds a port, the preflight's one line naming it.

This phase uses Serve's fixed ports (HTTP 8000; HAProxy's stats 8404 and metrics 9101; the
fallback proxy's 8500 and 9500), so it runs last, after the run's own Ray and Serve are shut
down. It is skipped, with the reason, when one of those ports is held or another Ray runs on
the machine (`ray stop --force` would kill it). At the end it always stops what it started:
both `serve run` process groups, Ray (`ray stop --force`), and any HAProxy that was not there
before.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

if TYPE_CHECKING:
    from reliability.context import Run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVE_CONFIG = ROOT / "serve_config.yaml"
SIDE_PORTS = {  # env var -> Ray's default: the other ports Serve binds with HAProxy on
    "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
    "RAY_SERVE_HAPROXY_METRICS_PORT": 9101,
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500,
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": 9500,
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b")  # "ray.exceptions.X: why"
RESTART_TARGET_S = 90.0
FIRST_START_S = 300.0  # the first start deploys every built variant on a cold machine
RESTART_WAIT_S = 180.0  # how long the restart is watched (past the target, to measure it)


def first_command(config: Path) -> list[str]:
    """The run that will crash: plain `serve run <config>`."""
    return [str(BIN / "serve"), "run", str(config)]


def preflight_command(config: Path) -> list[str]:
    """What `make serve` runs before `serve run` (deployments/preflight.py): stops a HAProxy
    that a crashed Serve left on the config's ports; names anything else there in one line
    and exits 1."""
    return [sys.executable, "-m", "deployments.preflight", str(config)]


def ports(config: Path) -> list[int]:
    """The fixed ports `serve run <config>` takes: HTTP first, then HAProxy's stats and
    metrics ports and the fallback Python proxy's HTTP and gRPC ports."""
    data = yaml.safe_load(config.read_text()) or {}
    env = ((data.get("controller_options") or {}).get("runtime_env") or {}).get("env_vars") or {}
    http = int((data.get("http_options") or {}).get("port", 8000))
    return [http, *(int(env.get(k, v)) for k, v in SIDE_PORTS.items())]


def held(port: int) -> bool:
    """Whether something listens on `port` (of 127.0.0.1 or every address)."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "held"
            try:
                s.bind((host, port))
            except OSError:
                return True
    return False


def pgrep(pattern: str, full: bool = False) -> list[str]:
    """What `pgrep -a [-f] pattern` lists, zombies left out (a dead HAProxy whose parent has
    not reaped it holds no port): one "pid command line" string per live process."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        info = proc.info
        command = " ".join(info["cmdline"] or []) or info["name"] or ""
        if info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        if re.search(pattern, command if full else (info["name"] or "")):
            found.append(f"{info['pid']} {command}")
    return found


def ray_processes() -> list[str]:
    return pgrep("gcs_server|raylet", full=True)


def wait_no_ray(timeout_s: float = 20.0) -> list[str]:
    """Ray processes still running after `timeout_s` (the run's own Ray takes a moment)."""
    deadline = time.monotonic() + timeout_s
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def blocker(config: Path) -> str | None:
    """Why this phase cannot run here now (one line), or None."""
    taken = [p for p in ports(config) if held(p)]
    if taken:
        return f"port(s) {', '.join(map(str, taken))} already held: not killing what holds them"
    if others := wait_no_ray():
        pid, command = others[0].split(" ", 1)
        name = Path(command.split()[0]).name
        return f"another Ray runs here ({name}, pid {pid}): `ray stop --force` would end it"
    return None


def config_for(store_root: Path, default_root: Path) -> tuple[Path, str | None]:
    """serve_config.yaml when the run uses the default artifacts; else a copy of it, in a
    temporary folder, whose `artifacts_dir` is the run's (and a note saying so)."""
    if store_root.resolve() == default_root.resolve():
        return SERVE_CONFIG, None
    data = yaml.safe_load(SERVE_CONFIG.read_text())
    for app in data["applications"]:
        app["args"]["artifacts_dir"] = str(store_root.resolve())
        app["args"]["config"] = str((ROOT / app["args"]["config"]).resolve())
    folder = Path(tempfile.mkdtemp(prefix="reliability-restart-"))
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, f"restart: serve_config.yaml with artifacts_dir {store_root}"


@dataclass
class Started:
    """One `serve run`, in its own process group, its output in a log file."""

    proc: subprocess.Popen[bytes]
    log: Path
    t0: float

    @classmethod
    def start(cls, command: list[str], log: Path, t0: float | None = None) -> Started:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # its own Ray, never one that happens to be configured
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return cls(proc, log, time.monotonic() if t0 is None else t0)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGINT (what Ctrl-C does: Serve shuts down in order), SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.kill(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self.kill(signal.SIGKILL)
        self.proc.wait()

    def last_line(self) -> str:
        """What its output ended with: the last exception line of a traceback when there is
        one (Ray logs on after it), else the last line; colour codes removed."""
        text = ANSI.sub("", self.log.read_text(errors="replace"))
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        errors = [x for x in lines if EXCEPTION_LINE.match(x)]
        return (errors or lines or [""])[-1][:500]


def wait_serving(base: str, model: str, run: Started, timeout_s: float) -> float | None:
    """Seconds from the start until a completion is answered; None when the process exits
    first or `timeout_s` passes."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 4}
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - run.t0 < timeout_s and run.proc.poll() is None:
            try:
                r = client.post(f"{base}/v1/completions", json=body)
                if r.status_code == 200 and r.json().get("choices"):
                    return time.monotonic() - run.t0
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
    return None


def ray_stop() -> str:
    """`ray stop --force`; the last line it printed."""
    args = [str(BIN / "ray"), "stop", "--force"]
    out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[-1] if lines else ""


def cleanup(runs: list[Started], haproxy_before: set[int]) -> None:
    """Stop both runs, Ray, and any HAProxy that was not running before the phase."""
    for r in runs:
        r.stop()
    ray_stop()
    for line in pgrep("haproxy"):
        pid = int(line.split()[0])
        if pid not in haproxy_before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def restart_run(config: Path, model: str, logs: Path) -> dict[str, Any]:
    """Start, crash, `ray stop --force`, then the preflight and `serve run` again (timed from
    the preflight's start); the report row."""
    base = f"http://127.0.0.1:{ports(config)[0]}"
    haproxy_before = {int(x.split()[0]) for x in pgrep("haproxy")}
    runs: list[Started] = []
    row: dict[str, Any] = {"config": config.name}
    try:
        runs.append(first := Started.start(first_command(config), logs / "first.log"))
        up = wait_serving(base, model, first, FIRST_START_S)
        row["first_start_s"] = None if up is None else round(up, 1)
        if up is None:
            row["first_start_failed"] = first.last_line()
            return row
        first.kill()  # the crash: the whole process group, at once
        first.proc.wait()
        row["ray_stop"] = ray_stop()
        row["stale_haproxy"] = "; ".join(pgrep("haproxy")) or "none"
        held_now = [str(p) for p in ports(config) if held(p)]
        row["ports_held_after_crash"] = ", ".join(held_now) or "none"
        t0 = time.monotonic()
        pre = subprocess.run(
            preflight_command(config), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        said = [x.strip() for x in (pre.stdout + pre.stderr).splitlines() if x.strip()]
        row["preflight"] = " | ".join(said) or "nothing to clear"
        row["preflight_exit"] = pre.returncode
        if pre.returncode != 0:
            row["blocker"] = " | ".join(said)
            row["blocker_lines"] = len(said)
            return row
        runs.append(again := Started.start(first_command(config), logs / "restart.log", t0))
        up = wait_serving(base, model, again, RESTART_WAIT_S)
        row["restart_s"] = None if up is None else round(up, 1)
        if up is None:
            row["serve_run_last_line"] = again.last_line()
    finally:
        cleanup(runs, haproxy_before)
    return row


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    if "skipped" in r:
        return {}
    served = r.get("restart_s") is not None and r["restart_s"] <= RESTART_TARGET_S
    named = bool(r.get("blocker")) and r.get("blocker_lines") == 1
    return {
        "restart: the first serve run answered": r.get("first_start_s") is not None,
        f"restart: serving again within {RESTART_TARGET_S:g} s, or one line naming the blocker": (
            served or named
        ),
    }


def phase(run: Run) -> None:
    config, note = config_for(run.store.parent, ROOT / "artifacts")
    if note:
        run.notes.append(note)
    if reason := blocker(config):
        r: dict[str, Any] = {"skipped": reason}
        run.notes.append(f"restart skipped: {reason}")
    else:
        with tempfile.TemporaryDirectory(prefix="reliability-restart-") as logs:
            r = restart_run(config, run.a.variant, Path(logs))
    run.table("Restart after a crash (serve run SIGKILLed, ray stop --force, started again)", [r])
    run.verdicts.update(verdicts(r))
    print("restart", r)
