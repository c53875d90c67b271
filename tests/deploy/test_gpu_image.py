"""The GPU image's stack agrees with itself: one CUDA version for the base image, torch's
wheels, TensorRT and ONNX Runtime, written once; onnxruntime-gpu INSTEAD of onnxruntime.

Read from the Dockerfile, pyproject.toml and the Makefile (no Docker engine needed). Whether
onnxruntime-gpu's build really targets that CUDA shows only when the image is built: its last
RUN line fails the build when ORT lacks the CUDA provider or torch's CUDA major differs.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from deploy_helpers import ROOT, Stage, stages

DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def by_name() -> dict[str, Stage]:
    return {s.name: s for s in stages(DOCKERFILE) if s.name}


def global_args() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    head = text[: text.index("\nFROM ")]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", head, re.M))


def test_gpu_versions_are_written_once_and_agree(by_name: dict[str, Stage]):
    args = global_args()
    cuda = args["CUDA_VERSION"]
    major, minor = cuda.split(".")[:2]
    assert re.fullmatch(r"\d+\.\d+\.\d+", cuda), cuda
    assert by_name["gpu"].base == f"nvidia/cuda:{cuda}-base-ubuntu24.04"
    assert args["TORCH_CUDA"] == f"cu{major}{minor}", (args["TORCH_CUDA"], cuda)
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", args["TENSORRT_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["ONNXRUNTIME_GPU_VERSION"])
    text = DOCKERFILE.read_text()
    for name in ("CUDA_VERSION", "TORCH_CUDA", "TENSORRT_VERSION", "ONNXRUNTIME_GPU_VERSION"):
        assert len(re.findall(rf"^ARG {name}=", text, re.M)) == 1, f"{name} pinned twice"
    build = " ".join(by_name["build-gpu"].all("RUN"))
    assert '"tensorrt-cu${CUDA_VERSION%%.*}==${TENSORRT_VERSION}"' in build, build
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in build, build
    envs = " ".join(by_name["build-gpu"].all("ENV"))
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in envs, envs
    assert "CUDAExecutionProvider" in build and "torch.version.cuda" in build


def test_gpu_image_installs_onnxruntime_gpu_instead_of_onnxruntime(by_name: dict[str, Stage]):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", d)[0] for d in project["dependencies"]]
    assert "onnxruntime" not in names and "onnxruntime-gpu" not in names  # an extra decides
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["cpu"]] == ["onnxruntime"]
    assert [d.split(">")[0] for d in extras["gpu"]] == ["onnxruntime-gpu"]
    assert not any("onnxruntime" in d for d in extras["dev"])  # [dev] goes with either
    gpu = " ".join(by_name["build-gpu"].all("RUN"))
    cpu = " ".join(by_name["build-cpu"].all("RUN") + by_name["build-cpu"].all("ENV"))
    assert "make venv EXTRAS=dev,gpu" in gpu and "cpu" not in gpu.split("EXTRAS=")[1].split()[0]
    assert "make venv EXTRAS=dev,cpu" in cpu and "tensorrt" not in cpu and "gpu" not in cpu
    assert "download.pytorch.org/whl/cpu" in cpu
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?= dev,cpu$", makefile, re.M)
    assert "pip install -q -e '.[$(EXTRAS)]'" in makefile
