"""Tiny artifacts and helpers shared by the deployments tests (see conftest.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

API_KEY = "sk-test-9b1c0e5f"
API_KEY_ENV = "SLIMSERVE_TEST_API_KEY"
os.environ[API_KEY_ENV] = API_KEY  # before Ray starts: workers inherit the environment

CONTEXT = 1024  # long enough that a generation can be interrupted mid-way
TORCH_VARIANTS = {"teacher": 0, "student": 1, "student-b": 2, "student-c": 3}  # name -> seed
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ray Serve hosts every variant behind one ingress, with its own replicas. " * 3,
    "Continuous batching admits a request at the next decode step. " * 3,
    "def main():\n    print('hello world')\n    return 0\n" * 3,
]

PROFILE = {
    "name": "deploytest",
    "seed": 0,
    "block_size": 64,
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "teacher": "teacher",
    "variants": {
        "teacher": {
            "step": "finetune",
            "params": {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32}, "tokens": 1000},
        },
        "student": {"step": "distill", "from": "teacher", "params": {"layers": [0]}},
        "student-b": {"step": "distill", "from": "teacher", "params": {"layers": [1]}},
        "student-c": {"step": "prune-l1", "from": "student", "params": {"amount": 0.3}},
        "student-onnx": {"step": "export-onnx", "from": "student"},
        "student-trt": {"step": "build-trt", "from": "student-onnx"},
        "student-slim": {"step": "prune-structured", "from": "student"},
    },
}


def build_tiny_store(root: Path, profile_path: Path) -> None:
    """Write the tiny torch variants, a TensorRT manifest and a corrupt one under `root`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimserve.artifacts import ArtifactStore, Manifest, folder_bytes, write_manifest
    from slimserve.catalogue import load_profile
    from slimserve.tokenizer import save_hf_tokenizer, train_bpe

    profile = load_profile(profile_path)
    store = ArtifactStore(root, profile.name)
    tok = train_bpe(TEXTS * 20, vocab_size=300)
    eos = tok.token_to_id("<|endoftext|>")
    for name, seed in TORCH_VARIANTS.items():
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=tok.get_vocab_size(),
            n_positions=CONTEXT,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            # Random weights would end some generations at EOS; push EOS's logit to about
            # -100 (ln_f output feature 0 ~ +10, EOS's tied row ~ -10 there) so every test
            # generation runs to max_tokens and token counts are exact.
            model.transformer.ln_f.bias[0] = 10.0
            model.transformer.wte.weight[eos].zero_()
            model.transformer.wte.weight[eos, 0] = -10.0
        with store.writer(name) as tmp:
            model.save_pretrained(tmp)
            save_hf_tokenizer(tok, tmp, CONTEXT)
            params = sum(p.numel() for p in model.parameters())
            v = profile.variants[name]
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
                metrics={"perplexity": 300.0 + seed, "agreement": 1.0 if seed == 0 else 0.01},
            )
            write_manifest(tmp, manifest)
    trt = store.path("student-trt")
    trt.mkdir(parents=True)
    write_manifest(
        trt,
        Manifest(
            variant="student-trt",
            profile=profile.name,
            step="build-trt",
            parent="student-onnx",
            runtime="tensorrt",
            config_hash="x",
            parent_hash=None,
        ),
    )
    corrupt = store.path("student-onnx")
    corrupt.mkdir(parents=True)
    (corrupt / "manifest.json").write_text("{not json")


@dataclass
class ServeUrls:
    main: str
    faults: str
    empty: str
    secured: str
    store: Path  # the main app's artifacts (profile folder)
    faults_store: Path
    profile_path: Path

    def folder(self, variant: str) -> Path:
        return self.store / variant


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
