"""Two Ray nodes on one machine: train with 2 workers, serve one variant with 2 replicas.

Run by `test_two_nodes.py` in its own process (never inside the test session's shared Ray):

    python tests/cluster/two_node.py --workdir DIR --out DIR/result.json

It starts a Ray head and a second Ray node as separate processes (`ray.cluster_utils.Cluster`),
each with ONE CPU and a custom resource naming it, the second on its own loopback address
(`SECOND_NODE_IP`, 127.0.0.2; the head keeps Ray's own choice), so that what crosses nodes
crosses addresses as on real machines. Then it runs the same commands the cluster docs give
(docs/cluster.md):

1. `slimserve build` (the CLI, joining the cluster through `RAY_ADDRESS`) of a tiny profile
   resized by `deploy/cluster_profile.py --workers 2 --use-gpu false`: Ray Train needs a CPU
   per worker and each node has one, so the two workers (a DDP process group over gloo) must
   run on different nodes.
2. `serve run <config>` (the CLI, against the running cluster through `RAY_ADDRESS`) of a copy
   of serve_config.yaml whose args point at the tiny profile, with `replicas: 2` and
   `num_cpus: 0.6`: two replicas cannot share a 1-CPU node, so Serve must spread them.

It records evidence rather than asserting, so the test reports every fact at once: the nodes
and their addresses, the manifest, the node of every Ray Train worker and Serve replica (State
API), each replica's own health check (one decode step through its engine), answers and
streamed answers through the HTTP ingress, and the stream events channel's sockets: where the
ingress replica's events inbox listens and which model replicas hold a connection to it
(deployments/channel.py: a replica connects to the inbox at the ingress node's address).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from slimserve.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SECOND_NODE_IP = "127.0.0.2"  # node_b: an address of its own, still on this machine
SIDE_PORT_VARS = (  # ports Serve binds at Ray's fixed defaults: moved off a local `serve run`'s
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
NODE_IDS = "node_ids.json"  # written in the workdir once the cluster is up
PROFILE_NAME = "cluster"
VARIANT = "teacher"
APP = "slimserve"


def log(msg: str) -> None:
    print(f"[two_node {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_corpus(folder: Path) -> Path:
    """~25 KB of real English (pydoc topics, shipped with Python), one document per file."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(sorted(topics)[:40]):
        (folder / f"{i:02d}.txt").write_text(topics[key][:700])
    return folder


def write_profile(workdir: Path) -> Path:
    """A tiny laptop profile (1 worker), resized to 2 workers the way the docs say.

    `deploy/cluster_profile.py` copies a profile with only its training block changed, so the
    cluster builds the same artifacts as a laptop would.
    """
    corpus = write_corpus(workdir / "corpus")
    profile = {
        "name": PROFILE_NAME,
        "artifacts_dir": str(workdir / "artifacts"),
        "block_size": 32,
        "data": {"source": f"text:{corpus}", "split": {"validation": 0.15, "test": 0.15}},
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "training": {"workers": 1, "use_gpu": "auto"},
        "eval": {"max_tokens": 1024, "batch_size": 8},
        "variants": {
            VARIANT: {
                "step": "finetune",
                # 8 optimiser steps of 8 blocks (4 per worker) x 32 tokens
                "params": {
                    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
                    "tokens": 2048,
                    "batch_size": 8,
                    "lr": 3e-3,
                    "eval_blocks": 8,
                },
            }
        },
    }
    laptop = workdir / "laptop-profile.yaml"
    laptop.write_text(yaml.safe_dump(profile, sort_keys=False))
    cluster = workdir / "cluster-profile.yaml"
    resize = [sys.executable, str(ROOT / "deploy" / "cluster_profile.py"), str(laptop)]
    resize += ["--workers", "2", "--use-gpu", "false", "--out", str(cluster)]
    subprocess.run(resize, check=True, timeout=60)
    return cluster


