"""Artifacts and an app builder for the simulated GPU cluster tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from slimserve.artifacts import ArtifactStore, Manifest, folder_bytes, write_manifest
from slimserve.catalogue import load_profile
from slimserve.runtimes import runtime_spec
from slimserve.steps import STEPS

ROOT = Path(__file__).resolve().parents[2]
TINY_PROFILE = {
    "name": "gpusim",
    "seed": 0,
    "block_size": 32,
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "teacher": "teacher",
    "variants": {
        "teacher": {
            "step": "finetune",
            "params": {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "tokens": 1000},
        },
        "student": {"step": "distill", "from": "teacher", "params": {"layers": [0]}},
    },
}


def serve_config_args() -> dict[str, Any]:
    """The repository's serve_config.yaml `args`, as `serve run` passes them to the builder."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return dict(config["applications"][0]["args"])


def manifests_only_store(profile_path: Path, root: Path) -> ArtifactStore:
    """Every variant of a profile "built": manifests and sidecars, no weights (plans only)."""
    profile = load_profile(profile_path)
    store = ArtifactStore(root, profile.name)
    for name, v in profile.variants.items():
        folder = store.path(name)
        folder.mkdir(parents=True)
        runtime = STEPS[v.step].runtime
        (folder / "config.json").write_text(json.dumps({"n_positions": 128}))
        sidecar = runtime_spec(runtime).files.sidecar
        if sidecar is not None:  # the graph's precision, which placement reads
            precision = "int8" if v.step == "quantize-int8" else "float32"
            (folder / sidecar).write_text(json.dumps({"precision": precision}))
        write_manifest(
            folder,
            Manifest(
                variant=name,
                profile=profile.name,
                step=v.step,
                parent=v.from_,
                runtime=runtime,
                config_hash="h",
                parent_hash=None,
            ),
        )
    return store


def tiny_torch_store(base: Path) -> tuple[Path, Path]:
    """A 2-variant profile with real random 2-layer GPT-2 weights; (profile file, root)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimserve.tokenizer import save_hf_tokenizer, train_bpe

    profile_path = base / "gpusim.yaml"
    profile_path.write_text(yaml.safe_dump(TINY_PROFILE, sort_keys=False))
    profile = load_profile(profile_path)
    root = base / "artifacts"
    store = ArtifactStore(root, profile.name)
    tok = train_bpe(["Ray schedules logical GPUs on a machine without one. " * 4] * 40, 300)
    torch.manual_seed(0)
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config).eval()
    first = None
    for name, v in profile.variants.items():
        with store.writer(name) as tmp:
            if first is None:
                model.save_pretrained(tmp)
                save_hf_tokenizer(tok, tmp, 128)
            else:
                for f in first.iterdir():
                    if f.is_file() and f.name != "manifest.json":
                        shutil.copy2(f, tmp / f.name)
            params = sum(p.numel() for p in model.parameters())
            manifest = Manifest(
                variant=name,
                profile=profile.name,
                step=v.step,
                parent=v.from_,
                runtime="torch",
                config_hash=profile.config_hash(name),
                parent_hash=None,
                params_total=params,
                params_nonzero=params,
                bytes=folder_bytes(tmp),
            )
            write_manifest(tmp, manifest)
        first = first or store.path(name)
    return profile_path, root


def app_on_cpu(args: dict[str, Any]):
    """`build_app(args)`, except that replicas placed on a (logical) GPU hold their share but
    load on CPU: there is no CUDA to load onto. Returns (application, plans)."""
    from deployments.app import plan
    from deployments.ingress import Ingress
    from deployments.model import ModelServer

    deployment = plan(args)
    models = {}
    for p in deployment.variants:
        if p.options is not None and p.init is not None:
            init = p.init.model_copy(update={"device": "cpu", "threads": 1}).model_dump()
            models[p.card.id] = ModelServer.options(name=p.card.id, **p.options).bind(**init)
    ingress = deployment.ingress.model_dump()
    return Ingress.bind(models, deployment.catalogue(), ingress), deployment.variants
