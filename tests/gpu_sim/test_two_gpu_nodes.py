"""Two Ray nodes with one logical GPU each: replicas spread as configured, and a training job
whose free GPU capacity is split across the two GPUs fails clearly instead of waiting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sim_helpers import app_on_cpu, tiny_torch_store

from deployments import app as app_module
from slimserve.catalogue import TrainingDefaults
from slimserve.net import free_port
from training.trainer import plan_workers

pytestmark = [pytest.mark.gpu_sim, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def spread(two_gpu_nodes, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """teacher with 2 replicas of 0.6 GPU: two cannot share a GPU, so one lands per node."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(app_module, "gpu_runtime_missing", lambda runtime: None)  # CUDA builds
        profile, root = tiny_torch_store(tmp_path_factory.mktemp("gpusim2"))
        port = free_port()
        # One HTTP proxy (on the head) is enough for the test and starts one process less.
        serve.start(
            proxy_location="HeadOnly", http_options=HTTPOptions(host="127.0.0.1", port=port)
        )
        args = {
            "config": str(profile),
            "artifacts_dir": str(root),
            "defaults": {"num_cpus": 0.2, "max_batch_size": 2},
            "variants": {
                "teacher": {"replicas": 2, "num_gpus": 0.6},
                "student": {"enabled": False},
            },
        }
        app, plans = app_on_cpu(args)
        serve.run(app, name="gpusim2", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "plans": plans}
    finally:
        patch.undo()
        serve.shutdown()


def test_replicas_spread_over_the_two_gpu_nodes(two_gpu_nodes, spread):
    from ray._private.state import available_resources_per_node

    ray = two_gpu_nodes
    assert ray.cluster_resources()["GPU"] == 2.0
    per_node = [r.get("GPU", 0.0) for r in available_resources_per_node().values()]
    assert sorted(round(g, 2) for g in per_node) == [0.4, 0.4], per_node  # 0.6 held on each
    r = httpx.post(
        f"{spread['url']}/v1/completions",
        json={"model": "teacher", "prompt": "two nodes", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_training_on_split_free_gpu_capacity_fails_clearly(two_gpu_nodes, spread):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="split across GPUs"):
        plan_workers(TrainingDefaults(workers=1, use_gpu=True))  # 0.8 free, 0.4 per GPU
    assert time.monotonic() - t0 < 30
    assert two_gpu_nodes.available_resources()["GPU"] == pytest.approx(0.8)  # probe released
