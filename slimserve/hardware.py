"""What this machine has: CUDA GPUs, TensorRT. Detected, never assumed, never hidden."""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def cuda_devices() -> int:
    """Number of CUDA GPUs torch can use (0 on CPU-only machines or CPU builds of torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not break CPU use
        return 0


def has_cuda() -> bool:
    return cuda_devices() > 0


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    if not has_cuda():
        return "no NVIDIA GPU (TensorRT needs one to build or run engines)"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'slimserve[tensorrt]')"
    return None


def missing(requirement: str) -> str | None:
    """One line saying why `requirement` ("none" | "gpu" | "tensorrt") is not met, or None."""
    if requirement not in _CHECKS:
        raise ValueError(f"unknown hardware requirement {requirement!r}")
    return _CHECKS[requirement]()


def _gpu_missing() -> str | None:
    return None if has_cuda() else "no CUDA GPU on this machine"


_CHECKS: dict[str, Callable[[], str | None]] = {
    "none": lambda: None,
    "gpu": _gpu_missing,
    "tensorrt": lambda: tensorrt_missing(),  # looked up per call, as the GPU check is
}


def machine() -> dict[str, str | int]:
    """A stamp for reports: CPU model, cores, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = "none"
    if has_cuda():
        import torch

        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "gpu": gpu, "platform": platform.platform()}