def write_serve_config(workdir: Path, profile: Path, port: int) -> Path:
    """serve_config.yaml with only what a two-node loopback test must change.

    `proxy_location: HeadOnly` because both "nodes" share 127.0.0.1: a proxy per node would
    bind the same port twice. `num_cpus: 0.6` (> half a node) forces one replica per node.
    """
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=port)
    env = config["controller_options"]["runtime_env"]["env_vars"]
    for name in SIDE_PORT_VARS:
        env.setdefault(name, str(free_port()))
    (app,) = config["applications"]
    assert app["name"] == APP, app["name"]
    args = app["args"]
    args["config"] = str(profile)
    args["artifacts_dir"] = str(workdir / "artifacts")
    args["defaults"].update(replicas=2, num_cpus=0.6, max_batch_size=4, max_ongoing_requests=8)
    args["variants"] = {}
    path = workdir / "serve_config.cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def actors(class_name: str) -> list[dict[str, Any]]:
    """Every actor of a class (alive or dead) with its node, from the State API.

    The address is explicit (and RAY_ADDRESS is set, see `run`): with None, the State API
    looks for "the latest" Ray on this machine, which may be another job's.
    """
    from ray.util.state import list_actors

    found = list_actors(
        address=os.environ["RAY_ADDRESS"],
        filters=[("class_name", "=", class_name)],
        limit=1000,
        detail=True,
    )
    return [
        {
            "name": a.name,
            "state": a.state,
            "node_id": a.node_id,
            "actor_id": a.actor_id,
            "pid": a.pid,
        }
        for a in found
    ]


def train(profile_path: Path, workdir: Path) -> dict[str, Any]:
    """`slimserve build` (the CLI, as the docs run it) of the resized profile on the cluster."""
    from slimserve.artifacts import read_manifest

    artifacts = workdir / "artifacts"
    t0 = time.monotonic()
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "slimserve"), "build", "--config", str(profile_path)]
        + ["--artifacts", str(artifacts)],
        cwd=ROOT,
        env=os.environ.copy(),  # RAY_ADDRESS: the build joins this cluster (training.trainer)
        capture_output=True,
        text=True,
        timeout=300,
    )
    result: dict[str, Any] = {
        "build_rc": cli.returncode,
        "build_tail": (cli.stdout + cli.stderr)[-2000:],
        "seconds": round(time.monotonic() - t0, 1),
        "workers": actors("RayTrainWorker"),
    }
    folder = artifacts / PROFILE_NAME / VARIANT
    if (folder / "manifest.json").is_file():
        manifest = read_manifest(folder)
        result.update(details=manifest.details, perplexity=manifest.metrics.perplexity)
    return result


def wait_running(deadline: float) -> dict[str, Any]:
    from ray import serve

    status: Any = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            return {"status": "RUNNING"}
        if status is not None and status.status == "DEPLOY_FAILED":
            return {"status": "DEPLOY_FAILED", "message": status.message}
        time.sleep(0.5)
    return {"status": getattr(status, "status", None), "message": "timed out"}


