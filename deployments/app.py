"""The Serve application builder: `import_path: deployments.app:build_app` in serve_config.yaml.

At deploy time it reads the catalogue and the artifact store and deploys every variant that
is built and can run here, one `ModelServer` deployment per variant, behind one `Ingress`.
Every other variant is still listed by `/v1/models`, with the reason it is not deployed (not
built, corrupt manifest, disabled, no GPU for TensorRT, runtime package missing). With no
artifacts at all only the ingress starts, and it answers "not built: run `make artifacts`".

GPUs are counted in the Ray cluster, not in this process (the builder runs in a CPU-only Ray
task, where CUDA may be hidden): with a GPU, torch / ONNX Runtime / TensorRT variants get a
fractional `num_gpus` and `device="cuda"`; the same serve_config.yaml works on both. A runtime
whose package here cannot use a GPU (onnxruntime without its CUDA provider, a CPU build of
torch) and an int8 ONNX graph run on CPU instead, and their cards say so (`note`). The GPU
shares are fitted to the cluster (`num_gpus: auto` shares the GPUs out; explicit shares that
cannot all be scheduled fail here, listing each, instead of a deployment that never starts).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.messages import NOT_BUILT
from deployments.settings import (
    INGRESS_NAME,
    VariantSettings,
    deployment_options,
    fit_gpus,
    parse_args,
    place,
    resolve,
    resolve_path,
)
from slimserve.artifacts import MANIFEST, ArtifactError, ArtifactStore, Manifest
from slimserve.catalogue import Profile, load_profile
from slimserve.hardware import gpu_runtime_missing, missing
from slimserve.protocol import ModelCard
from slimserve.steps import STEPS

log = logging.getLogger("ray.serve")

# What each runtime needs importable on the node (slimserve.runtimes loads them lazily).
RUNTIME_MODULES = {
    "torch": ["torch", "slimserve.runtimes.torch_rt"],
    "onnxruntime": ["onnxruntime", "slimserve.runtimes.onnx_rt"],
    "tensorrt": ["tensorrt", "slimserve.runtimes.trt_rt"],
}


class VariantPlan(BaseModel):
    """One catalogue variant: its card, and how to deploy it (None: not deployed)."""

    card: ModelCard
    options: dict[str, Any] | None = None
    init: dict[str, Any] | None = None  # ModelServer constructor arguments
    gpu_share: float | None = None  # on a GPU: its num_gpus per replica (None = auto)


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (the builder's own process may see none)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    from slimserve.hardware import cuda_devices

    return float(cuda_devices())


def runtime_missing(runtime: str) -> str | None:
    """Why a runtime cannot load on this node, or None."""
    for module in RUNTIME_MODULES.get(runtime, [f"<unknown runtime {runtime}>"]):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"runtime {runtime!r} unavailable here (cannot import {module})"
    return None


def context_length(folder: Path, manifest: Manifest) -> int | None:
    """n_positions from the folder's HF config.json (torch, and ONNX folders that keep it)."""
    config = folder / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["n_positions"])
        except (ValueError, KeyError, TypeError):
            return None
    value = manifest.details.get("context_length")
    return int(value) if isinstance(value, int) else None


JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "onnx.json", "trt.json")
WEIGHTS = {
    "torch": ("model.safetensors", "pytorch_model.bin"),
    "onnxruntime": ("model.onnx",),
    "tensorrt": ("model.plan",),
}


