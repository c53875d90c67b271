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

import json
import logging
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.messages import NOT_BUILT
from deployments.settings import (
    INGRESS_NAME,
    IngressSettings,
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
from slimserve.hardware import machine, missing
from slimserve.protocol import ModelCard
from slimserve.runtimes import RUNTIMES, gpu_runtime_missing, runtime_spec
from slimserve.steps import STEPS

log = logging.getLogger("ray.serve")


class ServerArgs(BaseModel):
    """`ModelServer(...)` constructor arguments: what one variant's replicas load."""

    variant: str
    folder: str  # absolute: a replica may not start in the project folder
    device: Literal["cpu", "cuda"]
    threads: int  # intra-op threads, explicit (a fractional-CPU replica would get one)
    dtype: str | None = None  # passed on only to runtimes that choose a precision at load


class VariantPlan(BaseModel):
    """One catalogue variant: its card, and how to deploy it (options None: not deployed)."""

    card: ModelCard
    options: dict[str, Any] | None = None  # `Deployment.options(...)`, Ray Serve's names
    init: ServerArgs | None = None
    gpu_share: float | None = None  # on a GPU: its num_gpus per replica (None = auto)


class DeploymentPlan(BaseModel):
    """What `build_app` deploys, decided without Serve: every variant's plan, the ingress's
    settings, and what /v1/models and /healthz report."""

    profile: str
    teacher: str
    variants: list[VariantPlan]  # every catalogue variant, in build order
    ingress: IngressSettings
    message: str | None = None  # NOT_BUILT when no variant is built
    machine: dict[str, Any]  # the builder's machine stamp, cluster GPUs, artifacts folder

    def catalogue(self) -> dict[str, Any]:
        """The ingress's catalogue: profile, teacher, every card, message, machine."""
        return {
            "profile": self.profile,
            "teacher": self.teacher,
            "cards": [p.card.model_dump() for p in self.variants],
            "message": self.message,
            "machine": self.machine,
        }


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (the builder's own process may see none)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    from slimserve.hardware import cuda_devices

    return float(cuda_devices())


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


# Every JSON file an artifact may hold: the HF config and tokenizer, and each runtime's sidecar.
JSON_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    *(s.files.sidecar for s in RUNTIMES.values() if s.files.sidecar),
)


def check_files(folder: Path, manifest: Manifest) -> str | None:
    """Why the folder's files do not match its manifest (missing, truncated, corrupt), or None.

    Cheap checks run at deploy time, so a broken artifact becomes "unavailable: <reason>"
    in /v1/models instead of a replica that fails to start and takes the application with it:
    every JSON sidecar parses, the files the runtime's spec requires exist and, when the
    manifest records its size (`bytes`; every build does), the weights exist (by the name the
    sidecar gives, when it names them), a safetensors file is exactly as long as its header
    says, and the files add up to `manifest.bytes`.
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
    spec = runtime_spec(manifest.runtime)
    for name in spec.files.required:
        if not (folder / name).is_file():
            return f"{name} is missing"
    if manifest.bytes <= 0:  # a manifest that records no sizes does not describe its files
        return None
    weights = spec.weight_files(folder)
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
    spec = runtime_spec(manifest.runtime)
    no_gpu = gpu_runtime_missing(spec.name) if gpus > 0 else None
    placement = place(spec.name, s, gpus, no_gpu, spec.precision(folder))
    card.reason = placement.reason or spec.missing_here()
    if card.reason is not None:
        return VariantPlan(card=card)
    card.note = placement.note
    problem = check_files(folder, manifest)  # only for what would deploy: it reads the files
    if problem is not None:
        card.reason = f"unavailable: {problem}"
        log.warning("%s: %s", name, card.reason)
        return VariantPlan(card=card)
    assert placement.device is not None  # place() gives a reason whenever it gives no device
    card.deployed = True
    card.device = placement.device
    card.replicas = s.replicas or (s.autoscaling.min_replicas if s.autoscaling else 1)
    init = ServerArgs(
        variant=name,
        folder=str(folder.resolve()),
        device=placement.device,
        threads=s.torch_threads,
        dtype=s.dtype,
    )
    options = deployment_options(s, placement)
    return VariantPlan(card=card, options=options, init=init, gpu_share=placement.num_gpus)


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


def plan(args: dict[str, Any] | None) -> DeploymentPlan:
    """Every variant's plan and the ingress's settings, from the builder's args (no Ray)."""
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
    return DeploymentPlan(
        profile=profile.name,
        teacher=profile.teacher,
        variants=plans,
        ingress=settings.ingress,
        message=None if built else NOT_BUILT,
        machine={**machine(), "cluster_gpus": gpus, "artifacts": str(store.dir)},
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder: one deployment per deployable variant, one ingress."""
    from deployments.model import ModelServer  # torch is imported by model replicas only

    deployment = plan(args)
    models = {}
    for p in deployment.variants:
        if p.options is None or p.init is None:
            log.info("not deploying %s: %s", p.card.id, p.card.reason)
            continue
        models[p.card.id] = ModelServer.options(name=p.card.id, **p.options).bind(
            **p.init.model_dump()
        )
    return Ingress.bind(models, deployment.catalogue(), deployment.ingress.model_dump())
