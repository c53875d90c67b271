"""Artifact store: manifest round trip, corrupt manifests, atomic writes."""

from __future__ import annotations

import os

import pytest

from slimserve.artifacts import (
    ArtifactError,
    ArtifactStore,
    Manifest,
    read_manifest,
    write_manifest,
)


def manifest(name: str = "v") -> Manifest:
    return Manifest(
        variant=name,
        profile="p",
        step="finetune",
        parent=None,
        runtime="torch",
        config_hash="abc",
        parent_hash=None,
        params_total=10,
        params_nonzero=7,
    )


def test_manifest_round_trip(tmp_path):
    m = manifest()
    m.metrics.perplexity = 12.5
    m.details["sparsity"] = {"h.0": 0.3}
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m
    assert back.artifact_hash == m.artifact_hash


@pytest.mark.parametrize(
    "content, needle", [("{not json", "not valid JSON"), ('{"variant": 1}', "bad fields")]
)
def test_corrupt_manifest_is_named(tmp_path, content, needle):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ArtifactError, match=needle):
        read_manifest(tmp_path)


def test_writer_is_atomic_and_keeps_old_on_failure(tmp_path):
    store = ArtifactStore(tmp_path, "p")
    with store.writer("v") as out:
        (out / "weights").write_text("one")
        write_manifest(out, manifest())
    assert (store.path("v") / "weights").read_text() == "one"
    with pytest.raises(RuntimeError), store.writer("v") as out:
        (out / "weights").write_text("two")
        raise RuntimeError("step failed halfway")
    assert (store.path("v") / "weights").read_text() == "one"
    assert [p.name for p in store.dir.iterdir()] == ["v"]


def test_writer_without_manifest_fails(tmp_path):
    store = ArtifactStore(tmp_path, "p")
    with pytest.raises(ArtifactError), store.writer("v") as out:
        (out / "weights").write_text("x")
    assert not store.path("v").exists()


def test_killed_step_leaves_nothing_complete(tmp_path):
    """A process killed inside the writer leaves only a temp folder, which the next run removes."""
    store = ArtifactStore(tmp_path, "p")
    pid = os.fork()
    if pid == 0:  # child: die halfway through writing
        with store.writer("v") as out:
            (out / "weights").write_text("half")
            os._exit(9)
    os.waitpid(pid, 0)
    assert store.manifest("v") is None
    assert not store.path("v").exists()
    removed = store.clean_stale_temps()
    assert len(removed) == 1 and not any(store.dir.iterdir())


def test_unwritable_folder_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        store = ArtifactStore(ro, "p")
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            (tmp_path / "file").write_text("")
            store = ArtifactStore(tmp_path / "file", "p")
        with pytest.raises(ArtifactError, match="not writable"):
            store.check_writable()
    finally:
        ro.chmod(0o700)
