"""Load any artifact folder as a `Runtime`, dispatching on its manifest's `runtime`.

Each runtime is declared once, as a `RuntimeSpec` in `slimserve.runtimes.spec` (its packages,
its files, whether it needs or can use a GPU, the load options it takes), and registered in
`RUNTIMES`; callers ask `runtime_spec(name)` instead of branching on the name.

Backends are imported lazily, so loading an ONNX variant never imports TensorRT (and the
reverse), and a machine without one backend can still load the others. Importing this package
imports no torch either (`KVState` and the other names of `base` load on first use), so the
Serve app builder can ask the specs from a process that never loads a model.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimserve.artifacts import MANIFEST, ArtifactError, read_manifest
from slimserve.runtimes.spec import RUNTIMES, ArtifactFiles, RuntimeSpec, runtime_spec

if TYPE_CHECKING:
    from slimserve.runtimes.base import KVState, Runtime, RuntimeInfo, merge, select

__all__ = [
    "RUNTIMES",
    "ArtifactFiles",
    "KVState",
    "Runtime",
    "RuntimeInfo",
    "RuntimeSpec",
    "gpu_runtime_missing",
    "load",
    "merge",
    "runtime_name",
    "runtime_spec",
    "select",
]

_FROM_BASE = frozenset({"KVState", "Runtime", "RuntimeInfo", "merge", "select"})


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from slimserve.runtimes import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@lru_cache(maxsize=8)
def gpu_runtime_missing(runtime: str) -> str | None:
    """Why this node's package for `runtime` cannot run on a GPU (whatever GPUs it has), or None.

    Asked about the package, not the device, so a CPU-only process (the Serve app builder) can
    tell whether a replica on a GPU node of the same image could use its GPU.
    """
    return runtime_spec(runtime).gpu_missing()


def load(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
) -> Runtime:
    """Load the artifact in `folder` with the runtime its manifest names.

    device: "cpu", "cuda", "cuda:N" or None (the backend's default: CUDA when present).
    dtype: for runtimes that choose a precision at load time (torch: "float32" | "float16" |
    "bfloat16", None = fp32 on CPU, fp16 on CUDA); ONNX and TensorRT artifacts have their
    precision fixed when built, so their specs do not take it and it is not passed on.
    threads: intra-op CPU threads (None: $SLIMSERVE_TORCH_THREADS or the backend's default).
    Raises ArtifactError for a missing / corrupt folder or an unknown runtime.
    """
    name = runtime_name(folder)
    try:
        spec = runtime_spec(name)
    except ArtifactError as exc:
        raise ArtifactError(f"{folder}: {exc}") from None
    return spec.load(folder, device=device, dtype=dtype, threads=threads)
