"""docs/cluster.md stays runnable: its config example validates and its commands exist."""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml
from deploy_helpers import ROOT, load_script

from deployments.settings import deployment_options, parse_args, place, resolve
from slimserve.catalogue import load_profile

DOC = ROOT / "docs" / "cluster.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def commands() -> list[list[str]]:
    """Every shell command in the doc's bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_autoscaling_example_is_valid_serve_config():
    (example,) = [b for b in blocks("yaml") if "autoscaling" in b]
    variants = yaml.safe_load(example)["variants"]
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    args: dict[str, Any] = config["applications"][0]["args"]
    args = {**args, "variants": variants}
    names = list(load_profile(ROOT / args["config"]).variants)
    student = resolve(parse_args(args), names)["student"]
    opts = deployment_options(student, place("torch", student, cluster_gpus=1.0))
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 16,
    }
    assert opts["max_ongoing_requests"] == 32 and opts["ray_actor_options"]["num_gpus"] == 0.25


def test_every_make_target_in_the_doc_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = {w for cmd in commands() if cmd[0] == "make" for w in cmd[1:] if "=" not in w}
    assert {"docker", "artifacts", "test-cluster"} <= targets
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no `make {target}`"


def test_cluster_profile_commands_parse(tmp_path, monkeypatch):
    script = load_script("deploy/cluster_profile.py")
    calls = [c for c in commands() if any(w.endswith("deploy/cluster_profile.py") for w in c)]
    assert calls
    for cmd in calls:
        argv = cmd[cmd.index(next(w for w in cmd if w.endswith("cluster_profile.py"))) + 1 :]
        out = argv.index("--out")
        argv[out + 1] = str(tmp_path / "profile.yaml")  # the doc writes to /shared
        monkeypatch.chdir(ROOT)
        assert script.main(argv) == 0
        assert load_profile(tmp_path / "profile.yaml").training.workers >= 2


def test_slimserve_build_commands_parse():
    """Every `slimserve build ...` line in the doc is accepted by the real CLI parser."""
    from slimserve.cli import make_parser

    builds = [c for c in commands() if c[0].endswith("slimserve") and c[1:2] == ["build"]]
    assert builds
    for cmd in builds:
        ns = make_parser().parse_args(cmd[1:])
        assert ns.config and ns.artifacts, cmd
