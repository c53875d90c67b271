"""The pipeline runner: build what is missing or stale, in dependency order.

A variant is *stale* when its step's config hash changed, or when a dependency (its parent, and
the teacher for steps that distil) was rebuilt since (`parent_hash` no longer matches).
A step whose hardware is absent (TensorRT without a GPU) is skipped with one line saying why,
and so is everything below it. Each step writes into a temp folder the store renames into
place after the runner has evaluated the result and written its manifest.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from slimserve import hardware
from slimserve.artifacts import (
    ArtifactError,
    ArtifactStore,
    Manifest,
    Metrics,
    folder_bytes,
    write_manifest,
)
from slimserve.catalogue import Profile
from slimserve.data import DataBundle, prepare
from slimserve.steps import STEPS

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class StepContext:
    """Everything a step needs; a step writes its loadable files into `out_dir`."""

    profile: Profile
    variant: str
    params: BaseModel
    out_dir: Path  # temp folder, renamed into place on success
    parent_dir: Path | None
    teacher_dir: Path | None
    data: DataBundle
    checkpoint_dir: Path  # survives an interrupted run (resume); removed after success
    log: Log = log_stderr


@dataclass
class StepResult:
    """What a step reports back; the runner adds sizes, hashes and evaluation."""

    details: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    params_total: int | None = None  # None = counted from *.safetensors in out_dir
    params_nonzero: int | None = None
    evaluate: bool = True


@dataclass
class PlanItem:
    variant: str
    action: str  # "build" | "fresh" | "skip"
    reason: str


@dataclass
class Row:
    variant: str
    step: str
    status: str
    manifest: Manifest | None = None
    seconds: float | None = None


def deps_hash(store: ArtifactStore, profile: Profile, variant: str) -> str | None:
    deps = profile.dependencies(variant)
    if not deps:
        return None
    hashes = []
    for dep in deps:
        m = store.manifest(dep)
        hashes.append(m.artifact_hash if m else "missing")
    return "|".join(hashes)


def plan(
    profile: Profile, store: ArtifactStore, only: str | None = None, force: bool = False
) -> list[PlanItem]:
    """Decide, in dependency order, what to build, what is fresh and what to skip (and why)."""
    items: list[PlanItem] = []
    will_change: set[str] = set()
    skipped: set[str] = set()
    for name in profile.order(only):
        spec = STEPS[profile.variants[name].step]
        blocked = [d for d in profile.dependencies(name) if d in skipped]
        reason = hardware.missing(spec.requires)
        if blocked:
            items.append(PlanItem(name, "skip", f"needs {', '.join(blocked)}, which is skipped"))
            skipped.add(name)
            continue
        if reason:
            items.append(PlanItem(name, "skip", reason))
            skipped.add(name)
            continue
        try:
            m = store.manifest(name)
        except ArtifactError as exc:
            m, why = None, f"rebuild: {exc}"
        else:
            why = "not built"
        if m is not None:
            changed = [d for d in profile.dependencies(name) if d in will_change]
            if force and (only is None or name == only):
                why = "forced"
            elif m.config_hash != profile.config_hash(name):
                why = "config changed"
            elif changed:
                why = f"{', '.join(changed)} will be rebuilt"
            elif m.parent_hash != deps_hash(store, profile, name):
                why = "parent rebuilt"
            else:
                items.append(PlanItem(name, "fresh", "up to date"))
                continue
        items.append(PlanItem(name, "build", why))
        will_change.add(name)
    return items


def count_safetensors(folder: Path) -> tuple[int, int]:
    """(total, non-zero) parameters over every `*.safetensors` file (tied weights stored once)."""
    from safetensors.numpy import load_file

    total = nonzero = 0
    for path in sorted(folder.glob("*.safetensors")):
        for arr in load_file(path).values():
            total += arr.size
            nonzero += int((arr != 0).sum())
    return total, nonzero


def load_step(step: str) -> Callable[[StepContext], StepResult]:
    module, _, func = STEPS[step].impl.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"step {step!r} is not available ({STEPS[step].impl}: {exc})") from exc


def run_variant(
    profile: Profile, store: ArtifactStore, name: str, data: DataBundle, log: Log
) -> Manifest:
    """Run one step into a temp folder, evaluate it, write its manifest, move it into place."""
    from slimserve.evaluate import evaluate_folder

    v = profile.variants[name]
    spec = STEPS[v.step]
    func = load_step(v.step)
    start = time.time()
    ckpt = store.dir / ".checkpoints" / f"{name}-{profile.config_hash(name)}"
    parent = store.path(v.from_) if v.from_ else None
    teacher = store.path(profile.teacher) if spec.uses_teacher else None
    with store.writer(name) as out:
        ctx = StepContext(
            profile=profile,
            variant=name,
            params=profile.step_params(name),
            out_dir=out,
            parent_dir=parent,
            teacher_dir=teacher,
            data=data,
            checkpoint_dir=ckpt,
            log=log,
        )
        result = func(ctx)
        total, nonzero = result.params_total, result.params_nonzero
        if total is None or nonzero is None:
            total, nonzero = count_safetensors(out)
        manifest = Manifest(
            variant=name,
            profile=profile.name,
            step=v.step,
            parent=v.from_,
            runtime=spec.runtime,  # type: ignore[arg-type]
            config_hash=profile.config_hash(name),
            parent_hash=deps_hash(store, profile, name),
            params_total=total,
            params_nonzero=nonzero,
            data_sha256=data.sha256,
            metrics=Metrics(**result.metrics),
            details=result.details,
        )
        write_manifest(out, manifest)  # provisional: lets the runtime loader dispatch
        if result.evaluate:
            is_teacher = name == profile.teacher
            metrics = evaluate_folder(
                out, profile, data, None if is_teacher else store.path(profile.teacher), log=log
            )
            manifest.metrics = Metrics(**{**manifest.metrics.model_dump(), **metrics})
        manifest.build_seconds = round(time.time() - start, 2)
        manifest.bytes = folder_bytes(out)
        write_manifest(out, manifest)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    return manifest


def build(
    profile: Profile,
    only: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    log: Log = log_stderr,
) -> list[Row]:
    """Print the plan, then build it (unless `dry_run`); return one row per variant."""
    if only is not None and only not in profile.variants:
        raise ValueError(f"--only: no variant {only!r} (have: {', '.join(profile.variants)})")
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    if not dry_run:
        store.check_writable()
        for p in store.clean_stale_temps():
            log(f"removed leftover of an interrupted build: {p.name}")
    items = plan(profile, store, only, force)
    log(f"plan for profile {profile.name!r} ({store.dir}):")
    for it in items:
        step = profile.variants[it.variant].step
        log(f"  {it.action:5s} {it.variant:22s} [{step}] {it.reason}")
    rows: list[Row] = []
    if dry_run:
        return [
            Row(it.variant, profile.variants[it.variant].step, f"{it.action}: {it.reason}")
            for it in items
        ]
    to_build = [it.variant for it in items if it.action == "build"]
    if to_build:
        _log_estimate(profile, to_build, log)
    data = prepare(profile, log) if to_build else None
    for it in items:
        step = profile.variants[it.variant].step
        if it.action == "skip":
            log(f"skip {it.variant}: {it.reason}")
            rows.append(Row(it.variant, step, f"skipped: {it.reason}"))
            continue
        if it.action == "fresh":
            rows.append(Row(it.variant, step, "fresh", store.manifest(it.variant)))
            continue
        log(f"build {it.variant} [{step}] ({it.reason})")
        assert data is not None
        m = run_variant(profile, store, it.variant, data, log)
        rows.append(Row(it.variant, step, "built", m, m.build_seconds))
    return rows


def _log_estimate(profile: Profile, names: list[str], log: Log) -> None:
    """One line: the expected build time here, from a few seconds' training measurement."""
    from slimserve.estimate import REFERENCE_FLOPS, estimate_seconds, measure_flops

    quick = estimate_seconds(profile, names, REFERENCE_FLOPS)
    if quick is not None and quick < 60:
        return  # a small build: not worth the measurement
    probe = measure_flops()
    seconds = estimate_seconds(profile, names, probe.flops)
    speed = (
        f"training at {probe.flops / 1e9:.0f} GFLOP/s here, "
        f"{probe.flops / REFERENCE_FLOPS:.2f}x the reference"
    )
    if probe.disturbed:
        speed += (
            f"; the machine is busy: the probe's {probe.steps} steps ranged "
            f"{probe.slowest / 1e9:.0f}-{probe.flops / 1e9:.0f} GFLOP/s, the fastest is used"
        )
    if seconds is None:
        log(f"expected build time: unknown (a model's shape is not known before it loads); {speed}")
    else:
        log(f"expected build time: about {seconds / 60:.0f} min ({speed})")


def _fmt(x: float | int | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    """The summary table `slimserve build` ends with (Markdown, so it pastes into READMEs)."""
    head = "| variant | step | status | params | non-zero | perplexity | agreement | build s |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        m = r.manifest
        status = r.status if len(r.status) < 60 else r.status[:57] + "..."
        lines.append(
            f"| {r.variant} | {r.step} | {status} | "
            f"{_fmt(m.params_total if m else None, ',')} | {_fmt(m.params_nonzero if m else None, ',')} | "
            f"{_fmt(m.metrics.perplexity if m else None, '.2f')} | "
            f"{_fmt(m.metrics.agreement if m else None, '.3f')} | "
            f"{_fmt(r.seconds if r.seconds is not None else (m.build_seconds if m else None), '.1f')} |"
        )
    return "\n".join(lines)
