"""`slimserve generate`: stream one completion from a built variant to stdout.

It goes through the same engine as serving (one request, no batching wait), so what the
command prints is what the HTTP API would stream for the same parameters.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from slimserve.engine import Completion, Engine, EngineConfig
from slimserve.sampling import SamplingParams


async def _stream(engine: Engine, prompt: str, params: SamplingParams, out: TextIO) -> Completion:
    try:
        stream = engine.stream(prompt, params)
        async for chunk in stream:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
        return stream.completion()
    finally:
        await engine.stop()


def generate_main(
    variant_dir: Path,
    prompt: str,
    params: SamplingParams,
    threads: int | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Completion:
    """Load `variant_dir`, stream the completion of `prompt` to `out` (stdout), return it.

    A one-line summary (tokens, finish reason, TTFT, decode speed) goes to `err` (stderr), so
    stdout carries the generated text only. Bad parameters raise ValueError naming the field.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    engine = Engine.from_folder(
        variant_dir,
        EngineConfig(max_batch_size=1, max_wait_ms=0),
        device=device,
        dtype=dtype,
        threads=threads,
    )
    done = asyncio.run(_stream(engine, prompt, params, out))
    out.write("\n")
    out.flush()
    t = done.timings
    speed = f", {1 / t.tpot_s:.1f} tok/s" if t.tpot_s else ""
    info = engine.runtime.info
    print(
        f"[{done.completion_tokens} tokens, finish={done.finish_reason}, "
        f"ttft {t.ttft_s * 1000:.1f} ms{speed}; {info.runtime} {info.device} {info.dtype}, "
        f"{info.threads} threads]",
        file=err,
    )
    return done
