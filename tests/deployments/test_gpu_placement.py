"""GPU placement decisions, without a GPU: which runtime may use one, and whether shares fit.

* ONNX variants go to CUDA only when onnxruntime has its CUDA provider (else CPU, with a
  `note` in /v1/models); int8 graphs stay on CPU unless `device: cuda`;
* the builder fits GPU shares to the cluster (`num_gpus: auto`) or fails at deploy time with
  one message listing each variant's share and the total.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from serve_helpers import PROFILE

from deployments import app as app_module
from deployments.app import plan
from deployments.settings import GpuFitError, VariantSettings, fit_gpus, place
from slimserve import runtimes
from slimserve.artifacts import ArtifactStore, Manifest, write_manifest

NO_CUDA_EP = "onnxruntime 1.x has no CUDAExecutionProvider (needs onnxruntime-gpu)"


def test_onnx_without_a_cuda_provider_runs_on_cpu_and_says_why():
    s = VariantSettings()
    p = place("onnxruntime", s, cluster_gpus=1, gpu_missing=NO_CUDA_EP)
    assert p.device == "cpu" and p.num_gpus == 0.0 and p.reason is None
    assert "CUDAExecutionProvider" in (p.note or "")
    pinned = place("onnxruntime", VariantSettings(device="cuda"), 1, gpu_missing=NO_CUDA_EP)
    assert pinned.device is None and "CUDAExecutionProvider" in (pinned.reason or "")
    assert place("onnxruntime", s, cluster_gpus=1).device == "cuda"  # onnxruntime-gpu
    assert place("onnxruntime", s, cluster_gpus=0, gpu_missing=NO_CUDA_EP).note is None


def test_int8_onnx_stays_on_cpu_unless_pinned():
    p = place("onnxruntime", VariantSettings(), 1, precision="int8")
    assert p.device == "cpu" and "int8" in (p.note or "")
    forced = place("onnxruntime", VariantSettings(device="cuda"), 1, precision="int8")
    assert forced.device == "cuda"


def test_gpu_runtime_missing_asks_the_packages_here():
    runtimes.gpu_runtime_missing.cache_clear()
    import onnxruntime
    import torch

    onnx_reason = runtimes.gpu_runtime_missing("onnxruntime")
    has_ep = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert (onnx_reason is None) == has_ep
    assert (runtimes.gpu_runtime_missing("torch") is None) == torch.backends.cuda.is_built()
    assert runtimes.gpu_runtime_missing("tensorrt") is None


def test_default_shares_that_do_not_fit_fail_with_a_listing():
    wants = {f"v{i}": (0.25, 1) for i in range(9)}  # the old default x 9 variants
    with pytest.raises(GpuFitError) as err:
        fit_gpus(wants, 1.0)
    msg = str(err.value)
    assert "1 GPU(s)" in msg and "total 2.25 GPUs" in msg
    assert all(f"v{i} 0.25 x 1" in msg for i in range(9))
    assert fit_gpus(wants, 3.0) == {n: 0.25 for n in wants}


def test_auto_shares_the_gpus_out():
    wants = {f"v{i}": (None, 1) for i in range(9)}
    shares = fit_gpus(wants, 1.0)
    assert set(shares.values()) == {0.11} and sum(shares.values()) <= 1
    assert set(fit_gpus(wants, 2.0).values()) == {0.2}  # 5 + 4 replicas on two GPUs
    mixed = fit_gpus({"big": (0.5, 1), "a": (None, 2), "b": (None, 3)}, 1.0)
    assert mixed == {"big": 0.5, "a": 0.1, "b": 0.1}


def test_fractional_shares_never_span_two_gpus():
    with pytest.raises(GpuFitError, match="a 0.6 x 3"):
        fit_gpus({"a": (0.6, 3)}, 2.0)  # 1.8 <= 2 GPUs in total, but 0.6 + 0.6 > 1
    assert fit_gpus({"a": (0.6, 2)}, 2.0) == {"a": 0.6}
    assert fit_gpus({"a": (1.0, 2)}, 2.0) == {"a": 1.0}
    with pytest.raises(GpuFitError):
        fit_gpus({"a": (2.0, 1), "b": (0.5, 1)}, 2.0)


def _store(tmp_path: Path, onnx_precision: str) -> tuple[Path, ArtifactStore]:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    store = ArtifactStore(tmp_path / "artifacts", "deploytest")
    for name, runtime in (
        ("teacher", "torch"),
        ("student", "torch"),
        ("student-onnx", "onnxruntime"),
    ):
        folder = store.path(name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"n_positions": 256}))
        if runtime == "onnxruntime":
            (folder / "onnx.json").write_text(json.dumps({"precision": onnx_precision}))
        step = PROFILE["variants"][name]["step"]
        parent = PROFILE["variants"][name].get("from")
        manifest = Manifest(
            variant=name,
            profile="deploytest",
            step=step,
            parent=parent,
            runtime=runtime,
            config_hash="h",
            parent_hash=None,
        )
        write_manifest(folder, manifest)
    return profile, store


def _gpu_cluster(monkeypatch, gpus: float, onnx_gpu: bool) -> None:
    monkeypatch.setattr(app_module, "cluster_gpus", lambda: gpus)
    no_ep = None if onnx_gpu else NO_CUDA_EP
    monkeypatch.setattr(
        app_module, "gpu_runtime_missing", lambda rt: no_ep if rt == "onnxruntime" else None
    )


def test_plan_puts_onnx_on_cpu_with_a_note_and_fits_auto_shares(tmp_path, monkeypatch):
    _gpu_cluster(monkeypatch, 1.0, onnx_gpu=False)
    profile, store = _store(tmp_path, "float32")
    deployment = plan({"config": str(profile), "artifacts_dir": str(store.root)})
    catalogue = deployment.catalogue()
    by = {p.card.id: p for p in deployment.variants}
    onnx = by["student-onnx"]
    assert onnx.card.deployed and onnx.card.device == "cpu" and onnx.init.device == "cpu"
    assert "CUDAExecutionProvider" in (onnx.card.note or "")
    assert onnx.options["ray_actor_options"]["num_gpus"] == 0.0
    assert [c["note"] for c in catalogue["cards"] if c["id"] == "student-onnx"] == [onnx.card.note]
    gpu_shares = [by[n].options["ray_actor_options"]["num_gpus"] for n in ("teacher", "student")]
    assert gpu_shares == [0.5, 0.5] and by["teacher"].init.device == "cuda"


def test_plan_with_onnxruntime_gpu_keeps_int8_on_cpu(tmp_path, monkeypatch):
    _gpu_cluster(monkeypatch, 1.0, onnx_gpu=True)
    profile, store = _store(tmp_path, "int8")
    deployment = plan({"config": str(profile), "artifacts_dir": str(store.root)})
    by = {p.card.id: p for p in deployment.variants}
    assert by["student-onnx"].card.device == "cpu" and "int8" in by["student-onnx"].card.note


def test_plan_that_cannot_fit_fails_at_deploy_time(tmp_path, monkeypatch):
    _gpu_cluster(monkeypatch, 1.0, onnx_gpu=True)
    profile, store = _store(tmp_path, "float32")
    args = {"config": str(profile), "artifacts_dir": str(store.root), "defaults": {"num_gpus": 0.5}}
    with pytest.raises(GpuFitError) as err:
        plan(args)
    msg = str(err.value)
    for line in ("teacher 0.5 x 1", "student 0.5 x 1", "student-onnx 0.5 x 1", "total 1.5 GPUs"):
        assert line in msg
