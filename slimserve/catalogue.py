"""The catalogue: one profile file declares data, tokenizer and the variants as a DAG.

Everything reads it: the pipeline runner, the Serve app builder, the dashboard and the
benchmarks. `load_profile(path)` validates the whole file and raises one `CatalogueError`
that names every bad field (unknown step, missing parent, cycle, out-of-range value, typo).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimserve.steps import STEPS
from slimserve.strict import Strict


class CatalogueError(ValueError):
    """A profile file with one or more problems; the message lists every one."""


class SplitConfig(Strict):
    validation: float = Field(0.05, gt=0, lt=0.5, description="fraction of documents")
    test: float = Field(0.05, gt=0, lt=0.5, description="fraction of documents")


class DataConfig(Strict):
    source: str = Field(
        "python-docs",
        description="'python-docs' | 'text:<folder>' | 'hf:<dataset>/<config>' (or hf:<local dir>)",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_chars: int | None = Field(None, gt=0, description="cap on corpus characters (None = all)")
    text_field: str = Field("text", description="field holding text in jsonl / datasets rows")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v == "python-docs" or v.startswith(("text:", "hf:")) and len(v.split(":", 1)[1]) > 0:
            return v
        raise ValueError("must be 'python-docs', 'text:<folder>' or 'hf:<dataset>/<config>'")


class TokenizerConfig(Strict):
    kind: Literal["bpe", "pretrained"] = Field("bpe", description="train a BPE, or load one")
    vocab_size: int = Field(4096, ge=260, le=262144, description="BPE vocabulary size")
    pretrained: str | None = Field(None, description="hub id or local folder (kind=pretrained)")


class TrainingDefaults(Strict):
    workers: int = Field(1, ge=1, le=1024, description="Ray Train workers")
    use_gpu: Literal["auto", True, False] = Field("auto", description="auto = when CUDA exists")
    cpus_per_worker: int | None = Field(
        None, ge=1, description="CPUs per worker (None = all cores / workers)"
    )


class EvalConfig(Strict):
    max_tokens: int = Field(65536, ge=256, description="test tokens scored per evaluation")
    batch_size: int = Field(8, ge=1, le=512)


class VariantConfig(Strict):
    model_config = ConfigDict(populate_by_name=True)  # `from_=` as well as `from:`

    step: str
    from_: str | None = Field(None, alias="from", description="parent variant")
    params: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


class Profile(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = 0
    artifacts_dir: str = Field("artifacts", description="root of the artifact store")
    block_size: int = Field(128, ge=8, le=8192, description="tokens per training block")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    training: TrainingDefaults = Field(default_factory=TrainingDefaults)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    teacher: str = Field("teacher", description="the reference variant for agreement and KD")
    default_variant: str = Field(
        "student",
        description="the variant the CLI, the benchmarks and the sweep use when none is named",
    )
    variants: dict[str, VariantConfig]

    # Filled by load_profile: each variant's params validated by its step's model.
    source_path: str | None = None

    def step_params(self, variant: str) -> BaseModel:
        v = self.variants[variant]
        return STEPS[v.step].params.model_validate(v.params)

    def dependencies(self, variant: str) -> list[str]:
        """Variants that must exist before `variant` builds: its parent, and the teacher."""
        v = self.variants[variant]
        deps = [v.from_] if v.from_ else []
        if STEPS[v.step].uses_teacher and self.teacher != variant and self.teacher not in deps:
            deps.append(self.teacher)
        return deps

    def order(self, only: str | None = None) -> list[str]:
        """Variants in dependency order (only `only` and its ancestors when given)."""
        seen: list[str] = []

        def visit(name: str) -> None:
            if name in seen:
                return
            for dep in self.dependencies(name):
                visit(dep)
            seen.append(name)

        for name in [only] if only else self.variants:
            visit(name)
        return seen

    def config_hash(self, variant: str) -> str:
        """Hash of everything the variant's step sees (its params, parent, data, tokenizer)."""
        v = self.variants[variant]
        payload = {
            "step": v.step,
            "from": v.from_,
            "params": self.step_params(variant).model_dump(mode="json"),
            "teacher": self.teacher if STEPS[v.step].uses_teacher else None,
            "data": self.data.model_dump(mode="json"),
            "tokenizer": self.tokenizer.model_dump(mode="json"),
            "block_size": self.block_size,
            "seed": self.seed,
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def artifacts_root(self) -> Path:
        """`artifacts_dir`, relative to the current directory unless absolute."""
        return Path(self.artifacts_dir)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "__root__")


def _variant_problems(profile: Profile) -> list[str]:
    """Problems pydantic cannot see: unknown steps, bad params, missing parents, cycles."""
    problems: list[str] = []
    for name, v in profile.variants.items():
        spec = STEPS.get(v.step)
        if spec is None:
            problems.append(
                f"variants.{name}.step: unknown step {v.step!r} (known: {sorted(STEPS)})"
            )
            continue
        try:
            spec.params.model_validate(v.params)
        except ValidationError as exc:
            for err in exc.errors():
                problems.append(f"variants.{name}.params.{_loc(err['loc'])}: {err['msg']}")
        if spec.needs_parent and not v.from_:
            problems.append(f"variants.{name}.from: step {v.step!r} needs a parent variant")
        if v.from_ and v.from_ not in profile.variants:
            problems.append(f"variants.{name}.from: no variant named {v.from_!r}")
        if spec.uses_teacher and profile.teacher not in profile.variants:
            problems.append(f"teacher: no variant named {profile.teacher!r} (needed by {name})")
    # Checked only when the file names it, so a profile without that variant still loads.
    named = "default_variant" in profile.model_fields_set
    if named and profile.default_variant not in profile.variants:
        problems.append(f"default_variant: no variant named {profile.default_variant!r}")
    if problems:
        return problems
    # Cycle detection (DFS with colours) over the dependency edges.
    colour: dict[str, int] = {}

    def dfs(node: str, path: list[str]) -> None:
        colour[node] = 1
        for dep in profile.dependencies(node):
            if colour.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [node, dep]
                problems.append(f"variants.{node}.from: cycle {' -> '.join(cycle)}")
            elif dep not in colour:
                dfs(dep, path + [dep])
        colour[node] = 2

    for name in profile.variants:
        if name not in colour:
            dfs(name, [name])
    return problems


def _raw_variant_problems(raw: dict[str, Any], already: list[str]) -> list[str]:
    """Step and params problems of the variants, found even when other sections are bad."""
    variants = raw.get("variants")
    if not isinstance(variants, dict) or any(line.startswith("variants.") for line in already):
        return []
    fields = {k: raw[k] for k in ("name", "variants", "teacher", "default_variant") if k in raw}
    try:
        partial = Profile.model_validate({**fields, "name": "x"})
    except ValidationError:
        return []
    return _variant_problems(partial)


def parse_profile(raw: Any, source: str = "<profile>") -> Profile:
    """Validate a profile mapping; raise CatalogueError listing every bad field."""
    if not isinstance(raw, dict):
        raise CatalogueError(f"{source}: a profile must be a mapping, got {type(raw).__name__}")
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
        lines += _raw_variant_problems(raw, lines)
        raise CatalogueError(
            f"{source}: {len(lines)} problem(s)\n  " + "\n  ".join(lines)
        ) from None
    problems = _variant_problems(profile)
    if problems:
        raise CatalogueError(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    profile.source_path = source
    return profile


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile YAML file."""
    path = Path(path)
    if not path.is_file():
        raise CatalogueError(f"{path}: no such profile file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path}: not valid YAML: {exc}") from exc
    return parse_profile(raw, str(path))
