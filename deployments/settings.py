"""The `args:` of `serve_config.yaml`, validated at the edge (pydantic), and what they decide.

Per-variant settings live in the builder's args, not under Ray's `deployments:` list: Ray
rejects a `deployments:` entry for a deployment the builder did not create (a variant that is
not built), and a YAML `ray_actor_options` replaces the code's dict instead of merging into it.

`args.defaults` applies to every variant; `args.variants.<name>` overrides it key by key.
`parse_args(args)` and `resolve(settings, names)` raise one `SettingsError` naming every bad
field. Two rules keep Serve from undoing the engine's work:

* `max_ongoing_requests >= 2 * max_batch_size`: Serve stops sending a replica requests at
  `max_ongoing_requests` (default 5), so a smaller value caps the continuous batch; twice the
  batch lets a full batch run while the next one waits inside the replica for a free slot.
* fractional `num_cpus` (2-core machines fit several replicas) with torch threads set
  explicitly: a replica with `num_cpus: 0.25` would otherwise get one thread by accident or
  every core by default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimserve.runtimes import runtime_spec
from slimserve.strict import Strict as CoreStrict

INGRESS_NAME = "Ingress"
"""Deployment name of the ingress: the only entry `serve_config.yaml` lists under deployments."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """Bad `args` in serve_config.yaml; the message names every bad field."""


class Strict(CoreStrict):
    model_config = ConfigDict(allow_inf_nan=False)


class AutoscalingSettings(Strict):
    """Serve autoscaling for one variant (instead of a fixed replica count)."""

    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(2, ge=1, le=1024)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="per replica (None = max_batch_size: scale when batches fill)"
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class VariantSettings(Strict):
    """How one variant is deployed: replicas, resources, batching and limits."""

    enabled: bool = Field(True, description="false: listed by /v1/models but not deployed")
    replicas: int | None = Field(None, ge=1, le=1024, description="fixed count (None = 1)")
    autoscaling: AutoscalingSettings | None = Field(None, description="instead of replicas")
    num_cpus: float = Field(0.2, gt=0, le=1024, description="CPUs reserved per replica")
    num_gpus: Annotated[float, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto",
        description="GPU share per replica on a GPU (auto = the cluster's GPUs shared out "
        "evenly among the GPU replicas left after the explicit shares)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = a GPU when the Ray cluster has one (and num_gpus != 0)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="torch variants only (None = fp32 on CPU, fp16 on GPU)"
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="torch / ORT intra-op threads (None = max(1, num_cpus))"
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="rows decoded together")
    max_wait_ms: float = Field(2.0, ge=0, le=10_000, description="idle engine waits for company")
    decode_burst: int = Field(
        16, ge=1, le=256, description="decode steps per hand-off to the loop (1 = every step)"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, le=100_000, description="per replica (None = 2 × max_batch_size)"
    )
    max_queued_requests: int = Field(
        64, ge=1, le=1_000_000, description="queue limit per caller; past it HTTP 503"
    )
    stream_min_interval_ms: float = Field(
        20.0, ge=0, le=1000, description="streamed deltas after the first at most this often"
    )
    retry_after_s: float = Field(1.0, ge=0, le=3600, description="Retry-After on 503")
    health_check_period_s: float = Field(10.0, gt=0, le=3600)
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, le=3600)
    access_log: bool = Field(
        False,
        description="Serve's line per call in the replica's log (the ingress logs each request)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> VariantSettings:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("replicas: give either replicas or autoscaling, not both")
        if self.ongoing < 2 * self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests: must be >= 2 × max_batch_size "
                f"({2 * self.max_batch_size}), got {self.ongoing} (it would cap batching)"
            )
        return self

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, math.floor(self.num_cpus))


class IngressSettings(Strict):
    """The one HTTP ingress (FastAPI) in front of every variant."""

    request_timeout_s: float = Field(
        240.0, gt=0, le=3600, description="-> 408; keep below http_options.request_timeout_s"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="larger -> 413")
    body_timeout_s: float = Field(
        5.0, gt=0, le=300, description="the whole body must arrive within this -> else 408"
    )
    max_pending_bodies: int = Field(
        128, ge=1, le=1000, description="requests sending their body at once; oldest -> 408"
    )
    api_key_env: str = Field(
        "SLIMSERVE_API_KEY", min_length=1, description="env var holding the bearer key, if set"
    )
    compare_warmup_tokens: int = Field(4, ge=1, le=64, description="untimed warm-up per variant")
    stream_channel: bool = Field(
        True,
        description="streamed events over one socket per replica (deployments/channel.py); "
        "false: as Serve streaming responses",
    )
    stream_channel_host: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="where the events inbox listens (None = 127.0.0.1 when the HTTP front "
        "is bound to loopback on a one-node cluster, else this node's address; 0.0.0.0 = "
        "every interface)",
    )


class AppSettings(Strict):
    """`applications[].args` of serve_config.yaml."""

    config: str = Field("configs/tiny.yaml", description="the profile (catalogue) file")
    artifacts_dir: str | None = Field(None, description="override the profile's artifacts_dir")
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    defaults: dict[str, Any] = Field(default_factory=dict, description="VariantSettings fields")
    variants: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="per-variant overrides of defaults"
    )


def _lines(exc: ValidationError, prefix: str) -> list[str]:
    """One 'args.field: message' line per pydantic error."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and ": " in msg:  # a model-level rule that names its field first
            field, msg = msg.split(": ", 1)
            loc = [field]
        out.append(f"{'.'.join([prefix, *loc])}: {msg}")
    return out


