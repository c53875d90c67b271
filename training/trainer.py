"""Ray Train plumbing: start Ray once, size the workers, build and run a `TorchTrainer`.

Worker sizing matters on CPU: a worker's `resources_per_worker["CPU"]` becomes its thread
count, and Ray's default of one CPU per worker trained ~30 % slower on a 2-core machine than
giving each worker all its cores. So on CPU each worker gets
`cpus_per_worker` (the profile's, or all cores / workers); on GPU each worker gets one GPU, or
an equal share of the GPUs free when Serve replicas hold some (never a wait for GPUs that a
running application will not release: too little free is an error).

Resume is Ray Train's: a run is identified by `RunConfig(name, storage_path)`; starting a run
whose storage already holds checkpoints makes `ray.train.get_checkpoint()` return the latest one
inside the workers (Ray Train V2, the default in Ray 2.60).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.catalogue import TrainingDefaults

# Simulates a crash: a run raises after this many steps of training (whatever was done since
# its last checkpoint is lost, as in a real crash), so tests and demos can check that the next
# attempt resumes from that checkpoint. Unset in normal use.
INTERRUPT_ENV = "SLIMSERVE_INTERRUPT_AFTER_STEPS"
# How long the GPU check waits for its trial reservation (an autoscaling cluster adding a GPU
# node needs longer; the default only lets the local scheduler answer).
GPU_WAIT_ENV = "SLIMSERVE_TRAIN_GPU_WAIT_S"
MIN_SHARE = 0.05  # the smallest CPU or GPU share per worker reserved instead of failing


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, on what, with how many threads each."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float  # Ray's logical reservation (fractional when others hold CPUs)
    threads: int  # torch threads per worker
    gpus_per_worker: float = 0.0  # 1 = a whole GPU; a fraction when others hold GPU shares

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


def ensure_ray() -> None:
    """Start a local Ray (or join `RAY_ADDRESS`) unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts its workers at niceness 15, below its own daemons and anything else on
        # the machine; on 2 cores every preemption of one of a worker's two OpenMP threads
        # stalls the other at the next barrier. A Ray started here runs workers at 0.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # The dashboard stays on: Ray Train's placement-group cleaner polls the State API,
        # which needs it, and warns every second while a run is in flight without it.
        ray.init(configure_logging=False)


