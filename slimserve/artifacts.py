"""The artifact store: `artifacts/<profile>/<variant>/{loadable files, manifest.json}`.

An artifact describes itself: its manifest names the step that made it, its parent, the
runtime that loads it, the hashes that decide staleness, sizes and measured metrics.
Writes are atomic: a step writes into `.<variant>.tmp-<pid>/` beside the final folder and the
folder is renamed into place only after the manifest is written, so an interrupted step never
leaves a folder that looks complete (a folder without a valid manifest is never "built").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

MANIFEST = "manifest.json"
RuntimeName = Literal["torch", "onnxruntime", "tensorrt"]


class ArtifactError(Exception):
    """An artifact folder that is missing, incomplete or corrupt."""


class Metrics(BaseModel):
    """Measured quality of a variant on the test split (None until evaluated)."""

    model_config = {"extra": "allow"}

    perplexity: float | None = None
    unigram_perplexity: float | None = None
    agreement: float | None = Field(None, description="top-1 next-token agreement with teacher")
    eval_tokens: int | None = None


class Manifest(BaseModel):
    """`manifest.json`: what an artifact is, where it came from, and how good it is."""

    model_config = {"extra": "allow"}

    variant: str
    profile: str
    step: str
    parent: str | None
    runtime: RuntimeName
    config_hash: str
    parent_hash: str | None
    params_total: int = 0
    params_nonzero: int = 0
    bytes: int = 0
    created: float = Field(default_factory=time.time)
    build_seconds: float | None = None
    data_sha256: str | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    details: dict[str, Any] = Field(default_factory=dict, description="step-specific facts")

    @property
    def artifact_hash(self) -> str:
        """What children record as `parent_hash`: changes whenever this artifact is rebuilt."""
        return f"{self.config_hash}:{self.created:.6f}"


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (the manifest included)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_manifest(folder: str | Path) -> Manifest:
    """Read and validate `folder/manifest.json`; ArtifactError names what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST} (not built, or an interrupted build)")
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest (not valid JSON: {exc})") from exc
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise ArtifactError(f"{path}: corrupt manifest (bad fields: {fields})") from exc


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    os.replace(tmp, folder / MANIFEST)


class ArtifactStore:
    """The folder of one profile's artifacts."""

    def __init__(self, root: str | Path, profile: str):
        self.root = Path(root)
        self.profile = profile
        self.dir = self.root / profile

    def path(self, variant: str) -> Path:
        return self.dir / variant

    def manifest(self, variant: str) -> Manifest | None:
        """The variant's manifest, or None when it is not built (or left incomplete)."""
        if not (self.path(variant) / MANIFEST).exists():
            return None
        return read_manifest(self.path(variant))

    def check_writable(self) -> None:
        """Fail early, naming the folder, when artifacts cannot be written."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ArtifactError(f"artifacts folder {self.dir} is not writable: {exc}") from exc

    @contextmanager
    def writer(self, variant: str) -> Iterator[Path]:
        """Yield a temp folder; on success it replaces `artifacts/<profile>/<variant>` atomically.

        The caller must write `manifest.json` into the folder before leaving the block.
        On an exception the temp folder is removed and the existing artifact is untouched.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{variant}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            read_manifest(tmp)  # a complete artifact has a valid manifest
            final = self.path(variant)
            old = self.dir / f".{variant}.old-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_stale_temps(self) -> list[Path]:
        """Remove temp folders left by killed builds; return what was removed."""
        removed = []
        if self.dir.is_dir():
            for p in self.dir.glob(".*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            for p in self.dir.glob(".*.old-*"):
                final = self.dir / p.name[1:].split(".old-")[0]
                if not final.exists():  # killed between the two renames: put the old one back
                    os.replace(p, final)
                else:
                    shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed
