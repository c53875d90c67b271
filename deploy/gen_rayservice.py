"""Derive the deployment configs from serve_config.yaml, so they never drift from it.

`serve_config.yaml` is the one Serve config: `make serve` runs it, and so do the Docker image,
a multi-machine Ray cluster and the KubeRay RayService. Only one thing differs there: they must
accept connections from other machines, so the proxy binds 0.0.0.0 instead of 127.0.0.1.

    python deploy/gen_rayservice.py                 # rewrite the RayService (= make kuberay)
    python deploy/gen_rayservice.py --check         # exit 1 when it is out of date
    python deploy/gen_rayservice.py --bind-all OUT  # serve_config.yaml bound to 0.0.0.0

Only `spec.serveConfigV2` of deploy/kuberay/rayservice.yaml is generated; the rest of that
file (head and GPU worker groups, volumes) is written by hand, and its comments survive.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
ALL_INTERFACES = "0.0.0.0"
HEADER = "# generated from serve_config.yaml by `make kuberay`: edit that file, not this block"
BIND_ALL_HEADER = "# serve_config.yaml bound to 0.0.0.0 by deploy/gen_rayservice.py --bind-all"

# `serveConfigV2: |` (a YAML literal block) and the indentation of its key.
_BLOCK_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*$")


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """serve_config.yaml as data; fails when it has no applications."""
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: no `applications:` list")
    return config


def bind_all_interfaces(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` whose HTTP proxy listens on every interface (the only change)."""
    out = copy.deepcopy(config)
    out.setdefault("http_options", {})["host"] = ALL_INTERFACES
    return out


def dump(config: dict[str, Any], header: str = HEADER) -> str:
    """YAML in serve_config.yaml's key order, under a header that says where it came from."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)
    return f"{header}\n{body}"


def replace_block(manifest: str, block: str) -> str:
    """`manifest` with the body of its `serveConfigV2: |` literal block replaced by `block`.

    Text surgery rather than a YAML round trip, so the hand-written rest of the file keeps
    its comments and layout. The old body is every following line that is blank or indented
    deeper than the key; trailing blank lines are not kept (the new body ends the block).
    """
    lines = manifest.splitlines()
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line)]
    if len(starts) != 1:
        raise ValueError(f"expected exactly one `serveConfigV2: |` line, found {len(starts)}")
    start = starts[0]
    match = _BLOCK_KEY.match(lines[start])
    assert match is not None
    indent = len(match["indent"])
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    pad = " " * (indent + 2)
    body = [pad + line if line else "" for line in block.splitlines()]
    return "\n".join([*lines[: start + 1], *body, *lines[end:]]) + "\n"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def render_rayservice(manifest: str, config: dict[str, Any]) -> str:
    """The RayService manifest with serveConfigV2 = serve_config.yaml bound to 0.0.0.0."""
    return replace_block(manifest, dump(bind_all_interfaces(config)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--serve-config", type=Path, default=SERVE_CONFIG, help="the Serve config to embed"
    )
    parser.add_argument(
        "--manifest", type=Path, default=RAYSERVICE, help="the RayService manifest to update"
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if the manifest is stale"
    )
    parser.add_argument(
        "--bind-all",
        type=Path,
        metavar="OUT",
        help="instead: write the Serve config bound to 0.0.0.0 to OUT (image, Ray cluster)",
    )
    ns = parser.parse_args(argv)
    config = load_serve_config(ns.serve_config)
    if ns.bind_all is not None:
        ns.bind_all.write_text(dump(bind_all_interfaces(config), BIND_ALL_HEADER))
        return 0
    current = ns.manifest.read_text()
    wanted = render_rayservice(current, config)
    if ns.check:
        if current != wanted:
            print(f"{ns.manifest} is stale: run `make kuberay`", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        ns.manifest.write_text(wanted)
        print(f"updated {ns.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
