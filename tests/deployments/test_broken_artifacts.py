"""Broken artifacts: a missing, truncated or corrupt file, or a manifest that no longer matches
its files, makes that one variant "unavailable: <reason>" while the others deploy; a build
killed mid-step leaves nothing that looks complete.

The planner (`deployments.app.plan`) needs no Serve: these tests copy the tiny artifacts the
package fixture built and break them on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import ServeUrls

from deployments.messages import NOT_BUILT
from reliability import broken
from reliability.broken import BREAKS, kill_build_mid_step
from slimserve.artifacts import ArtifactStore, read_manifest

PROFILE = "deploytest"


@pytest.fixture
def store(serve_urls: ServeUrls, tmp_path: Path) -> Path:
    """teacher and student copied from the fixture's tiny artifacts (valid to start with)."""
    for name in ("teacher", "student"):
        shutil.copytree(serve_urls.folder(name), tmp_path / PROFILE / name)
    return tmp_path


def cards(root: Path, serve_urls: ServeUrls) -> dict[str, tuple[bool, str | None]]:
    return broken.cards(serve_urls.profile_path, root)


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
    assert listed["student-onnx"]["reason"].startswith("unavailable: ")
    body = {"model": "teacher", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{serve_urls.main}/v1/completions", json=body).status_code == 200


def test_build_killed_mid_step_leaves_nothing_complete_looking(store, serve_urls):
    before = read_manifest(store / PROFILE / "student").artifact_hash
    kill_build_mid_step(store, PROFILE, "student")  # a rebuild of an existing variant
    kill_build_mid_step(store, PROFILE, "student-b")  # a first build
    temps = sorted(p.name for p in (store / PROFILE).glob(".*.tmp-*"))
    assert len(temps) == 2, temps  # the debris is hidden, never under the variant's name
    got = cards(store, serve_urls)
    assert got["student"] == (True, None)  # the old artifact is untouched
    assert read_manifest(store / PROFILE / "student").artifact_hash == before
    assert got["student-b"] == (False, NOT_BUILT)
    assert not (store / PROFILE / "student-b").exists()
    removed = ArtifactStore(store, PROFILE).clean_stale_temps()
    assert len(removed) == 2 and not list((store / PROFILE).glob(".*.tmp-*"))
