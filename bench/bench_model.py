"""A GPT-2-124M-shaped model for the serving race, built in seconds, with no download.

The tiny student is so small that a race on it measures per-request overhead only; this model
has GPT-2 small's shape (12 layers, 768 wide, 12 heads, vocab 50,257, 1,024 positions:
`GPT2Config()`'s defaults) with random weights, so the race also measures compute. Its text is
noise: it exists to be timed, never to be read.

Its tokenizer is a byte-level BPE with exactly 50,257 entries, made up rather than trained: the
256 byte symbols, then 50,000 merges of two byte symbols in a fixed order, then `<|endoftext|>`
at 50,256 (GPT-2's end-of-text id). Every id decodes to text and every text encodes, which is
all vLLM, Hugging Face and slimserve need to serve it.

Layout, a profile of its own beside the tiny one (`artifacts/bench/`):

    artifacts/bench/gpt2-124m.yaml            the catalogue: the two variants below
    artifacts/bench/gpt2-124m/gpt2-124m/      torch (save_pretrained + tokenizer + manifest)
    artifacts/bench/gpt2-124m/gpt2-124m-onnx/ the project's export-onnx step on it
    artifacts/bench/gpt2-124m/gpt2-124m-int8/ that graph with int8 weights (quantize-int8's
                                              quantizer, without its quality gate: see below)
    artifacts/bench/serve_config.yaml         serve_config.yaml pointed at this profile

Each variant is rebuilt only when its manifest is missing.

The int8 variant is quantized the way the pipeline's quantize-int8 step quantizes
(`build_engines.quantize.quantize_file`, the tiny profile's `student-onnx-int8` settings), but
its perplexity and greedy-agreement gate is skipped: on random weights and a made-up tokenizer
neither means anything. The quality of int8 is measured on the tiny profile's trained student
instead (`student-onnx-int8`'s manifest, `quality_vs_fp32`); here int8 is only timed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

PROFILE_NAME = "gpt2-124m"
TORCH_VARIANT = "gpt2-124m"
ONNX_VARIANT = "gpt2-124m-onnx"
INT8_VARIANT = "gpt2-124m-int8"
INT8_PARAMS = {"per_channel": True}  # as the tiny profile's student-onnx-int8
VOCAB = 50_257
MERGES = VOCAB - 256 - 1
PROFILE: dict[str, Any] = {
    "name": PROFILE_NAME,
    "description": "bench only: GPT-2 small's shape, random weights (timing, not text)",
    "seed": 0,
    "block_size": 128,
    "tokenizer": {"kind": "bpe", "vocab_size": VOCAB},
    "teacher": TORCH_VARIANT,
    "variants": {
        TORCH_VARIANT: {
            "step": "finetune",
            "description": "GPT2Config() with random weights (12 x 768, 12 heads)",
            "params": {"model": {"n_layer": 12, "n_head": 12, "n_embd": 768}},
        },
        ONNX_VARIANT: {
            "step": "export-onnx",
            "from": TORCH_VARIANT,
            "description": "gpt2-124m through export-onnx (ONNX Runtime)",
        },
        INT8_VARIANT: {
            "step": "quantize-int8",
            "from": ONNX_VARIANT,
            "description": "gpt2-124m-onnx with int8 MatMul and embedding weights (ORT dynamic)",
            "params": INT8_PARAMS,
        },
    },
}


def synthetic_tokenizer():
    """A byte-level BPE of exactly `VOCAB` entries; `<|endoftext|>` is the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from slimserve.tokenizer import EOS_TOKEN

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(merges) == MERGES:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _manifest(folder: Path, profile, variant: str, runtime: str, **extra: Any) -> None:
    """Write the manifest twice: `bytes` counts the files, the first manifest included."""
    from slimserve.artifacts import Manifest, folder_bytes, write_manifest

    fields = {
        "variant": variant,
        "profile": profile.name,
        "step": profile.variants[variant].step,
        "parent": profile.variants[variant].from_,
        "runtime": runtime,
        "config_hash": profile.config_hash(variant),
        "parent_hash": None,
        **extra,
    }
    write_manifest(folder, Manifest(**fields))
    write_manifest(folder, Manifest(**fields, bytes=folder_bytes(folder)))


