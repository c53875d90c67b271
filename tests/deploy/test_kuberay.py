"""KubeRay manifests: the RayService embeds exactly serve_config.yaml (generated, never stale),
both manifests have the shape KubeRay needs, and the RayJob trains what the RayService serves.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from deploy_helpers import IMAGE_UID, ROOT, load_script

from slimserve.catalogue import load_profile, parse_profile

KUBERAY = ROOT / "deploy" / "kuberay"
GPU_IMAGE = "slimserve:gpu"  # what `make docker DOCKER_TARGET=gpu` tags
ARTIFACTS_MOUNT = "/app/artifacts"

gen = load_script("deploy/gen_rayservice.py")
cluster_profile = load_script("deploy/cluster_profile.py")


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / name).read_text())


def serve_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def pinned_ray() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject)
    assert match, "pyproject.toml pins ray[...]==X"
    return match[1]


# ---------------------------------------------------------------- RayService <- serve_config


def test_rayservice_embeds_exactly_serve_configs_applications():
    embedded = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    source = serve_config()
    assert embedded["applications"] == source["applications"]
    assert embedded["proxy_location"] == source["proxy_location"]
    # The one difference: pods accept connections from outside themselves.
    assert embedded["http_options"] == {**source["http_options"], "host": "0.0.0.0"}
    assert set(embedded) == set(source)


def test_rayservice_is_up_to_date_with_serve_config():
    assert gen.main(["--check"]) == 0, "run `make kuberay`"


def test_a_changed_serve_config_is_detected_then_regenerated(tmp_path: Path):
    config = serve_config()
    config["applications"][0]["args"]["defaults"]["replicas"] = 3
    changed = tmp_path / "serve_config.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    target = tmp_path / "rayservice.yaml"
    shutil.copy(KUBERAY / "rayservice.yaml", target)
    args = ["--serve-config", str(changed), "--manifest", str(target)]

    assert gen.main([*args, "--check"]) == 1
    assert gen.main(args) == 0
    assert gen.main([*args, "--check"]) == 0
    after = yaml.safe_load(target.read_text())
    embedded = yaml.safe_load(after["spec"]["serveConfigV2"])
    assert embedded["applications"][0]["args"]["defaults"]["replicas"] == 3
    # Only the block changed: the hand-written rest (and its comments) is intact.
    before = (KUBERAY / "rayservice.yaml").read_text().splitlines()
    now = target.read_text().splitlines()
    cut = next(i for i, line in enumerate(before) if "serveConfigV2:" in line)
    assert now[: cut + 1] == before[: cut + 1]
    rest = before.index("  rayClusterConfig:")
    assert now[now.index("  rayClusterConfig:") :] == before[rest:]


# ---------------------------------------------------------------- the API key, from a Secret


def api_key_env() -> str:
    (app,) = serve_config()["applications"]
    return app["args"]["ingress"]["api_key_env"]


def key_entries(doc: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(pod group, the env items naming the ingress's key variable) for every container."""
    return [
        (group, [e for e in c.get("env", []) if e["name"] == api_key_env()])
        for group, pod in pods(doc)
        for c in pod["containers"]
    ]


def test_every_rayservice_container_reads_the_api_key_from_the_secret():
    """The pods serve on 0.0.0.0: the ingress must require a key there, taken from a Secret
    that must exist (not optional), never written into the manifest."""
    doc = manifest("rayservice.yaml")
    embedded = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert embedded["http_options"]["host"] == "0.0.0.0"
    assert embedded["applications"][0]["args"]["ingress"]["api_key_env"] == api_key_env()
    found = key_entries(doc)
    assert [g for g, _ in found] == ["head", "gpu"]
    for group, entries in found:
        assert entries == [
            {
                "name": api_key_env(),
                "valueFrom": {
                    "secretKeyRef": {
                        "name": gen.API_KEY_SECRET,
                        "key": gen.API_KEY_SECRET_KEY,
                        "optional": False,
                    }
                },
            }
        ], group
    text = (KUBERAY / "rayservice.yaml").read_text()
    create = f"kubectl create secret generic {gen.API_KEY_SECRET}"
    for where in (text, (ROOT / "docs" / "cluster.md").read_text()):
        assert create in where and f"--from-literal={gen.API_KEY_SECRET_KEY}=" in where


def test_a_missing_or_edited_key_entry_is_detected_then_regenerated(tmp_path: Path):
    source = (KUBERAY / "rayservice.yaml").read_text()
    target = tmp_path / "rayservice.yaml"
    args = ["--manifest", str(target)]
    # Dropped by hand, or turned into a plain value: both are stale, both come back as generated.
    dropped = source.replace(f"- name: {api_key_env()}", "- name: UNRELATED")
    inline = source.replace("optional: false", "optional: true")
    for broken in (dropped, inline):
        target.write_text(broken)
        assert gen.main([*args, "--check"]) == 1
        assert gen.main(args) == 0
        assert gen.main([*args, "--check"]) == 0
        entries = key_entries(yaml.safe_load(target.read_text()))
        assert all(
            len(e) == 1 and not e[0]["valueFrom"]["secretKeyRef"]["optional"] for _, e in entries
        )
    # Regenerating twice changes nothing, and every other env item stays.
    assert gen.render_rayservice(source, serve_config()) == source
    before = [
        e for _, pod in pods(manifest("rayservice.yaml")) for e in pod["containers"][0]["env"]
    ]
    after = [
        e
        for _, pod in pods(yaml.safe_load(target.read_text()))
        for e in pod["containers"][0]["env"]
    ]
    assert [e for e in after if e["name"] != "UNRELATED"] == before