def plan_workers(training: TrainingDefaults, workers: int | None = None) -> WorkerPlan:
    """Resolve the profile's training defaults against this cluster (call after `ensure_ray`).

    `use_gpu: auto` means "when the Ray cluster has GPUs" (the workers run there, not here);
    `cpus_per_worker: None` means the cluster's CPUs divided by the workers, capped by what is
    free now (another job, e.g. a Serve replica, may hold some) so the trainer does not wait
    forever for CPUs nobody will release: under one free CPU per worker the reservation becomes
    that fraction (the threads stay at cores / workers; idle replicas leave the cores free), and
    with less than 0.05 CPU free per worker this raises instead of waiting. GPUs follow the
    same rule (`gpu_share`).
    """
    import ray

    n = workers or training.workers
    if training.use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    else:
        use_gpu = bool(training.use_gpu)
    gpus = gpu_share(n) if use_gpu else 0.0
    if training.cpus_per_worker is not None:
        fixed = training.cpus_per_worker
        return WorkerPlan(n, use_gpu, cpus_per_worker=fixed, threads=fixed, gpus_per_worker=gpus)
    total = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    free = float(ray.available_resources().get("CPU", 0.0))
    share = min(total, free) / n
    if share >= 1:
        cpus: float = int(share)
        threads = int(share)
    elif share >= MIN_SHARE:
        cpus = math.floor(share * 100) / 100
        threads = max(1, total // n)
    else:
        raise RuntimeError(
            f"Ray has {free:.2f} of {total} CPUs free for {n} training worker(s): something else "
            "(e.g. Serve replicas) holds them. Stop it, or set training.cpus_per_worker."
        )
    return WorkerPlan(n, use_gpu, cpus_per_worker=cpus, threads=threads, gpus_per_worker=gpus)


def gpu_share(n: int) -> float:
    """GPUs per worker for `n` GPU workers: 1 when that many are free, else an equal share of
    what is free (rounded down to 0.01); raises when under 0.05 per worker is free, or when the
    free capacity is split so that the shares do not fit single GPUs (a trial reservation
    checks it), instead of letting Ray Train wait forever for GPUs Serve replicas hold."""
    import ray

    total = float(ray.cluster_resources().get("GPU", 0.0))
    free = float(ray.available_resources().get("GPU", 0.0))
    share = 1.0 if free >= n else math.floor(free / n * 100) / 100
    advice = (
        "something else (e.g. Serve replicas, which hold GPU shares) holds them. Stop it "
        "(`serve shutdown`), or set training.use_gpu: false."
    )
    if share < MIN_SHARE:
        raise RuntimeError(
            f"Ray has {free:.2f} of {total:g} GPUs free for {n} training worker(s): {advice}"
        )
    if not gpus_fit(n, share):
        raise RuntimeError(
            f"Ray has {free:.2f} of {total:g} GPUs free, but not {share:g} of one GPU for each "
            f"of {n} training worker(s) (the free shares are split across GPUs): {advice}"
        )
    return share


def gpus_fit(n: int, share: float) -> bool:
    """Whether `n` bundles of `share` GPU can be reserved now: a placement group that is
    removed again at once (Ray Train then makes its own)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    wait_s = float(os.environ.get(GPU_WAIT_ENV, "5"))
    group = placement_group([{"GPU": share}] * n)
    try:
        ready, _ = ray.wait([group.ready()], timeout=wait_s)
        return bool(ready)
    finally:
        remove_placement_group(group)


def scaling_config(plan: WorkerPlan):
    """`ScalingConfig` for `plan`: the worker's CPUs, and on GPU its share (one GPU when free)."""
    from ray.train import ScalingConfig

    resources = {"CPU": plan.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = plan.gpus_per_worker or 1.0
    return ScalingConfig(
        num_workers=plan.workers,
        use_gpu=plan.use_gpu,
        resources_per_worker=resources,
    )


def fit(
    train_fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    plan: WorkerPlan,
    storage: Path,
    name: str,
):
    """Run `train_fn` on the workers; return Ray Train's `Result` (raises on a failed run).

    Checkpoints go to `storage/name/`; a second call with the same arguments resumes from the
    latest of them. Two checkpoints are kept (the latest may be mid-upload when interrupted).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        scaling_config=scaling_config(plan),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
            logging_config=LoggingConfig(log_level="WARNING"),  # progress lines are ours
        ),
    )
    return trainer.fit()


@dataclass
class JobOutcome:
    """A finished run: its final model folder (HF format) and its last reported metrics."""

    model_dir: Path
    metrics: dict[str, Any]


def run_job(
    job: Any,
    storage: Path,
    name: str,
    plan: WorkerPlan,
    log: Callable[[str], None],
) -> JobOutcome:
    """Train `job` (a `training.loop.LoopConfig`) with Ray Train; resumable, idempotent.

    The final model is copied to `storage/<name>.final/` with `outcome.json` beside it, so a
    step that runs several jobs (distill + its CE-only baseline) and is interrupted in the
    second one does not redo the first on the next attempt.
    """
    import json
    import shutil

    from training.loop import train_worker

    final = storage / f"{name}.final"
    marker = final / "outcome.json"
    if marker.is_file():
        log(f"{job.label}: already trained (reusing {final})")
        return JobOutcome(final, json.loads(marker.read_text()))
    log(
        f"{job.label}: Ray Train, {plan.workers} worker(s) on {plan.device}, "
        f"{plan.cpus_per_worker} CPU(s) each, checkpoints in {storage / name}"
    )
    result = fit(train_worker, {"job": job}, plan, storage, name)
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or not metrics.get("final"):
        # Ctrl-C makes Ray Train abort the run and return normally from `fit`, with the last
        # (not final) checkpoint: that must not become the step's model.
        raise KeyboardInterrupt(
            f"{job.label}: training stopped at step {metrics.get('step', 0)} before the end; "
            f"run again to resume from the last checkpoint in {storage / name}"
        )
    tmp = storage / f"{name}.final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "model", tmp)
    (tmp / "outcome.json").write_text(json.dumps(metrics, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return JobOutcome(final, metrics)


def job_for(ctx: Any, init_dir: str, plan: WorkerPlan, label: str, **extra: Any) -> Any:
    """A `LoopConfig` over the step's data and budget (`extra`: teacher / KD / mask fields)."""
    from training.loop import LoopConfig

    t = ctx.profile.block_size
    return LoopConfig(
        init_dir=init_dir,
        train_blocks=ctx.data.blocks("train", t).numpy().astype("int32"),
        val_blocks=ctx.data.blocks("validation", t).numpy().astype("int32"),
        budget=ctx.params,
        seed=ctx.profile.seed,
        label=label,
        threads=plan.threads,
        interrupt_after_steps=int(os.environ.get(INTERRUPT_ENV, "0")) or None,
        **extra,
    )


def export_model(model_dir: Path, ctx: Any) -> None:
    """Copy a trained model (HF files) and the tokenizer into the step's output folder."""
    import shutil

    from slimserve.tokenizer import copy_tokenizer_files

    for f in model_dir.iterdir():
        if f.is_file() and f.name != "outcome.json":
            shutil.copy2(f, ctx.out_dir / f.name)
    copy_tokenizer_files(ctx.data.tokenizer_dir, ctx.out_dir)


def training_details(outcome: JobOutcome, plan: WorkerPlan) -> dict[str, Any]:
    """The facts a manifest keeps about a run (from its last report)."""
    m = outcome.metrics
    keys = (
        "step",
        "tokens",
        "initial_val_loss",
        "train_loss",
        "val_loss",
        "val_perplexity",
        "tokens_per_s",
        "seconds",
    )
    return {
        **{k: m.get(k) for k in keys},
        "resumed_from_step": m.get("resumed_from_step"),
        # Runs stop at their token budget (never on a clock), so two machines train the same
        # tokens and their figures compare; a run that ends any other way raises instead.
        "stop_reason": "token budget" if m.get("final") else "interrupted",
        "workers": plan.workers,
        "device": plan.device,
        "cpus_per_worker": plan.cpus_per_worker,
        "gpus_per_worker": plan.gpus_per_worker,
        "threads": plan.threads,
    }
