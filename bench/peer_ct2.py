"""CTranslate2 as the in-process floor: how fast the same weights decode with no server at all.

CTranslate2 has no server and no way to add a request to a batch that is already running, so
it cannot take part in the HTTP race. What it shows instead is the floor a fast C++ runtime
reaches on this CPU with nothing around it: one request at a time (ms per output token) and 16
prompts in one `generate_batch` call (tokens/s), next to slimserve's own engine measured the
same way in the same process (`bench.engine_bench`, no HTTP, no Ray).

The package is the optional extra `slimserve[peers]`; the bench installs it into the running
venv when it is missing (or says why it could not). The model is converted from the same HF
folder (`ctranslate2.converters.TransformersConverter`) into `.cache/ctranslate2/`.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.engine_bench import PROMPTS
from bench.peer_vllm import PeerError
from slimserve.tokenizer import load_tokenizer

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "ctranslate2"
REQUIREMENT = "ctranslate2>=4.5"


def load_ctranslate2(install: bool = False) -> ModuleType:
    """The `ctranslate2` module; with `install`, pip-installs it first when it is missing.

    Raises PeerError saying how to install it when it cannot be imported."""
    try:
        return importlib.import_module("ctranslate2")
    except ImportError:
        if not install:
            raise PeerError(
                f"ctranslate2 is not installed (pip install -e '.[peers]' or '{REQUIREMENT}')"
            ) from None
    cmd = [sys.executable, "-m", "pip", "install", "-q", REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
        raise PeerError(f"pip install {REQUIREMENT} failed (exit {proc.returncode}): {tail}")
    importlib.invalidate_caches()
    return importlib.import_module("ctranslate2")


def convert(ct2: ModuleType, model_dir: Path, out: Path, quantization: str | None) -> Path:
    """The HF folder -> a CTranslate2 model folder (`quantization`: None keeps float32)."""
    converter = ct2.converters.TransformersConverter(str(model_dir))
    return Path(converter.convert(str(out), quantization=quantization, force=True))


def _generate(generator: Any, starts: list[list[str]], max_tokens: int) -> int:
    """Greedy, exactly `max_tokens` new tokens per prompt; returns the tokens generated."""
    results = generator.generate_batch(
        starts,
        max_length=max_tokens,
        min_length=max_tokens,
        include_prompt_in_result=False,
        sampling_topk=1,
        beam_size=1,
    )
    return sum(len(r.sequences_ids[0]) for r in results)


def measure(
    model_dir: str | Path,
    *,
    quantization: str | None = None,
    max_tokens: int = 64,
    batch: int = 16,
    repeats: int = 3,
    threads: int | None = None,
    cache: Path = CACHE,
    install: bool = False,
) -> dict[str, Any]:
    """One request at a time over `batch` prompts (ms per output token) and those `batch`
    prompts in one call (tokens/s), each the median of `repeats` after a warm-up.

    Raises PeerError when ctranslate2 is missing (and not installed) or the conversion fails.
    """
    ct2 = load_ctranslate2(install)
    folder = Path(model_dir)
    threads = threads or os.cpu_count() or 1
    name = f"{folder.name}-{quantization or 'float32'}"
    try:
        path = convert(ct2, folder, cache / name, quantization)
    except Exception as exc:  # the converter raises whatever transformers or torch raised
        raise PeerError(f"CTranslate2 conversion failed: {type(exc).__name__}: {exc}") from exc
    compute = quantization or "float32"
    generator = ct2.Generator(
        str(path), device="cpu", compute_type=compute, intra_threads=threads, inter_threads=1
    )
    tok = load_tokenizer(folder)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    starts = [[tok.tokenizer.id_to_token(i) for i in tok.encode(p)] for p in prompts]
    _generate(generator, starts[:1], max_tokens)  # warm-up
    one, full, tokens = [], [], 0
    for _ in range(repeats):
        t0, tokens = time.perf_counter(), 0
        for start in starts:
            tokens += _generate(generator, [start], max_tokens)
        one.append((time.perf_counter() - t0) * 1000 / tokens)
        t0 = time.perf_counter()
        tokens = _generate(generator, starts, max_tokens)
        full.append(tokens / (time.perf_counter() - t0))
    return {
        "model": folder.name,
        "engine": f"CTranslate2 {ct2.__version__} ({compute})",
        "one_ms_per_token": round(statistics.median(one), 3),
        "batch": batch,
        "batch_tok_s": round(statistics.median(full), 1),
        "tokens_per_request": round(tokens / batch, 1),
        "threads": threads,
    }


def engine_floor(
    model_dir: str | Path,
    *,
    max_tokens: int = 64,
    batch: int = 16,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """slimserve's engine on the same folder, in process, in the same two shapes.

    `bench.engine_bench` at concurrency 1 (ms per token = 1000 / its tokens/s, the first
    prompt alone, so its prefill is in the figure too) and at `batch` (all submitted at once).
    """
    from bench.engine_bench import run_engine_bench

    threads = threads or os.cpu_count() or 1
    result = run_engine_bench(
        model_dir, (1, batch), max_tokens, repeats, threads=threads, hf_baseline=False
    )
    rows = {r["concurrency"]: r for r in result["rows"]}
    return {
        "model": Path(model_dir).name,
        "engine": f"slimserve engine ({result['runtime']}, {result['dtype']})",
        "one_ms_per_token": round(1000 / rows[1]["output_tok_s"], 3),
        "batch": batch,
        "batch_tok_s": round(rows[batch]["output_tok_s"], 1),
        "tokens_per_request": max_tokens,
        "threads": result["threads"],
    }


def floor(
    folder: Path,
    onnx_dir: Path | None = None,
    *,
    max_tokens: int = 64,
    batch: int = 16,
    repeats: int = 3,
    install: bool = True,
) -> list[dict[str, Any]]:
    """slimserve's engine on the torch folder (and on its ONNX twin), then CTranslate2 float32
    and int8 on the same HF folder. A part that cannot run is a row saying why (`status`)."""
    shape = {"max_tokens": max_tokens, "batch": batch, "repeats": repeats}
    rows = []
    for d in (folder, onnx_dir) if onnx_dir else (folder,):
        try:
            rows.append(engine_floor(d, **shape))
        except Exception as exc:  # a failed part is a row: the report is still written
            rows.append({"model": d.name, "engine": "slimserve engine", "status": repr(exc)[:200]})
    for quantization in (None, "int8"):
        try:
            rows.append(measure(folder, quantization=quantization, install=install, **shape))
        except PeerError as exc:
            rows.append({"model": folder.name, "engine": "CTranslate2", "status": str(exc)})
            break
    return rows