def test_serving_without_an_api_key_variable_is_refused():
    config = serve_config()
    del config["applications"][0]["args"]["ingress"]["api_key_env"]
    with pytest.raises(ValueError, match="api_key_env"):
        gen.render_rayservice((KUBERAY / "rayservice.yaml").read_text(), config)


def test_replace_block_needs_exactly_one_serve_config_block():
    with pytest.raises(ValueError, match="found 0"):
        gen.replace_block("spec:\n  other: 1\n", "a: 1")
    twice = "a:\n  serveConfigV2: |\n    x: 1\nb:\n  serveConfigV2: |\n    y: 2\n"
    with pytest.raises(ValueError, match="found 2"):
        gen.replace_block(twice, "a: 1")
    once = "spec:\n  serveConfigV2: |\n    old: 1\n\n    more: 2\n  next: 3\n"
    assert gen.replace_block(once, "new: 1") == "spec:\n  serveConfigV2: |\n    new: 1\n  next: 3\n"


def test_bind_all_changes_only_the_host_and_can_rewrite_in_place(tmp_path: Path):
    """What the Dockerfile runs: `gen_rayservice.py --bind-all serve_config.yaml`."""
    copy = tmp_path / "serve_config.yaml"
    shutil.copy(ROOT / "serve_config.yaml", copy)
    assert gen.main(["--serve-config", str(copy), "--bind-all", str(copy)]) == 0
    bound = yaml.safe_load(copy.read_text())
    source = serve_config()
    assert bound == {**source, "http_options": {**source["http_options"], "host": "0.0.0.0"}}


# ---------------------------------------------------------------- structure of both manifests


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig" if doc["kind"] == "RayService" else "rayClusterSpec"]


def pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize(
    ("name", "kind"), [("rayservice.yaml", "RayService"), ("rayjob-train.yaml", "RayJob")]
)
def test_manifest_structure(name: str, kind: str):
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == pinned_ray() == ray.__version__
    head = spec["headGroupSpec"]
    workers = spec["workerGroupSpecs"]
    assert workers, "at least one worker group"
    for group in [head, *workers]:  # KubeRay passes these to `ray start` as strings
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), params
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica / train worker on the head
    claim = manifest("artifacts-pvc.yaml")["metadata"]["name"]
    for group_name, pod in pods(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        (container,) = pod["containers"]
        assert container["name"] == ("ray-head" if group_name == "head" else "ray-worker")
        assert container["image"] == GPU_IMAGE
        res = container["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and res["requests"] == res["limits"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts == {"artifacts": ARTIFACTS_MOUNT}
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == claim
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_rayservice_serves_on_the_configs_port_with_gpu_workers():
    doc = manifest("rayservice.yaml")
    spec = cluster_spec(doc)
    ports = {
        p["containerPort"]
        for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert serve_config()["http_options"]["port"] in ports
    (gpu,) = spec["workerGroupSpecs"]
    # The app builder gives variants a GPU only when the cluster has one at deploy time.
    assert gpu["minReplicas"] >= 1
    assert spec["enableInTreeAutoscaling"] is True


def entrypoint(doc: dict[str, Any]) -> list[list[str]]:
    """The RayJob's shell entrypoint as commands (split on `&&`)."""
    words = shlex.split(doc["spec"]["entrypoint"])
    commands, current = [], []
    for w in words:
        if w == "&&":
            commands.append(current)
            current = []
        else:
            current.append(w)
    return [*commands, current]


def test_rayjob_trains_what_the_rayservice_serves_on_n_gpu_workers():
    doc = manifest("rayjob-train.yaml")
    cd, resize, build = entrypoint(doc)
    assert cd == ["cd", "/app"]
    assert resize[:2] == ["python", "deploy/cluster_profile.py"]
    opts = dict(zip(resize[3::2], resize[4::2], strict=True))
    assert opts["--use-gpu"] == "true"
    (app,) = serve_config()["applications"]
    assert resize[2] == app["args"]["config"], "train the profile serve_config.yaml serves"
    assert build == [
        "slimserve",
        "build",
        "--config",
        opts["--out"],
        "--artifacts",
        ARTIFACTS_MOUNT,
    ]
    (gpu,) = cluster_spec(doc)["workerGroupSpecs"]
    n = int(opts["--workers"])
    assert n >= 2 and gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == n
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert doc["spec"]["submissionMode"] == "K8sJobMode"


def test_artifacts_volume_is_shared_by_every_pod():
    pvc = manifest("artifacts-pvc.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------- cluster profiles


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_cluster_profile_builds_the_same_artifacts(profile: str, tmp_path: Path):
    path = ROOT / "configs" / profile
    original = load_profile(path)
    out = tmp_path / "cluster.yaml"
    assert (
        cluster_profile.main([str(path), "--workers", "4", "--use-gpu", "true", "--out", str(out)])
        == 0
    )
    copy = load_profile(out)
    assert (copy.training.workers, copy.training.use_gpu) == (4, True)
    assert copy.name == original.name and copy.artifacts_dir == original.artifacts_dir
    assert list(copy.variants) == list(original.variants)
    for variant in original.variants:
        assert copy.config_hash(variant) == original.config_hash(variant), variant
    raw = yaml.safe_load(path.read_text())
    assert parse_profile(cluster_profile.with_training(raw, 1, "auto")).training.use_gpu == "auto"
    with pytest.raises(ValueError, match="workers"):
        cluster_profile.with_training(raw, 0, True)
