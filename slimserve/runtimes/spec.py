"""What each runtime is, declared once: its packages, its files, its hardware, its load options.

Everything outside `slimserve.runtimes` (the Serve app builder, the benchmarks, placement) asks
a `RuntimeSpec` instead of branching on the runtime's name. This module imports neither torch
nor any backend, so a CPU-only process without onnxruntime or TensorRT (the Serve app builder)
can still say why a variant cannot run, and a replica imports only the backend it loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slimserve.artifacts import ArtifactError
from slimserve.steps import Requirement  # what `slimserve.hardware.missing` checks

if TYPE_CHECKING:
    from slimserve.runtimes.base import Runtime

LoadOption = Literal["device", "dtype", "threads", "backend"]


@dataclass(frozen=True)
class ArtifactFiles:
    """The files that make an artifact folder of one runtime loadable."""

    weights: tuple[str, ...]  # any one of them holds the weights; builds write the first
    required: tuple[str, ...] = ()  # must be there beside the weights
    sidecar: str | None = None  # JSON the build step writes: precision, file names, limits
    weights_key: str | None = None  # the sidecar's key naming the weights file, if it has one


@dataclass(frozen=True)
class RuntimeSpec:
    """One runtime's facts, and how to load an artifact with it."""

    name: str  # the manifest's `runtime`
    label: str  # for people: "ONNX Runtime"
    module: str  # backend module whose `load(folder, **options)` returns a `Runtime`
    packages: tuple[str, ...]  # top-level imports the backend needs on the node
    files: ArtifactFiles
    load_options: frozenset[LoadOption]  # keyword options its `load` takes
    needs_gpu: bool = False  # runs on a GPU only (else on CPU, and on a GPU when it can)
    requires: Requirement = "none"  # what this machine needs to run it at all
    # Why this node's package cannot use a GPU, whatever GPUs the node has (None: it can).
    gpu_probe: Callable[[], str | None] | None = None

    def load(self, folder: str | Path, **options: Any) -> Runtime:
        """Load `folder` with this backend, passing on only the options it takes."""
        backend = importlib.import_module(self.module)
        return backend.load(folder, **{k: v for k, v in options.items() if k in self.load_options})

    def missing_here(self) -> str | None:
        """Why this runtime cannot load on this node (a package is not importable), or None."""
        for module in (*self.packages, self.module):
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                return f"runtime {self.name!r} unavailable here (cannot import {module})"
        return None

    def gpu_missing(self) -> str | None:
        """Why this node's package cannot run on a GPU, or None (asked of the package, not the
        device, so a CPU-only process can tell whether a GPU replica could use its GPU)."""
        return self.gpu_probe() if self.gpu_probe is not None else None

    def sidecar(self, folder: Path) -> dict[str, Any] | None:
        """The build step's sidecar JSON in `folder`, or None when absent or unreadable."""
        if self.files.sidecar is None:
            return None
        try:
            meta = json.loads((folder / self.files.sidecar).read_bytes())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def weight_files(self, folder: Path) -> tuple[str, ...]:
        """The names the weights may have in `folder` (the sidecar's, when it names one)."""
        if self.files.weights_key is not None:
            named = (self.sidecar(folder) or {}).get(self.files.weights_key)
            if isinstance(named, str):
                return (Path(named).name,)
        return self.files.weights

    def precision(self, folder: Path) -> str | None:
        """The precision the build fixed in the sidecar ("float32", "int8", "fp16"), or None
        when it is chosen at load time (torch) or not recorded."""
        value = (self.sidecar(folder) or {}).get("precision")
        return value if isinstance(value, str) else None


def torch_gpu_missing() -> str | None:
    """None when torch was built with CUDA."""
    import torch

    if torch.backends.cuda.is_built():
        return None
    return f"torch {torch.__version__} is a CPU build"


def onnxruntime_gpu_missing(ort: Any = None) -> str | None:
    """None when onnxruntime (`ort`, default: the installed one) has its CUDA provider."""
    if ort is None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    version = getattr(ort, "__version__", "")
    return f"onnxruntime {version} has no CUDAExecutionProvider (needs onnxruntime-gpu)"


TORCH = RuntimeSpec(
    name="torch",
    label="PyTorch",
    module="slimserve.runtimes.torch_rt",
    packages=("torch",),
    files=ArtifactFiles(
        weights=("model.safetensors", "pytorch_model.bin"), required=("config.json",)
    ),
    load_options=frozenset({"device", "dtype", "threads"}),
    gpu_probe=torch_gpu_missing,
)
ONNXRUNTIME = RuntimeSpec(
    name="onnxruntime",
    label="ONNX Runtime",
    module="slimserve.runtimes.onnx_rt",
    packages=("onnxruntime",),
    # the sidecar: {"model": "model.onnx", "precision": "float32" | "int8", "graph": ...,
    # "append": "model.append.onnx", "weights": "model.onnx.data" (the graphs' one weights file)}
    files=ArtifactFiles(weights=("model.onnx",), sidecar="onnx.json", weights_key="model"),
    load_options=frozenset({"device", "threads"}),  # the graph fixed its precision
    gpu_probe=onnxruntime_gpu_missing,
)
TENSORRT = RuntimeSpec(
    name="tensorrt",
    label="TensorRT",
    module="slimserve.runtimes.trt_rt",
    packages=("tensorrt",),
    # the sidecar: plan, precision, profile limits, TensorRT version, GPU
    files=ArtifactFiles(weights=("model.plan",), sidecar="trt.json", weights_key="plan"),
    load_options=frozenset({"device", "backend"}),  # the engine fixed precision and threads
    needs_gpu=True,
    requires="tensorrt",
)

RUNTIMES: dict[str, RuntimeSpec] = {s.name: s for s in (TORCH, ONNXRUNTIME, TENSORRT)}


def runtime_spec(name: str) -> RuntimeSpec:
    """The spec of runtime `name`; ArtifactError for a runtime nothing here can load."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ArtifactError(f"unknown runtime {name!r} (known: {sorted(RUNTIMES)})") from None
