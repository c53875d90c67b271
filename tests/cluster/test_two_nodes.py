"""A Ray head and a second Ray node on 127.0.0.2: 2 training workers, 2 replicas, both answer,
and streamed events cross from one node's address to the other's.

The scenario (`two_node.py`) runs in its own process with its own `ray.cluster_utils.Cluster`,
never in this session's shared Ray (`ray_session`), under a hard timeout; its evidence comes
back as JSON and every claim of the multi-node docs is checked here against it.
About 70 s on a busy 2-core machine (cluster 6 s, training 30 s, Serve 20 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from two_node import NODE_IDS

from deployments.preflight import HAPROXY_CONFIG_DEFAULT, ray_haproxy_node

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]

SCRIPT = Path(__file__).with_name("two_node.py")
SCENARIO_TIMEOUT_S = 420


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the scenario's process group (its Ray nodes' reaper cleans up what they started)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_haproxies(workdir: Path) -> list[int]:
    """Stop the HAProxy processes of this scenario's Ray nodes; returns their pids.

    Ray's HAProxy is started by a worker in a process group of its own: a scenario killed on
    its timeout (before `serve.shutdown()`) leaves it running, holding its ports. It is
    recognised by its config file, which names its Ray node (deployments/preflight.py).
    """
    ids_file = workdir / NODE_IDS
    if not ids_file.is_file():
        return []
    ours = set(json.loads(ids_file.read_text()))
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        node = ray_haproxy_node(
            proc.info["name"] or "", proc.info["cmdline"] or [], HAPROXY_CONFIG_DEFAULT
        )
        if node in ours:
            found.append(proc)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=10)
    return [p.pid for p in found]


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("two-node")
    out, log = workdir / "result.json", workdir / "scenario.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--out", str(out)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout ends all of it
        )
        try:
            rc = proc.wait(timeout=SCENARIO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            stop_haproxies(workdir)
            pytest.fail(f"two-node scenario timed out after {SCENARIO_TIMEOUT_S} s:\n{tail(log)}")
        finally:
            stop_group(proc)  # a scenario that ended leaves no process behind...
    left = stop_haproxies(workdir)  # ...not even the HAProxy Serve started
    assert not left, f"the scenario left HAProxy running: pids {left}"
    if rc != 0 or not out.is_file():
        pytest.fail(f"two-node scenario exited {rc}:\n{tail(log)}")
    result = json.loads(out.read_text())
    if "error" in result:
        pytest.fail(f"two-node scenario failed:\n{result['error']}\n{tail(log)}")
    return result


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


def test_head_and_second_node_are_separate_ray_nodes(evidence: dict[str, Any]) -> None:
    nodes = evidence["nodes"]
    assert sorted(nodes.values()) == [["node_a"], ["node_b"]], nodes


def test_the_second_node_has_an_address_of_its_own(evidence: dict[str, Any]) -> None:
    ips = evidence["node_ips"]
    by_name = {evidence["nodes"][node][0]: ip for node, ip in ips.items()}
    assert by_name["node_b"] == "127.0.0.2", by_name
    assert by_name["node_a"] != by_name["node_b"], by_name


def test_training_runs_two_workers_one_per_node(evidence: dict[str, Any]) -> None:
    train = evidence["train"]
    assert train["build_rc"] == 0, train["build_tail"]
    d = train["details"]
    assert (d["workers"], d["device"], d["cpus_per_worker"]) == (2, "cpu", 1), d
    assert d["step"] == 8 and d["tokens"] == 2048, d
    assert d["val_loss"] < d["initial_val_loss"], d  # the 2-worker DDP run learned
    workers = train["workers"]
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == set(evidence["nodes"]), workers


def test_two_replicas_land_on_different_nodes(evidence: dict[str, Any]) -> None:
    serve = evidence["serve"]
    assert serve["serve_run_rc"] == 0, serve["serve_run_tail"]
    assert serve["deploy"] == {"status": "RUNNING"}, serve["deploy"]
    replicas = serve["replicas"]
    assert len(replicas) == 2, replicas
    assert {r["node_id"] for r in replicas} == set(evidence["nodes"]), replicas


def test_both_replicas_answer(evidence: dict[str, Any]) -> None:
    serve = evidence["serve"]
    health = serve["health"]
    assert len(health) == 2 and all(h["ok"] for h in health), health
    assert {h["node_id"] for h in health} == set(evidence["nodes"]), health
    answers = serve["answers"]
    assert answers and all(a["code"] == 200 for a in answers), answers
    for a in answers:  # a random tiny model may stop at EOS early, but it generates
        assert a["model"] == "teacher" and isinstance(a["text"], str), a
        assert a["completion_tokens"] >= 1 and a["finish_reason"] in ("length", "stop"), a


def test_streams_cross_addresses_over_the_events_channel(evidence: dict[str, Any]) -> None:
    """Every streamed request ends with its text and `[DONE]`, and the events travelled the
    channel from a replica on one node to the ingress's inbox at the other node's address
    (a replica that could not connect would have streamed through Serve instead, and would
    hold no connection to the inbox)."""
    serve = evidence["serve"]
    streams = serve["streams"]
    assert streams, serve
    for s in streams:
        assert s["code"] == 200 and s["done"] and not s["errors"], s
        assert s["text"], s
    channel = serve["channel"]
    (inbox,) = channel["inbox"]
    assert inbox.rsplit(":", 1)[0] == channel["ingress_node_ip"], channel
    crossing = [r for r in channel["replicas"] if r["node_ip"] != channel["ingress_node_ip"]]
    assert len(crossing) == 1, channel  # one replica per node: one sits on the other one
    assert crossing[0]["to_inbox"] == [inbox], channel
