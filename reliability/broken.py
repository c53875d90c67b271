"""Broken artifacts: ways a variant's folder goes bad on disk, and what the planner says.

Each break damages one copy of a built variant; `deployments.app.plan` must then list that
variant as "unavailable: <reason>" and still deploy the others. A build killed mid-step must
leave only a hidden temp folder, never a folder under the variant's name.
Used by tests/deployments/test_broken_artifacts.py and by `make reliability`.
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
from typing import Any


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"  # the safetensors JSON header no longer parses
    path.write_bytes(bytes(data))


def _cut_end(path: Path) -> None:
    _truncate(path, path.stat().st_size - 4)


W = "model.safetensors"
BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights-missing": (lambda f: (f / W).unlink(), "weights missing"),
    "weights-truncated": (lambda f: _truncate(f / W), "truncated"),
    "weights-cut-at-end": (lambda f: _cut_end(f / W), "truncated"),
    "weights-corrupt-header": (lambda f: _flip_header(f / W), "corrupt"),
    "weights-empty": (lambda f: _truncate(f / W, 0), W),
    "config-missing": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "config-corrupt": (lambda f: _truncate(f / "config.json"), "config.json is corrupt"),
    "tokenizer-corrupt": (lambda f: _truncate(f / "tokenizer.json"), "tokenizer.json is corrupt"),
    "extra-file": (lambda f: (f / "stray.bin").write_bytes(b"x" * 4096), "the manifest says"),
    "manifest-not-json": (lambda f: _truncate(f / "manifest.json"), "corrupt manifest"),
    "manifest-bad-field": (
        lambda f: (f / "manifest.json").write_text(json.dumps({"variant": "x"})),
        "bad fields",
    ),
}


def cards(config: Path, root: Path) -> dict[str, tuple[bool, str | None]]:
    """Each variant of the profile: (would be deployed, reason), as the builder plans it."""
    from deployments.app import plan

    plans = plan({"config": str(config), "artifacts_dir": str(root)}).variants
    return {p.card.id: (p.options is not None, p.card.reason) for p in plans}


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


def kill_build_mid_step(root: Path, profile: str, variant: str) -> None:
    """A process writing `variant` through ArtifactStore.writer, SIGKILLed mid-write."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(root), profile, variant],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if line != "writing":
            raise RuntimeError(f"the build never started writing ({line!r})")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def sweep(
    config: Path, profile: str, source: Path, work: Path, variant: str
) -> list[dict[str, Any]]:
    """Every break applied to a fresh copy of `source/<profile>/<variant>` (plus the teacher
    left intact): one report row each."""
    rows = []
    for name, (breaker, why) in BREAKS.items():
        root = work / name
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(source / profile / variant, root / profile / variant)
        breaker(root / profile / variant)
        deployed, reason = cards(config, root)[variant]
        ok = not deployed and bool(reason) and reason.startswith("unavailable: ") and why in reason
        rows.append({"break": name, "deployed": deployed, "reason": reason, "as_expected": ok})
        shutil.rmtree(root, ignore_errors=True)
    return rows
