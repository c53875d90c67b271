"""serve_config.yaml and the builder's decisions, without starting Serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from serve_helpers import PROFILE

from deployments import app as app_module
from deployments.app import plan
from deployments.messages import NOT_BUILT
from deployments.settings import (
    INGRESS_NAME,
    PROJECT_ROOT,
    SettingsError,
    VariantSettings,
    deployment_options,
    parse_args,
    place,
    resolve,
)
from slimserve.artifacts import ArtifactStore, Manifest, write_manifest


def test_serve_config_is_valid_for_ray_and_for_the_builder():
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "deployments.app:build_app"
    assert [d.name for d in application.deployments] == [INGRESS_NAME]
    assert schema.http_options.port == 8000 and schema.http_options.request_timeout_s
    settings = parse_args(application.args)
    per = resolve(settings, ["teacher", "student"])
    for s in per.values():
        assert s.ongoing >= 2 * s.max_batch_size
        assert s.num_cpus < 1 and s.torch_threads == 1  # fractional CPUs, explicit threads
    # The ingress must answer its own 408 before the proxy's hard limit cuts the stream.
    assert settings.ingress.request_timeout_s < schema.http_options.request_timeout_s


def test_every_bad_field_is_named_in_one_error():
    with pytest.raises(SettingsError) as info:
        parse_args(
            {
                "confg": "typo.yaml",
                "ingress": {"max_body_bytes": 5, "request_timeout_s": float("nan")},
                "defaults": {"num_cpus": 0, "max_batch_size": 0, "device": "tpu"},
            }
        )
    text = str(info.value)
    for field in (
        "args.confg",
        "args.ingress.max_body_bytes",
        "args.ingress.request_timeout_s",
        "args.defaults.num_cpus",
        "args.defaults.max_batch_size",
        "args.defaults.device",
    ):
        assert field in text, field
    assert "6 problem(s)" in text


def test_per_variant_problems_and_unknown_variants():
    settings = parse_args(
        {
            "defaults": {"max_batch_size": 4},
            "variants": {
                "student": {"max_batch_size": 16, "max_ongoing_requests": 20},
                "teacher": {"replicas": 2, "autoscaling": {"min_replicas": 1}},
                "studnet": {"replicas": 1},
            },
        }
    )
    with pytest.raises(SettingsError) as info:
        resolve(settings, ["teacher", "student"])
    text = str(info.value)
    assert "args.variants.studnet: no such variant" in text
    assert "args.variants.student.max_ongoing_requests" in text and "(32), got 20" in text
    assert "args.variants.teacher.replicas: give either replicas or autoscaling" in text


def test_overrides_merge_over_defaults_key_by_key():
    settings = parse_args({"defaults": {"num_cpus": 0.3}, "variants": {"student": {"threads": 2}}})
    per = resolve(settings, ["teacher", "student"])
    assert per["student"].num_cpus == 0.3 and per["student"].torch_threads == 2
    assert per["teacher"].torch_threads == 1
    assert per["teacher"].ongoing == 16  # 2 × the default batch of 8


def test_placement_cpu_gpu_and_tensorrt():
    s = VariantSettings()
    assert place("torch", s, cluster_gpus=0).device == "cpu"
    on_gpu = place("onnxruntime", s, cluster_gpus=1)
    assert on_gpu.device == "cuda" and on_gpu.num_gpus is None  # auto: fitted by the builder
    assert place("torch", VariantSettings(num_gpus=0.25), 1).num_gpus == 0.25
    assert "NVIDIA GPU" in (place("tensorrt", s, cluster_gpus=0).reason or "")
    assert place("tensorrt", s, cluster_gpus=2).device == "cuda"
    pinned = VariantSettings(device="cpu")
    assert place("torch", pinned, cluster_gpus=1).device == "cpu"
    assert place("tensorrt", pinned, cluster_gpus=1).reason
    assert "no GPU" in (place("torch", VariantSettings(device="cuda"), 0).reason or "")


def test_deployment_options_fixed_and_autoscaled():
    fixed = deployment_options(VariantSettings(replicas=3), place("torch", VariantSettings(), 0))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.2, "num_gpus": 0.0}
    assert fixed["user_config"] == {
        "max_batch_size": 8,
        "max_wait_ms": 2.0,
        "decode_burst": 16,
        "max_queue": 16,
        "stream_min_interval_ms": 20.0,
    }
    auto_s = VariantSettings(autoscaling={"min_replicas": 0, "max_replicas": 4}, num_gpus=0.25)
    auto = deployment_options(auto_s, place("torch", auto_s, 1))
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 0.25
    assert auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 8


def _store(tmp_path: Path) -> tuple[Path, ArtifactStore]:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    store = ArtifactStore(tmp_path / "artifacts", "deploytest")
    for name, runtime in (("teacher", "torch"), ("student", "torch"), ("student-trt", "tensorrt")):
        folder = store.path(name)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"n_positions": 256}))
        write_manifest(
            folder,
            Manifest(
                variant=name,
                profile="deploytest",
                step=PROFILE["variants"][name]["step"],
                parent=PROFILE["variants"][name].get("from"),
                runtime=runtime,
                config_hash="h",
                parent_hash=None,
                metrics={"perplexity": 12.5},
            ),
        )
    (store.path("student-onnx")).mkdir(parents=True)
    (store.path("student-onnx") / "manifest.json").write_text("[]")
    return profile, store


def test_plan_records_why_variants_are_not_deployed(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "cluster_gpus", lambda: 0.0)
    profile, store = _store(tmp_path)
    args = {
        "config": str(profile),
        "artifacts_dir": str(store.root),
        "variants": {"student-b": {"enabled": False}},
        "ingress": {"request_timeout_s": 60},
    }
    deployment = plan(args)
    assert deployment.ingress.request_timeout_s == 60
    plans = deployment.variants
    cards = {p.card.id: p.card for p in plans}
    assert set(cards) == set(PROFILE["variants"])
    assert cards["teacher"].deployed and cards["teacher"].device == "cpu"
    assert cards["teacher"].context_length == 256 and cards["teacher"].perplexity == 12.5
    assert cards["student-c"].reason == NOT_BUILT
    assert cards["student-b"].reason == NOT_BUILT  # not built wins over disabled
    assert "corrupt manifest" in (cards["student-onnx"].reason or "")
    assert "NVIDIA GPU" in (cards["student-trt"].reason or "")
    assert deployment.message is None and deployment.teacher == "teacher"
    assert deployment.catalogue()["cards"] == [p.card.model_dump() for p in plans]
    assert "ingress" not in deployment.catalogue()  # the ingress gets its settings apart

    # A TensorRT variant never built on this machine says why, instead of "run make artifacts".
    shutil.rmtree(store.path("student-trt"))
    cards = {p.card.id: p.card for p in plan(args).variants}
    reason = cards["student-trt"].reason or ""
    assert reason.startswith("not built: ") and reason != NOT_BUILT and "GPU" in reason
    deployed = [p for p in plans if p.options is not None]
    assert {p.card.id for p in deployed} == {"teacher", "student"}
    assert all(p.init and p.init.device == "cpu" and p.init.threads == 1 for p in deployed)


def test_plan_on_a_gpu_cluster_uses_the_same_args(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "cluster_gpus", lambda: 1.0)
    monkeypatch.setattr(app_module, "gpu_runtime_missing", lambda runtime: None)  # CUDA builds
    profile, store = _store(tmp_path)
    args = {
        "config": str(profile),
        "artifacts_dir": str(store.root),
        "defaults": {"num_gpus": 0.5},
        "variants": {"student": {"device": "cpu"}},
    }
    by = {p.card.id: p for p in plan(args).variants}
    assert by["teacher"].init and by["teacher"].init.device == "cuda"
    assert by["teacher"].options and by["teacher"].options["ray_actor_options"]["num_gpus"] == 0.5
    assert by["student"].init and by["student"].init.device == "cpu"
    trt = by["student-trt"].card
    # With a GPU, TensorRT is placed; it deploys only where the tensorrt package imports.
    assert trt.deployed or "tensorrt" in (trt.reason or "")


def test_plan_without_artifacts_says_not_built(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "cluster_gpus", lambda: 0.0)
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(PROFILE))
    deployment = plan({"config": str(profile), "artifacts_dir": str(tmp_path / "none")})
    plans = deployment.variants
    assert deployment.message == NOT_BUILT
    # "not built", and for the TensorRT variant on this GPU-less machine also why
    assert all(not p.card.deployed and p.card.reason.startswith("not built") for p in plans)
    assert sum(p.card.reason == NOT_BUILT for p in plans) == len(plans) - 1
