"""Load any artifact folder as a `Runtime`, dispatching on its manifest's `runtime`.

Backends are imported lazily, so loading an ONNX variant never imports TensorRT (and the
reverse), and a machine without one backend can still load the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from slimserve.artifacts import MANIFEST, ArtifactError, read_manifest
from slimserve.runtimes.base import KVState, Runtime, RuntimeInfo, merge, select

__all__ = ["KVState", "Runtime", "RuntimeInfo", "load", "merge", "runtime_name", "select"]

_BACKENDS = {
    "torch": "slimserve.runtimes.torch_rt",
    "onnxruntime": "slimserve.runtimes.onnx_rt",
    "tensorrt": "slimserve.runtimes.trt_rt",
}


def runtime_name(folder: str | Path) -> str:
    """The runtime an artifact folder needs: its manifest's, or "torch" for a bare HF folder."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder).runtime
    if (folder / "config.json").is_file():
        return "torch"  # a plain `save_pretrained` folder (no pipeline manifest)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    raise ArtifactError(f"{folder}: neither {MANIFEST} nor config.json; not a loadable artifact")


def load(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
) -> Runtime:
    """Load the artifact in `folder` with the runtime its manifest names.

    device: "cpu", "cuda", "cuda:N" or None (the backend's default: CUDA when present).
    dtype: torch only ("float32" | "float16" | "bfloat16", None = fp32 on CPU, fp16 on CUDA);
    ONNX and TensorRT artifacts have their precision fixed when built, so it is not passed on.
    threads: intra-op CPU threads (None: $SLIMSERVE_TORCH_THREADS or the backend's default).
    Raises ArtifactError for a missing / corrupt folder or an unknown runtime.
    """
    name = runtime_name(folder)
    if name not in _BACKENDS:
        raise ArtifactError(f"{folder}: unknown runtime {name!r} (known: {sorted(_BACKENDS)})")
    module = importlib.import_module(_BACKENDS[name])
    if name == "torch":
        return module.load(folder, device=device, dtype=dtype, threads=threads)
    return module.load(folder, device=device, threads=threads)
