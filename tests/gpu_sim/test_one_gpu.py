"""One node, one logical GPU: the tiny profile's serve_config.yaml plan fits and schedules, a
plan that cannot fit fails at deploy time, replicas hold their shares and answer, and a
training job while Serve holds the GPU fails clearly instead of waiting forever."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sim_helpers import (
    ROOT,
    app_on_cpu,
    manifests_only_store,
    serve_config_args,
    tiny_torch_store,
)

from deployments import app as app_module
from deployments.settings import GpuFitError
from slimserve import runtimes
from slimserve.catalogue import TrainingDefaults
from slimserve.net import free_port
from training.trainer import plan_workers

pytestmark = [pytest.mark.gpu_sim, pytest.mark.timeout(240)]

TINY = ROOT / "configs" / "tiny.yaml"


def gpu_image(monkeypatch, onnxruntime_gpu: bool = False) -> None:
    """The builder sees the GPU image's packages: torch with CUDA (onnxruntime-gpu if asked)."""
    real = runtimes.gpu_runtime_missing

    def missing(runtime: str) -> str | None:
        if runtime == "torch" or (runtime == "onnxruntime" and onnxruntime_gpu):
            return None
        return real(runtime)

    monkeypatch.setattr(app_module, "gpu_runtime_missing", missing)


def gpu_demand(plans) -> dict[str, tuple[float, int]]:
    out = {}
    for p in plans:
        if p.options and p.card.device == "cuda":
            out[p.card.id] = (p.options["ray_actor_options"]["num_gpus"], p.options["num_replicas"])
    return out


def test_tiny_profiles_serve_config_plan_fits_one_gpu(one_gpu_ray, tmp_path, monkeypatch):
    ray = one_gpu_ray
    gpu_image(monkeypatch)
    manifests_only_store(TINY, tmp_path)
    args = {**serve_config_args(), "config": str(TINY), "artifacts_dir": str(tmp_path)}
    deployment = app_module.plan(args)
    plans = deployment.variants
    assert deployment.machine["cluster_gpus"] == 1.0
    cards = {p.card.id: p.card for p in plans}
    on_gpu = gpu_demand(plans)
    assert sum(share * n for share, n in on_gpu.values()) <= 1.0
    torch_variants = {n for n, c in cards.items() if c.runtime == "torch"}
    assert set(on_gpu) == torch_variants and len(on_gpu) >= 2
    for card in cards.values():
        if card.runtime == "onnxruntime":  # onnxruntime here has no CUDA provider
            assert card.deployed and card.device == "cpu", card
            assert "CUDAExecutionProvider" in card.note or "int8" in card.note, card
        elif card.runtime == "tensorrt":
            assert not card.deployed and "tensorrt" in (card.reason or ""), card
        else:
            assert card.deployed and card.device == "cuda", card
    # Ray really schedules every GPU share on the one logical GPU, at once.
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"GPU": share} for share, n in on_gpu.values() for _ in range(n)]
    group = placement_group(bundles)
    try:
        ready, _ = ray.wait([group.ready()], timeout=30)
        assert ready, f"{bundles} do not fit one GPU"
    finally:
        remove_placement_group(group)


def test_a_plan_that_cannot_fit_fails_at_deploy_time(one_gpu_ray, tmp_path, monkeypatch):
    from deployments.app import build_app

    gpu_image(monkeypatch, onnxruntime_gpu=True)
    manifests_only_store(TINY, tmp_path)
    args = {**serve_config_args(), "config": str(TINY), "artifacts_dir": str(tmp_path)}
    args["defaults"] = {**args["defaults"], "num_gpus": 0.25}  # the old default share
    t0 = time.monotonic()
    with pytest.raises(GpuFitError) as err:
        build_app(args)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "1 GPU(s)" in msg and "total 1.5 GPUs" in msg, msg  # 4 torch + 2 fp32 ONNX
    for name in ("teacher", "student", "student-onnx", "student-slim-onnx"):
        assert f"{name} 0.25 x 1" in msg, msg
    assert "student-onnx-int8" not in msg  # int8 stays on CPU


@pytest.fixture(scope="module")
def served(one_gpu_ray, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Two torch variants on the logical GPU (num_gpus: auto -> 0.5 each), computing on CPU."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    patch = pytest.MonkeyPatch()
    try:
        gpu_image(patch)
        profile, root = tiny_torch_store(tmp_path_factory.mktemp("gpusim"))
        port = free_port()
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        light = {"num_cpus": 0.2, "max_batch_size": 2, "stream_min_interval_ms": 0}
        app, plans = app_on_cpu(
            {"config": str(profile), "artifacts_dir": str(root), "defaults": light}
        )
        t0 = time.monotonic()
        serve.run(app, name="gpusim", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "plans": plans, "deploy_s": time.monotonic() - t0}
    finally:
        patch.undo()
        serve.shutdown()


def test_replicas_hold_their_gpu_shares_and_answer(one_gpu_ray, served):
    assert gpu_demand(served["plans"]) == {"teacher": (0.5, 1), "student": (0.5, 1)}
    assert one_gpu_ray.available_resources().get("GPU", 0.0) == 0.0  # both shares held
    for model in ("teacher", "student"):
        r = httpx.post(
            f"{served['url']}/v1/completions",
            json={"model": model, "prompt": "Ray schedules", "max_tokens": 3},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        # sampled (temperature 1) from a random model: EOS may come before the third token
        done = r.json()
        n, reason = done["usage"]["completion_tokens"], done["choices"][0]["finish_reason"]
        assert (n, reason) == (3, "length") or (0 <= n < 3 and reason == "stop"), done
    cards = httpx.get(f"{served['url']}/v1/models", timeout=30).json()["data"]
    assert {c["id"]: c["device"] for c in cards} == {"teacher": "cuda", "student": "cuda"}


def test_training_while_serve_holds_the_gpu_fails_clearly(one_gpu_ray, served):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"0\.00 of 1 GPUs free .*Serve replicas"):
        plan_workers(TrainingDefaults(workers=1, use_gpu="auto"))
    assert time.monotonic() - t0 < 10  # an error, not a wait


def test_training_takes_a_free_gpu_share(one_gpu_ray, served, tmp_path: Path):
    from ray import serve

    serve.delete("gpusim")  # the replicas release their shares
    deadline = time.monotonic() + 60
    while one_gpu_ray.available_resources().get("GPU", 0.0) < 1.0:
        assert time.monotonic() < deadline, one_gpu_ray.available_resources()
        time.sleep(0.2)
    plan = plan_workers(TrainingDefaults(workers=1, use_gpu="auto"))
    assert plan.use_gpu and plan.gpus_per_worker == 1.0