def build_torch(store, profile, log=print) -> Path:
    """GPT2Config() with seeded random weights, saved as safetensors with the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from slimserve.tokenizer import save_hf_tokenizer

    t0 = time.monotonic()
    torch.manual_seed(0)
    cfg = GPT2Config()  # n_layer 12, n_embd 768, n_head 12, vocab 50257, n_positions 1024
    assert cfg.vocab_size == VOCAB
    model = GPT2LMHeadModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    with store.writer(TORCH_VARIANT) as tmp:
        model.save_pretrained(tmp)
        save_hf_tokenizer(synthetic_tokenizer(), tmp, cfg.n_positions)
        seconds = round(time.monotonic() - t0, 1)
        details = {"random_weights": True, "seed": 0, "context_length": cfg.n_positions}
        _manifest(
            tmp, profile, TORCH_VARIANT, "torch", params_total=n, params_nonzero=n,
            build_seconds=seconds, details=details,
        )  # fmt: skip
    log(f"built {TORCH_VARIANT}: {n / 1e6:.1f}M parameters in {seconds}s")
    return store.path(TORCH_VARIANT)


def build_onnx(store, profile, optimize: bool = False, log=print) -> Path:
    """The project's export-onnx step (export, checker, parity with torch) on the torch folder."""
    from build_engines.onnx_export import export_folder
    from slimserve.steps import ExportOnnxParams

    t0 = time.monotonic()
    params = ExportOnnxParams(optimize=optimize, parity_steps=8)
    with store.writer(ONNX_VARIANT) as tmp:
        details = export_folder(store.path(TORCH_VARIANT), tmp, params, log=log)
        total, nonzero = details.pop("params_total"), details.pop("params_nonzero")
        seconds = round(time.monotonic() - t0, 1)
        _manifest(
            tmp, profile, ONNX_VARIANT, "onnxruntime", params_total=total,
            params_nonzero=nonzero, build_seconds=seconds, details=details,
        )  # fmt: skip
    log(f"built {ONNX_VARIANT} in {seconds}s")
    return store.path(ONNX_VARIANT)


def build_int8(store, profile, log=print) -> Path:
    """The ONNX variant's graph with int8 weights (no quality gate: module docstring)."""
    import shutil

    from build_engines.onnx_export import MODEL_FILE, initializer_stats, write_sidecar
    from build_engines.quantize import quantize_file
    from slimserve.steps import QuantizeInt8Params
    from slimserve.tokenizer import copy_tokenizer_files

    t0 = time.monotonic()
    src = store.path(ONNX_VARIANT)
    with store.writer(INT8_VARIANT) as tmp:
        shutil.copyfile(src / "config.json", tmp / "config.json")
        copy_tokenizer_files(src, tmp)
        details = quantize_file(
            src / MODEL_FILE, tmp / MODEL_FILE, QuantizeInt8Params(**INT8_PARAMS)
        )
        write_sidecar(tmp, {"model": MODEL_FILE, "precision": "int8", "graph": "standard"})
        stats = initializer_stats(tmp / MODEL_FILE)
        seconds = round(time.monotonic() - t0, 1)
        details["quality_gate"] = (
            "skipped: random weights (quality is measured on the tiny profile)"
        )
        _manifest(
            tmp, profile, INT8_VARIANT, "onnxruntime", params_total=stats["params_total"],
            params_nonzero=stats["params_nonzero"], build_seconds=seconds, details=details,
        )  # fmt: skip
    log(f"built {INT8_VARIANT} in {seconds}s")
    return store.path(INT8_VARIANT)


def serve_config_for(base: str | Path, profile_path: Path, root: Path, out: Path) -> Path:
    """`base` (serve_config.yaml) pointed at the bench profile; both variants get the settings
    the base gives its student (batch size, queue limits), so the race is run as tuned, and
    every core of the machine as intra-op threads: a 124M model's step is matrix work, which
    threads divide (serve_config.yaml says when to set `threads`)."""
    from slimserve.catalogue import load_profile
    from slimserve.cli import DEFAULT_CONFIG

    raw = yaml.safe_load(Path(base).read_text())
    args = raw["applications"][0].setdefault("args", {})
    served = load_profile(args.get("config", DEFAULT_CONFIG)).default_variant
    student = dict((args.get("variants") or {}).get(served) or {})
    student["threads"] = os.cpu_count() or 1
    args["config"] = str(profile_path.resolve())
    args["artifacts_dir"] = str(root.resolve())
    args["variants"] = {v: dict(student) for v in (TORCH_VARIANT, ONNX_VARIANT, INT8_VARIANT)}
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def ensure_bench_model(
    root: str | Path = "artifacts/bench", *, onnx: bool = True, log=print
) -> dict[str, Path]:
    """Build what is missing; return {"profile", "root", "serve_config", variant: folder}."""
    from slimserve.artifacts import ArtifactStore
    from slimserve.catalogue import load_profile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    profile_path = root / f"{PROFILE_NAME}.yaml"
    profile_path.write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    profile = load_profile(profile_path)
    store = ArtifactStore(root, profile.name)
    store.clean_stale_temps()
    out: dict[str, Path] = {"profile": profile_path, "root": root}
    if store.manifest(TORCH_VARIANT) is None:
        build_torch(store, profile, log)
    out[TORCH_VARIANT] = store.path(TORCH_VARIANT)
    if onnx:
        if store.manifest(ONNX_VARIANT) is None:
            build_onnx(store, profile, log=log)
        out[ONNX_VARIANT] = store.path(ONNX_VARIANT)
        if store.manifest(INT8_VARIANT) is None:
            build_int8(store, profile, log=log)
        out[INT8_VARIANT] = store.path(INT8_VARIANT)
    return out
