"""Readers shared by the deployment tests: the Dockerfile's instructions, deploy/ scripts."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
IMAGE_UID = 10001  # the Dockerfile's service user; the KubeRay pods run as it too


def load_script(relative: str) -> ModuleType:
    """Import a deploy/ script by path (deploy/ is not a package the project installs)."""
    path = ROOT / relative
    name = "slimserve_" + re.sub(r"\W", "_", relative.removesuffix(".py"))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, CMD, ...
    args: str  # continuation lines joined with single spaces


@dataclass
class Stage:
    base: str  # the FROM image, ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions in order: comments dropped, `\\` continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> list[Stage]:
    """Build stages with their bases resolved from the global ARG defaults."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.keyword == "ARG" and not result:
            key, _, default = ins.args.partition("=")
            args[key] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), default)
        elif ins.keyword == "FROM":
            parts = ins.args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append(Stage(base=base, name=name))
        elif result:
            result[-1].instructions.append(ins)
    return result
