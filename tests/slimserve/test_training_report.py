"""The build's training report and its time estimate (tiny models, no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slimserve.artifacts import ArtifactStore, Manifest, Metrics, write_manifest
from slimserve.catalogue import load_profile
from slimserve.estimate import (
    REFERENCE_FLOPS,
    Probe,
    Shape,
    estimate_seconds,
    fastest_rate,
    shape_of,
    training_flops,
)
from slimserve.reports import read_report, write_report
from slimserve.training_report import SAMPLE_PROMPTS, training_report

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _manifest(name: str, step: str, ppl: float, **details) -> Manifest:
    return Manifest(
        variant=name,
        profile="tiny",
        step=step,
        parent=None if step == "finetune" else "teacher",
        runtime="torch",
        config_hash="x",
        parent_hash=None,
        params_total=1000,
        metrics=Metrics(perplexity=ppl, unigram_perplexity=800.0, agreement=0.7),
        details={"tokens": 4096, "seconds": 2.0, "tokens_per_s": 2048.0, **details},
    )


def test_training_report_from_manifests_with_samples(tmp_path, tiny_model_dir):
    profile = load_profile(TINY)
    profile.artifacts_dir = str(tmp_path)
    store = ArtifactStore(profile.artifacts_root(), profile.name)
    for name, step, ppl in (("teacher", "finetune", 180.0), ("student", "distill", 210.0)):
        folder = store.path(name)
        shutil.copytree(tiny_model_dir, folder)
        extra = {"stop_reason": "token budget"}
        m = _manifest(name, step, ppl, **extra)
        if step == "distill":
            m.metrics = Metrics(**{**m.metrics.model_dump(), "ce_only_perplexity": 205.0})
        write_manifest(folder, m)

    report = training_report(profile, store, build_seconds=12.0)
    assert report is not None
    rows = {r["variant"]: r for r in report.tables[0].records()}
    assert rows["teacher"]["ppl / unigram"] == pytest.approx(180 / 800, abs=1e-4)
    assert rows["student"]["ppl / teacher"] == pytest.approx(210 / 180, abs=1e-4)
    assert rows["teacher"]["tokens trained"] == 4096
    assert rows["teacher"]["stop"] == "token budget"
    samples = report.tables[1].records()
    assert len(samples) == 2 * len(SAMPLE_PROMPTS)
    # The teacher meets its goal; the student is within 1.25x but worse than its CE-only twin.
    assert any("teacher" in n and "met" in n for n in report.notes)
    assert any("student" in n and "WORSE than CE-only" in n for n in report.notes)

    paths = write_report(report, tmp_path / "reports", png=False)
    assert read_report(paths[0]).report is not None


def test_no_training_report_without_trained_variants(tmp_path):
    profile = load_profile(TINY)
    profile.artifacts_dir = str(tmp_path)
    assert training_report(profile, ArtifactStore(profile.artifacts_root(), "tiny")) is None


def test_estimate_counts_training_flops_from_the_catalogue():
    profile = load_profile(TINY)
    teacher = shape_of(profile, "teacher")
    assert teacher == Shape(4, 256, 1024, 4096, 128)
    assert shape_of(profile, "student").layers == 2
    slim = shape_of(profile, "student-slim")
    assert (slim.width, slim.inner) == (128, 512)  # 2 of 4 heads, half the MLP
    tokens = profile.step_params("teacher").tokens
    assert training_flops(profile, "teacher") == 3 * teacher.forward_flops() * tokens
    assert training_flops(profile, "student-onnx") == 0.0
    # The student's step also trains its CE-only twin: more than a KD run alone.
    student = shape_of(profile, "student")
    kd_tokens = profile.step_params("student").tokens
    kd_only = (3 * student.forward_flops() + teacher.forward_flops()) * kd_tokens
    assert training_flops(profile, "student") > kd_only
    names = ["teacher", "student"]
    fast = estimate_seconds(profile, names, REFERENCE_FLOPS)
    slow = estimate_seconds(profile, names, REFERENCE_FLOPS / 3)
    assert fast is not None and slow == pytest.approx(3 * fast)


def _sleeper(durations: list[float]):
    """A probe step that takes each of `durations` seconds in turn (a real sleep)."""
    import time

    left = list(durations)
    return lambda: time.sleep(left.pop(0))


def test_a_one_off_slow_probe_step_does_not_inflate_the_estimate():
    profile = load_profile(TINY)
    names = ["teacher", "student"]
    work = 1e9
    steady = fastest_rate(_sleeper([0.02] * 5), work, 5)
    # One step 20x slower, as when an install grabbed the cores for a moment.
    burst = fastest_rate(_sleeper([0.02, 0.4, 0.02, 0.02, 0.02]), work, 5)
    assert burst.disturbed and not steady.disturbed
    calm = estimate_seconds(profile, names, steady.flops)
    busy = estimate_seconds(profile, names, burst.flops)
    assert calm is not None and busy is not None
    assert busy < 1.3 * calm
    # What the former probe (the mean of its steps) made of the same burst: 4.8x the time.
    mean_rate = work / ((0.4 + 4 * 0.02) / 5)
    assert estimate_seconds(profile, names, mean_rate) > 3 * calm


def test_fastest_rate_reads_a_fake_clock_and_refuses_no_steps():
    ticks = iter([0.0, 2.0, 2.0, 2.5, 2.5, 3.5])  # steps of 2 s, 0.5 s, 1 s
    probe = fastest_rate(lambda: None, 10.0, 3, clock=lambda: next(ticks))
    assert probe == Probe(flops=20.0, slowest=5.0, steps=3)
    with pytest.raises(ValueError, match="steps"):
        fastest_rate(lambda: None, 1.0, 0)


def test_the_build_says_when_the_probe_saw_a_busy_machine(monkeypatch):
    import slimserve.estimate as estimate
    from slimserve.runner import _log_estimate

    lines: list[str] = []
    profile = load_profile(TINY)
    busy = Probe(flops=REFERENCE_FLOPS / 2, slowest=REFERENCE_FLOPS / 20, steps=5)
    monkeypatch.setattr(estimate, "measure_flops", lambda: busy)
    _log_estimate(profile, ["teacher", "student"], lines.append)
    assert len(lines) == 1
    assert "0.50x the reference" in lines[0]
    assert "busy" in lines[0] and "the fastest is used" in lines[0]
    monkeypatch.setattr(
        estimate, "measure_flops", lambda: Probe(REFERENCE_FLOPS, REFERENCE_FLOPS, 5)
    )
    lines.clear()
    _log_estimate(profile, ["teacher", "student"], lines.append)
    assert "busy" not in lines[0] and "1.00x the reference" in lines[0]