def parse_args(args: dict[str, Any] | None) -> AppSettings:
    """Validate the top level and `defaults`; per-variant problems come from `resolve`."""
    raw = args or {}
    problems: list[str] = []
    settings = None
    try:
        settings = AppSettings.model_validate(raw)
    except ValidationError as exc:
        problems += _lines(exc, "args")
    if isinstance(raw, dict) and isinstance(raw.get("defaults"), dict):
        try:
            VariantSettings.model_validate(raw["defaults"])
        except ValidationError as exc:
            problems += _lines(exc, "args.defaults")
    if problems or settings is None:
        raise SettingsError(_message(problems))
    return settings


def resolve(settings: AppSettings, names: list[str]) -> dict[str, VariantSettings]:
    """Each catalogue variant's settings (defaults, then its overrides); unknown names fail."""
    problems = [
        f"args.variants.{name}: no such variant in the profile (have: {', '.join(names)})"
        for name in settings.variants
        if name not in names
    ]
    out: dict[str, VariantSettings] = {}
    for name in names:
        override = settings.variants.get(name) or {}
        try:
            out[name] = VariantSettings.model_validate({**settings.defaults, **override})
        except ValidationError as exc:
            # Defaults passed alone, so every problem here comes from this variant's override.
            problems += _lines(exc, f"args.variants.{name}")
    if problems:
        raise SettingsError(_message(problems))
    return out


def _message(lines: list[str]) -> str:
    return f"serve_config.yaml args: {len(lines)} problem(s)\n  " + "\n  ".join(lines)


def resolve_path(path: str | Path) -> Path:
    """Absolute paths as given; relative ones against the working directory when they exist
    there, else against the project root (a Ray worker may not start in the project folder)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (Path.cwd() / p) if (Path.cwd() / p).exists() else (PROJECT_ROOT / p)


class Placement(BaseModel):
    """Where a variant's replicas run, or why it cannot run here."""

    device: Literal["cpu", "cuda"] | None
    num_gpus: float | None = 0.0  # None: "auto", a share fitted to the cluster (`fit_gpus`)
    reason: str | None = None  # why it is not deployed
    note: str | None = None  # why it runs on CPU although the cluster has a GPU


INT8_ON_CPU = (
    "int8 ONNX graph kept on CPU (the CUDA provider runs its integer ops on the CPU; "
    "device: cuda overrides)"
)


def place(
    runtime: str,
    s: VariantSettings,
    cluster_gpus: float,
    gpu_missing: str | None = None,
    precision: str | None = None,
) -> Placement:
    """GPU (a fractional share) when the cluster has one, the settings allow it and the runtime
    can use it, else CPU, saying why in `note`.

    runtime: the manifest's; its spec says whether it runs on a GPU only (TensorRT) or on
    either. gpu_missing: why the runtime's package cannot use a GPU
    (`slimserve.runtimes.gpu_runtime_missing`: a CPU build of torch, onnxruntime without its
    CUDA provider). precision: a graph's fixed precision ("int8" stays on CPU unless
    `device: cuda`).
    """
    spec = runtime_spec(runtime)
    if s.device == "cuda" and s.num_gpus == 0:
        return Placement(device=None, reason="device: cuda needs num_gpus > 0")
    wants_gpu = s.device == "cuda" or (s.device == "auto" and s.num_gpus != 0)
    note = None
    if cluster_gpus > 0 and wants_gpu and s.device == "auto" and precision == "int8":
        wants_gpu, note = False, INT8_ON_CPU
    if wants_gpu and cluster_gpus > 0 and gpu_missing and not spec.needs_gpu:
        if s.device == "cuda":
            return Placement(device=None, reason=f"device: cuda, but {gpu_missing}")
        wants_gpu, note = False, f"on CPU: {gpu_missing}"
    if wants_gpu and cluster_gpus > 0:
        share = None if s.num_gpus == "auto" else float(s.num_gpus)
        return Placement(device="cuda", num_gpus=share)
    if spec.needs_gpu:
        why = "device: cpu" if s.device == "cpu" else "no GPU in the Ray cluster"
        return Placement(device=None, reason=f"{spec.label} needs an NVIDIA GPU ({why})")
    if s.device == "cuda":
        return Placement(device=None, reason="device: cuda, but the Ray cluster has no GPU")
    return Placement(device="cpu", note=note)