def completion_request(port: int, prompt: str, **fields: Any) -> urllib.request.Request:
    """POST /v1/completions: 8 greedy tokens of `prompt` from VARIANT, plus `fields`."""
    body = {"model": VARIANT, "prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def complete(port: int, i: int) -> dict[str, Any]:
    req = completion_request(port, f"The for statement {i}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            payload = json.loads(resp.read())
            choice = payload["choices"][0]
            return {
                "code": resp.status,
                "model": payload["model"],
                "text": choice["text"],
                "finish_reason": choice["finish_reason"],
                "completion_tokens": payload["usage"]["completion_tokens"],
            }
    except Exception as exc:  # recorded: the test shows every failed answer
        return {"code": getattr(exc, "code", None), "error": repr(exc)}


def stream(port: int, i: int) -> dict[str, Any]:
    """One streamed completion: its status, its SSE data lines' texts, errors and [DONE]."""
    req = completion_request(port, f"The while statement {i}", stream=True)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            lines = [
                ln[5:].strip() for ln in resp.read().decode().splitlines() if ln[:5] == "data:"
            ]
    except Exception as exc:  # recorded: the test shows every failed stream
        return {"code": getattr(exc, "code", None), "error": repr(exc)}
    frames = [json.loads(ln) for ln in lines if ln != "[DONE]"]
    return {
        "code": resp.status,
        "done": bool(lines) and lines[-1] == "[DONE]",
        "errors": [f["error"] for f in frames if "error" in f],
        "text": "".join(f["choices"][0]["text"] for f in frames if "choices" in f),
    }


def channel_sockets(
    ingress: list[dict[str, Any]], replicas: list[dict[str, Any]], ips: dict[str, str]
) -> dict[str, Any]:
    """The events channel as the kernel sees it: the ingress replica's events inbox (the one
    socket it listens on at its node's own address; its HTTP and gRPC servers listen on every
    address) and, for each model replica, its open connections to it."""
    import psutil

    def conns(pid: int) -> list[Any]:
        return [c for c in psutil.net_connections(kind="tcp") if c.pid == pid]

    (ing,) = ingress
    ing_ip = ips[ing["node_id"]]
    inbox = [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in conns(ing["pid"])
        if c.status == psutil.CONN_LISTEN and c.laddr.ip == ing_ip
    ]
    out = []
    for r in replicas:
        peers = [
            f"{c.raddr.ip}:{c.raddr.port}"
            for c in conns(r["pid"])
            if c.status == psutil.CONN_ESTABLISHED and c.raddr
        ]
        out.append({"node_ip": ips[r["node_id"]], "to_inbox": sorted(set(peers) & set(inbox))})
    return {"ingress_node_ip": ing_ip, "inbox": inbox, "replicas": out}


def replica_health(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replica's own health check, called on its actor.

    HTTP requests go through the ingress's router, which picks the replica; calling
    `check_health` on each replica actor (what the Serve controller calls, and what
    ModelServer implements as a one-token generation through its engine) makes every replica
    answer by itself, on its own node.
    """
    import ray

    out = []
    for r in replicas:
        try:
            handle = ray.get_actor(r["name"], namespace="serve")
            ray.get(handle.check_health.remote(), timeout=60)
            out.append({"node_id": r["node_id"], "ok": True})
        except Exception as exc:
            out.append({"node_id": r["node_id"], "ok": False, "error": repr(exc)})
    return out


def serve_two_replicas(
    workdir: Path, profile: Path, address: str, ips: dict[str, str]
) -> dict[str, Any]:
    """`serve run --non-blocking` against the cluster, then ask every replica to answer, and
    stream through the ingress until both replicas have streamed (each replica connects to the
    ingress's events inbox on its first stream)."""
    port = free_port()
    config = write_serve_config(workdir, profile, port)
    env = {**os.environ, "RAY_ADDRESS": address}  # `serve run` joins the running cluster
    t0 = time.monotonic()
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    result: dict[str, Any] = {"serve_run_rc": cli.returncode, "serve_run_tail": cli.stderr[-2000:]}
    result["deploy"] = wait_running(time.monotonic() + 180)
    result["deploy_seconds"] = round(time.monotonic() - t0, 1)
    replicas = [a for a in actors(f"ServeReplica:{APP}:{VARIANT}") if a["state"] == "ALIVE"]
    result["replicas"] = replicas
    result["health"] = replica_health(replicas)
    with ThreadPoolExecutor(max_workers=6) as pool:
        result["answers"] = list(pool.map(lambda i: complete(port, i), range(6)))
        ingress = [a for a in actors(f"ServeReplica:{APP}:Ingress") if a["state"] == "ALIVE"]
        streams: list[dict[str, Any]] = []
        for batch in range(4):  # the router picks replicas at random: a few rounds reach both
            streams += pool.map(lambda i: stream(port, i), range(6 * batch, 6 * batch + 6))
            result["channel"] = channel_sockets(ingress, replicas, ips)
            if all(r["to_inbox"] for r in result["channel"]["replicas"]):
                break
        result["streams"] = streams
    return result


def run(workdir: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    workdir.mkdir(parents=True, exist_ok=True)
    profile = write_profile(workdir)
    os.environ.pop("RAY_ADDRESS", None)  # never join a Ray this script did not start
    t0 = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,  # CPU nodes on any machine (tests/gpu_sim has GPU nodes)
            "resources": {"node_a": 1},
            "include_dashboard": True,  # the State API (and Ray Train's cleaner) need it
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    result: dict[str, Any] = {}
    try:
        cluster.add_node(
            num_cpus=1,
            num_gpus=0,
            resources={"node_b": 1},
            node_ip_address=SECOND_NODE_IP,
            dashboard_agent_listen_port=free_port(),
        )
        cluster.wait_for_nodes()
        # Everything below (this driver, the State API, the `serve run` CLI) uses this cluster.
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        result["nodes"] = {
            n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
            for n in ray.nodes()
            if n["Alive"]
        }
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        result["node_ips"] = ips
        result["cluster_seconds"] = round(time.monotonic() - t0, 1)
        # For the test's clean-up: the HAProxy Serve starts is named after its node and
        # outlives a scenario killed on a timeout.
        (workdir / NODE_IDS).write_text(json.dumps(sorted(result["nodes"])))
        log(f"cluster up: {len(result['nodes'])} nodes")
        result["train"] = train(profile, workdir)
        log(f"trained: rc {result['train']['build_rc']} in {result['train']['seconds']} s")
        result["serve"] = serve_two_replicas(workdir, profile, cluster.address, ips)
        log(f"served: {result['serve']['deploy']}")
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    result["total_seconds"] = round(time.monotonic() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON evidence goes")
    ns = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(ns.workdir)
    ns.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
