"""Broken artifacts: a missing, truncated or corrupt file, or a manifest that no longer matches
its files, makes that one variant "unavailable: <reason>" while the others deploy; a build
killed mid-step leaves nothing that looks complete.

The planner (`deployments.app.plan`) needs no Serve: these tests copy the tiny artifacts the
package fixture built and break them on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeUrls

from deployments.app import plan
from deployments.messages import NOT_BUILT
from slimserve.artifacts import ArtifactStore, read_manifest

PROFILE = "deploytest"


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"  # the safetensors JSON header no longer parses
    path.write_bytes(bytes(data))


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights-missing": (lambda f: (f / "model.safetensors").unlink(), "weights missing"),
    "weights-truncated": (lambda f: _truncate(f / "model.safetensors"), "truncated"),
    "weights-cut-at-end": (
        lambda f: _truncate(f / "model.safetensors", (f / "model.safetensors").stat().st_size - 4),
        "truncated",
    ),
    "weights-corrupt-header": (lambda f: _flip_header(f / "model.safetensors"), "corrupt"),
    "weights-empty": (lambda f: _truncate(f / "model.safetensors", 0), "model.safetensors"),
    "config-missing": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "config-corrupt": (lambda f: _truncate(f / "config.json"), "config.json is corrupt"),
    "tokenizer-corrupt": (lambda f: _truncate(f / "tokenizer.json"), "tokenizer.json is corrupt"),
    "extra-file": (lambda f: (f / "stray.bin").write_bytes(b"x" * 4096), "the manifest says"),
    "manifest-not-json": (lambda f: _truncate(f / "manifest.json"), "corrupt manifest"),
    "manifest-bad-field": (
        lambda f: (f / "manifest.json").write_text(json.dumps({"variant": "student"})),
        "bad fields",
    ),
}


@pytest.fixture
def store(serve_urls: ServeUrls, tmp_path: Path) -> Path:
    """teacher and student copied from the fixture's tiny artifacts (valid to start with)."""
    for name in ("teacher", "student"):
        shutil.copytree(serve_urls.folder(name), tmp_path / PROFILE / name)
    return tmp_path


def cards(root: Path, serve_urls: ServeUrls) -> dict[str, tuple[bool, str | None]]:
    """Each variant: (would be deployed, reason)."""
    plans, _ = plan({"config": str(serve_urls.profile_path), "artifacts_dir": str(root)})
    return {p.card.id: (p.options is not None, p.card.reason) for p in plans}


def test_intact_copies_deploy(store, serve_urls):
    got = cards(store, serve_urls)
    assert got["teacher"] == (True, None) and got["student"] == (True, None)


@pytest.mark.parametrize("kind", list(BREAKS))
def test_broken_variant_is_unavailable_and_the_others_deploy(store, serve_urls, kind):
    breaker, why = BREAKS[kind]
    breaker(store / PROFILE / "student")
    got = cards(store, serve_urls)
    deployed, reason = got["student"]
    assert not deployed and reason is not None
    assert reason.startswith("unavailable: ") and why in reason, reason
    assert got["teacher"] == (True, None)


def test_serving_app_lists_the_broken_one_and_serves_the_rest(serve_urls):
    listed = {c["id"]: c for c in httpx.get(f"{serve_urls.main}/v1/models").json()["data"]}
    assert listed["student-onnx"]["reason"].startswith("unavailable: corrupt manifest") or (
        listed["student-onnx"]["reason"].startswith("unavailable: ")
    )
    body = {"model": "teacher", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{serve_urls.main}/v1/completions", json=body).status_code == 200


KILLED_BUILD = """
import sys, time
from slimserve.artifacts import ArtifactStore
store = ArtifactStore(sys.argv[1], sys.argv[2])
with store.writer(sys.argv[3]) as tmp:
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"\\0" * 4096)
    print("writing", flush=True)
    time.sleep(120)
"""


def _kill_build_mid_step(root: Path, variant: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(root), PROFILE, variant],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_build_killed_mid_step_leaves_nothing_complete_looking(store, serve_urls):
    before = read_manifest(store / PROFILE / "student").artifact_hash
    _kill_build_mid_step(store, "student")  # a rebuild of an existing variant
    _kill_build_mid_step(store, "student-b")  # a first build
    temps = sorted(p.name for p in (store / PROFILE).glob(".*.tmp-*"))
    assert len(temps) == 2, temps  # the debris is hidden, never under the variant's name
    got = cards(store, serve_urls)
    assert got["student"] == (True, None)  # the old artifact is untouched
    assert read_manifest(store / PROFILE / "student").artifact_hash == before
    assert got["student-b"] == (False, NOT_BUILT)
    assert not (store / PROFILE / "student-b").exists()
    removed = ArtifactStore(store, PROFILE).clean_stale_temps()
    assert len(removed) == 2 and not list((store / PROFILE).glob(".*.tmp-*"))