class GpuFitError(SettingsError):
    """The variants' GPU shares cannot all be scheduled on the cluster's GPUs."""


def fit_gpus(wants: dict[str, tuple[float | None, int]], cluster_gpus: float) -> dict[str, float]:
    """Each GPU variant's share per replica, fitted to the cluster, or GpuFitError.

    wants: variant -> (its share, None for auto; its replica count). Ray packs fractional
    shares onto single GPUs (a 0.6 share never spans two), so the check packs replicas into
    GPUs of capacity 1 (largest first), explicit shares first; the auto share is then the
    largest multiple of 0.01 that fits every auto replica into what is left. Anything that
    does not fit raises, naming each variant's share and the total, instead of leaving
    replicas pending (the application would stay DEPLOYING forever).
    """
    free = [1.0] * int(math.floor(cluster_gpus + 1e-9))
    explicit = sorted(
        ((n, sh) for n, (sh, k) in wants.items() if sh is not None for _ in range(k)),
        key=lambda item: -item[1],
    )
    fits = all(_take(free, share) for _, share in explicit)
    auto = {n: k for n, (sh, k) in wants.items() if sh is None}
    shares = {n: float(sh) for n, (sh, _) in wants.items() if sh is not None}
    count = sum(auto.values())
    if fits and count:
        best = next(
            (
                c / 100
                for c in range(100, 0, -1)
                if sum(int(f * 100 + 1e-6) // c for f in free) >= count
            ),
            None,
        )
        fits = best is not None
        shares.update({n: best or 0.0 for n in auto})
    if fits:
        return shares
    listing = ", ".join(
        f"{n} {'auto' if sh is None else format(sh, 'g')} x {k}" for n, (sh, k) in wants.items()
    )
    total = sum((sh or 0.01) * k for sh, k in wants.values())
    raise GpuFitError(
        f"GPU shares do not fit the Ray cluster's {cluster_gpus:g} GPU(s): {listing} "
        f"(per replica x replicas; total {total:g} GPUs, auto counted at its minimum 0.01). "
        "Lower num_gpus or set it to auto, set device: cpu on some variants, or add GPUs."
    )


def _take(free: list[float], share: float) -> bool:
    """Reserve `share` of one GPU (whole GPUs for shares >= 1) in `free`; False if none fits."""
    if share >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - 1e-9][: math.ceil(share)]
        if len(whole) < math.ceil(share):
            return False
        for i in whole:
            free[i] = 0.0
        return True
    for i, f in enumerate(free):
        if f + 1e-9 >= share:
            free[i] = f - share
            return True
    return False


def deployment_options(s: VariantSettings, placement: Placement) -> dict[str, Any]:
    """`Deployment.options(...)` for one variant (Ray Serve names)."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.ongoing,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": placement.num_gpus or 0.0},
        "user_config": engine_config(s),
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
        "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s,
        "logging_config": {"enable_access_log": s.access_log},
    }
    if s.autoscaling is not None:
        a = s.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(1, a.min_replicas),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests or s.max_batch_size,
        }
    else:
        opts["num_replicas"] = s.replicas or 1
    return opts


def engine_config(s: VariantSettings) -> dict[str, Any]:
    """The replica's `user_config` (live-reconfigurable batching); the engine's own queue
    never binds before Serve's `max_ongoing_requests` does."""
    return {
        "max_batch_size": s.max_batch_size,
        "max_wait_ms": s.max_wait_ms,
        "decode_burst": s.decode_burst,
        "max_queue": s.ongoing,
        "stream_min_interval_ms": s.stream_min_interval_ms,
    }