def check_files(folder: Path, manifest: Manifest) -> str | None:
    """Why the folder's files do not match its manifest (missing, truncated, corrupt), or None.

    Cheap checks run at deploy time, so a broken artifact becomes "unavailable: <reason>"
    in /v1/models instead of a replica that fails to start and takes the application with it:
    every JSON sidecar parses and, when the manifest records its size (`bytes`; every build
    does), the weights exist (model.onnx: the one the `onnx.json` sidecar names), a safetensors
    file is exactly as long as its header says, and the files add up to `manifest.bytes`.
    The build writes `bytes` with a provisional manifest in the folder, so the data files may
    fall short of it by at most the size of the final manifest.
    """
    for name in JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (ValueError, OSError) as exc:
                return f"{name} is corrupt ({type(exc).__name__})"
    if manifest.runtime == "torch" and not (folder / "config.json").is_file():
        return "config.json is missing"
    if manifest.bytes <= 0:  # a manifest that records no sizes does not describe its files
        return None
    weights = list(WEIGHTS.get(manifest.runtime, ()))
    sidecar = folder / "onnx.json"
    if manifest.runtime == "onnxruntime" and sidecar.is_file():
        meta_json = json.loads(sidecar.read_bytes())
        named = meta_json.get("model") if isinstance(meta_json, dict) else None
        weights = [Path(named).name] if isinstance(named, str) else weights
    found = [folder / w for w in weights if (folder / w).is_file()]
    if not found:
        return f"weights missing (none of {', '.join(weights)})"
    for path in found:
        if path.suffix == ".safetensors" and (why := _safetensors_problem(path)):
            return f"{path.name} is {why}"
    meta = folder / MANIFEST
    data = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p != meta)
    if not 0 <= manifest.bytes - data <= meta.stat().st_size:
        return f"files hold {data} bytes, the manifest says {manifest.bytes} (changed since built)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors; its
    length must be exactly where the last tensor ends (a truncated copy is shorter)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return "truncated (header)"
            header = json.loads(f.read(n))
        end = max(
            (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        return f"corrupt ({type(exc).__name__})"
    if 8 + n + end != size:
        return f"truncated ({size} bytes, expected {8 + n + end})"
    return None


def plan_variant(
    name: str, profile: Profile, store: ArtifactStore, s: VariantSettings, gpus: float
) -> VariantPlan:
    """Decide whether and how one variant is deployed; the card says why when it is not."""
    v = profile.variants[name]
    card = ModelCard(id=name, step=v.step, parent=v.from_)
    try:
        manifest = store.manifest(name)
    except ArtifactError as exc:
        card.reason = f"unavailable: {exc}"
        return VariantPlan(card=card)
    if manifest is None:
        absent = missing(STEPS[v.step].requires)  # e.g. build-trt on a machine without a GPU
        card.reason = f"not built: {absent}" if absent else NOT_BUILT
        return VariantPlan(card=card)
    folder = store.path(name)
    card.created = int(manifest.created)
    card.runtime = manifest.runtime
    card.params_total = manifest.params_total
    card.params_nonzero = manifest.params_nonzero
    card.bytes = manifest.bytes
    card.perplexity = manifest.metrics.perplexity
    card.agreement = manifest.metrics.agreement
    card.context_length = context_length(folder, manifest)
    if not s.enabled:
        card.reason = f"disabled in serve_config.yaml (args.variants.{name}.enabled: false)"
        return VariantPlan(card=card)
    no_gpu = gpu_runtime_missing(manifest.runtime) if gpus > 0 else None
    placement = place(manifest.runtime, s, gpus, no_gpu, onnx_precision(folder, manifest))
    card.reason = placement.reason or runtime_missing(manifest.runtime)
    if card.reason is not None:
        return VariantPlan(card=card)
    card.note = placement.note
    problem = check_files(folder, manifest)  # only for what would deploy: it reads the files
    if problem is not None:
        card.reason = f"unavailable: {problem}"
        log.warning("%s: %s", name, card.reason)
        return VariantPlan(card=card)
    card.deployed = True
    card.device = placement.device
    card.replicas = s.replicas or (s.autoscaling.min_replicas if s.autoscaling else 1)
    init = {
        "variant": name,
        "folder": str(folder.resolve()),
        "device": placement.device,
        "threads": s.torch_threads,
        "dtype": s.dtype,
    }
    options = deployment_options(s, placement)
    return VariantPlan(card=card, options=options, init=init, gpu_share=placement.num_gpus)


def onnx_precision(folder: Path, manifest: Manifest) -> str | None:
    """An ONNX variant's graph precision ("float32" | "int8") from its sidecar, else None."""
    if manifest.runtime != "onnxruntime":
        return None
    try:
        meta = json.loads((folder / "onnx.json").read_bytes())
    except (OSError, ValueError):
        return None  # check_files names a corrupt sidecar
    return meta.get("precision") if isinstance(meta, dict) else None


def fit_plans(plans: list[VariantPlan], gpus: float) -> None:
    """Set each GPU deployment's `num_gpus` (auto shares fitted to the cluster), or raise
    GpuFitError listing every GPU variant's share and the total."""
    wants: dict[str, tuple[float | None, int]] = {}
    options: dict[str, dict[str, Any]] = {}
    for p in plans:
        if p.options is not None and p.card.device == "cuda":
            scaling = p.options.get("autoscaling_config") or {}
            replicas = p.options.get("num_replicas") or scaling.get("initial_replicas", 1)
            wants[p.card.id], options[p.card.id] = (p.gpu_share, replicas), p.options
    for name, share in (fit_gpus(wants, gpus) if wants else {}).items():
        options[name]["ray_actor_options"]["num_gpus"] = share


def plan(args: dict[str, Any] | None) -> tuple[list[VariantPlan], dict[str, Any]]:
    """Every variant's plan and the ingress's catalogue, from the builder's args (no Ray)."""
    settings = parse_args(args)
    profile = load_profile(resolve_path(settings.config))
    root = resolve_path(settings.artifacts_dir or profile.artifacts_dir)
    store = ArtifactStore(root, profile.name)
    per_variant = resolve(settings, list(profile.variants))
    if INGRESS_NAME in profile.variants:
        raise ValueError(f"variant name {INGRESS_NAME!r} is reserved for the ingress deployment")
    gpus = cluster_gpus()
    plans = [plan_variant(n, profile, store, per_variant[n], gpus) for n in profile.order()]
    fit_plans(plans, gpus)
    built = any(p.card.runtime is not None for p in plans)
    from slimserve.hardware import machine

    catalogue = {
        "profile": profile.name,
        "teacher": profile.teacher,
        "cards": [p.card.model_dump() for p in plans],
        "message": None if built else NOT_BUILT,
        "machine": {**machine(), "cluster_gpus": gpus, "artifacts": str(store.dir)},
        "ingress": settings.ingress.model_dump(),
    }
    return plans, catalogue


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder: one deployment per deployable variant, one ingress."""
    from deployments.model import ModelServer  # torch is imported by model replicas only

    plans, catalogue = plan(args)
    models = {}
    for p in plans:
        if p.options is None or p.init is None:
            log.info("not deploying %s: %s", p.card.id, p.card.reason)
            continue
        models[p.card.id] = ModelServer.options(name=p.card.id, **p.options).bind(**p.init)
    settings = catalogue.pop("ingress")
    return Ingress.bind(models, catalogue, settings)
