"""Find, kill and crash Serve replicas of one deployment (shared by tests and `make reliability`).

Serve names every replica actor `SERVE_REPLICA::<app>#<deployment>#<id>` in the `serve`
namespace; the controller replaces a replica that dies. Two ways to lose one:

* `kill`: `ray.kill` of the actor (what an operator, the autoscaler or a node loss does);
* `crash`: SIGKILL of the replica's worker process, found with `__ray_call__` (what a segfault
  or the kernel's OOM killer does). Neither needs a drill method in the model deployment.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import ray

PREFIX = "SERVE_REPLICA::"


def replica_names(app: str, deployment: str) -> list[str]:
    """Actor names of the live replicas of `deployment` in `app` (sorted)."""
    want = f"{PREFIX}{app}#{deployment}#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["name"].startswith(want))


def actor(name: str) -> Any:
    return ray.get_actor(name, namespace="serve")


def ongoing(name: str, timeout: float = 5.0) -> int:
    """Requests the replica is working on now (-1 when it does not answer)."""
    try:
        return int(ray.get(actor(name).get_num_ongoing_requests.remote(), timeout=timeout))
    except Exception:
        return -1


def busiest(app: str, deployment: str) -> tuple[str, int] | None:
    """The replica with the most requests in flight, and how many (None: none is busy)."""
    counts = [(n, ongoing(n)) for n in replica_names(app, deployment)]
    counts = [c for c in counts if c[1] > 0]
    return max(counts, key=lambda c: c[1]) if counts else None


def pid(name: str) -> int:
    """The worker process id of a replica actor."""
    return int(ray.get(actor(name).__ray_call__.remote(lambda _self: os.getpid()), timeout=10))


def kill(name: str) -> None:
    """`ray.kill` the replica actor (Serve's controller starts a replacement)."""
    ray.kill(actor(name), no_restart=True)


def crash(name: str) -> int:
    """SIGKILL the replica's process, as a segfault would; returns the pid killed."""
    target = pid(name)
    os.kill(target, signal.SIGKILL)
    return target


def running(app: str, deployment: str) -> int:
    """Replicas Serve reports RUNNING (initialized: the model is loaded and serving)."""
    from ray import serve

    try:
        states = serve.status().applications[app].deployments[deployment].replica_states
    except KeyError:
        return 0
    return int(states.get("RUNNING", 0))


def wait_replaced(
    app: str, deployment: str, gone: str, count: int, timeout: float = 120.0
) -> float:
    """Seconds until `count` replicas other than `gone` answer (the replacement is up)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        names = [n for n in replica_names(app, deployment) if n != gone]
        if len(names) >= count and running(app, deployment) >= count:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError(f"{deployment}: no replacement replica after {timeout:g}s")
