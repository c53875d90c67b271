"""Copy a profile with its `training:` block sized for a cluster (N workers, GPUs or not).

A profile's `training` block (workers, use_gpu, cpus_per_worker) is not part of any variant's
config hash (`Profile.config_hash`): the copy plans, builds and names exactly the same
artifacts as the original, in the same folder, only on more workers. So a laptop build and a
cluster build of one profile are interchangeable, and the profile in git stays the laptop one.

    python deploy/cluster_profile.py configs/gpt2.yaml --workers 4 --use-gpu true \\
        --out /tmp/gpt2-4gpu.yaml
    slimserve build --config /tmp/gpt2-4gpu.yaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

UseGpu = bool | Literal["auto"]


def with_training(
    raw: dict[str, Any], workers: int, use_gpu: UseGpu, cpus_per_worker: int | None = None
) -> dict[str, Any]:
    """A copy of the profile `raw` (as read from YAML) with its training block replaced."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = copy.deepcopy(raw)
    training: dict[str, Any] = {"workers": workers, "use_gpu": use_gpu}
    if cpus_per_worker is not None:
        training["cpus_per_worker"] = cpus_per_worker
    out["training"] = training
    return out


def _use_gpu(value: str) -> UseGpu:
    choices: dict[str, UseGpu] = {"true": True, "false": False, "auto": "auto"}
    try:
        return choices[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"use true, false or auto, not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="the profile to copy (e.g. configs/gpt2.yaml)")
    parser.add_argument("--workers", type=int, required=True, help="Ray Train workers")
    parser.add_argument(
        "--use-gpu", type=_use_gpu, default="auto", help="true, false or auto (default auto)"
    )
    parser.add_argument(
        "--cpus-per-worker", type=int, default=None, help="CPUs per worker (default: share)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where the copy is written")
    ns = parser.parse_args(argv)
    raw = yaml.safe_load(ns.profile.read_text())
    out = with_training(raw, ns.workers, ns.use_gpu, ns.cpus_per_worker)
    ns.out.write_text(
        f"# {ns.profile} with training sized for a cluster (deploy/cluster_profile.py)\n"
        + yaml.safe_dump(out, sort_keys=False)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
