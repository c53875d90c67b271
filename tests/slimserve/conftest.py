"""Tiny GPT-2 artifacts for runtime, sampling and engine tests (built once per session, CPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from slimserve.gpt2_config import gpt2_config
from slimserve.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe

CONTEXT = 128
WORDS = [
    "the",
    "a",
    "model",
    "token",
    "cache",
    "batch",
    "server",
    "stream",
    "engine",
    "river",
    "mountain",
    "quiet",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "café",
    "naïve",
    "façade",
    "über",
    "straße",
    "東京",
    "日本語",
    "données",
    "ñandú",
    "🙂",
    "🚀",
    "résumé",
]


def _corpus(n_lines: int = 200, seed: int = 0) -> list[str]:
    """A few KB of word salad with multi-byte characters, so BPE learns UTF-8 pieces."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)]


def build_tiny_model(folder: Path, *, seed: int = 0, vocab_size: int = 300) -> Path:
    """Write a 2-layer, 32-wide GPT-2 plus its tokenizer into `folder` (HF layout, no manifest)."""
    from transformers import GPT2LMHeadModel

    tok = train_bpe(_corpus(), vocab_size=vocab_size)
    save_hf_tokenizer(tok, folder, model_max_length=CONTEXT)
    eos = load_tokenizer(folder).eos_token_id
    torch.manual_seed(seed)
    config = gpt2_config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=tok.get_vocab_size(),
        n_positions=CONTEXT,
        eos=eos,
        initializer_range=0.2,  # peaked, varied logits: greedy output is not one repeated token
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF GPT-2 folder (config.json, weights, tokenizer files) shared by the session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def tiny_runtime(tiny_model_dir: Path):
    """The torch runtime on the tiny model, CPU fp32, ONE thread.

    One thread because on a busy 2-core machine two OpenMP threads of a tiny model spend most
    of a step waiting for each other (1 ms/step becomes 10-40 ms). torch's thread count is
    process-wide, so it is restored when the module's tests are done.
    """
    from slimserve.runtimes import load

    before = torch.get_num_threads()
    yield load(tiny_model_dir, device="cpu", dtype="float32", threads=1)
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)
