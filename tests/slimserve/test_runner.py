"""Pipeline runner: plan, stale detection, hardware skips, summary table.

Steps are replaced by a small real function (it writes a file and counts a call) so the
runner's own logic is tested in milliseconds; the real steps have their own tests.
"""

from __future__ import annotations

import json

import pytest

from slimserve import runner
from slimserve.artifacts import ArtifactStore
from slimserve.catalogue import parse_profile
from slimserve.runner import StepResult, build, plan, table


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"d{i}.txt").write_text(f"text number {i} " * 20)
    return folder


def make_profile(tmp_path, corpus, temperature: float = 2.0):
    return parse_profile(
        {
            "name": "t",
            "artifacts_dir": str(tmp_path / "art"),
            "block_size": 8,
            "data": {"source": f"text:{corpus}", "split": {"validation": 0.2, "test": 0.2}},
            "tokenizer": {"vocab_size": 270},
            "variants": {
                "teacher": {"step": "finetune", "params": {"model": {}}},
                "student": {
                    "step": "distill",
                    "from": "teacher",
                    "params": {"temperature": temperature},
                },
                "student-onnx": {"step": "export-onnx", "from": "student"},
                "student-trt": {"step": "build-trt", "from": "student-onnx"},
            },
        }
    )


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []

    def fake_step(ctx):
        seen.append(ctx.variant)
        assert ctx.data.tokenizer_dir.is_dir()
        if ctx.parent_dir is not None:
            assert (ctx.parent_dir / "payload.json").is_file()
        (ctx.out_dir / "payload.json").write_text(json.dumps({"v": ctx.variant}))
        return StepResult(details={"ok": True}, params_total=5, params_nonzero=4, evaluate=False)

    monkeypatch.setattr(runner, "load_step", lambda step: fake_step)
    monkeypatch.setattr(
        runner.hardware, "missing", lambda req: "no NVIDIA GPU" if req == "tensorrt" else None
    )
    return seen


def test_build_then_nothing_then_stale(tmp_path, corpus, calls):
    profile = make_profile(tmp_path, corpus)
    rows = build(profile, log=lambda m: None)
    assert calls == ["teacher", "student", "student-onnx"]
    assert [r.status.split(":")[0] for r in rows] == ["built", "built", "built", "skipped"]
    assert "no NVIDIA GPU" in rows[-1].status
    md = table(rows)
    assert "| student-onnx | export-onnx | built |" in md

    calls.clear()
    rows = build(profile, log=lambda m: None)
    assert calls == [] and [r.status for r in rows[:3]] == ["fresh"] * 3

    # Changing the student's params rebuilds it and everything below it, not the teacher.
    calls.clear()
    build(make_profile(tmp_path, corpus, temperature=3.0), log=lambda m: None)
    assert calls == ["student", "student-onnx"]


def test_parent_rebuilt_marks_children_stale(tmp_path, corpus, calls):
    profile = make_profile(tmp_path, corpus)
    build(profile, log=lambda m: None)
    calls.clear()
    build(profile, only="teacher", force=True, log=lambda m: None)
    assert calls == ["teacher"]
    store = ArtifactStore(profile.artifacts_root(), "t")
    reasons = {it.variant: it.reason for it in plan(profile, store)}
    assert reasons["student"] == "parent rebuilt"
    assert reasons["student-onnx"] == "student will be rebuilt"


def test_dry_run_builds_nothing(tmp_path, corpus, calls):
    profile = make_profile(tmp_path, corpus)
    rows = build(profile, dry_run=True, log=lambda m: None)
    assert calls == [] and rows[0].status == "build: not built"
    assert not (tmp_path / "art").exists()


def test_corrupt_manifest_is_rebuilt_with_reason(tmp_path, corpus, calls):
    profile = make_profile(tmp_path, corpus)
    build(profile, log=lambda m: None)
    store = ArtifactStore(profile.artifacts_root(), "t")
    (store.path("student-onnx") / "manifest.json").write_text("{oops")
    items = {it.variant: it for it in plan(profile, store)}
    assert items["student-onnx"].action == "build"
    assert "corrupt manifest" in items["student-onnx"].reason
    assert items["student"].action == "fresh"


def test_failed_step_keeps_existing_artifact(tmp_path, corpus, calls, monkeypatch):
    profile = make_profile(tmp_path, corpus)
    build(profile, log=lambda m: None)
    store = ArtifactStore(profile.artifacts_root(), "t")
    before = store.manifest("student")

    def broken(ctx):
        (ctx.out_dir / "payload.json").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "load_step", lambda step: broken)
    with pytest.raises(RuntimeError, match="boom"):
        build(profile, only="student", force=True, log=lambda m: None)
    assert store.manifest("student") == before
    assert json.loads((store.path("student") / "payload.json").read_text()) == {"v": "student"}


def test_unknown_only_is_named(tmp_path, corpus, calls):
    with pytest.raises(ValueError, match="--only: no variant 'ghost'"):
        build(make_profile(tmp_path, corpus), only="ghost", log=lambda m: None)
