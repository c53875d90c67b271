"""The older projects' serving architecture, rebuilt as the baseline slimserve is raced against.

One Flask process (`threaded=True`: a thread per request), torch limited to 2 threads, one
Hugging Face `model.generate` call per request (no batching across requests), and streaming
through `TextIteratorStreamer` (generate runs in a helper thread and the request thread
relays the text it yields). It speaks just enough of slimserve's API (`POST /v1/completions`
with `prompt`, `max_tokens`, `temperature`, `top_p`, `top_k`, `stream`,
`stream_options.include_usage`; `GET /healthz`) that the same load generator
(`bench/serving.py`) drives both servers with the same requests.

It is faithful on purpose, not tuned: TextIteratorStreamer emits text at word boundaries (it
holds a token back until a space or newline), so its SSE frames carry a word, and its time to
first token is time to the first word; that is what the older streaming endpoint sent.

Run it alone: `python -m bench.baseline artifacts/tiny/student --port 8100`; or from code:
`with start_baseline(folder) as server: ...` (its own process, 2 torch threads, a free port).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.server_process import server_process, terminate

THREADS = 2


@dataclass(frozen=True)
class BaselineServer:
    """A running baseline: where to send requests, and its pid (for CPU accounting)."""

    url: str
    pid: int


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Generator:
    """The model and tokenizer, loaded once and shared by the request threads."""

    def __init__(self, model_dir: str | Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.threads = threads
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.eos = self.model.config.eos_token_id
        self.name = Path(model_dir).name

    def gen_kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = self.tokenizer(body["prompt"], return_tensors="pt")
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {
            **ids,
            "max_new_tokens": int(body.get("max_tokens", 16)),
            "pad_token_id": self.eos,
            "eos_token_id": self.eos,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs.update(
                temperature=temperature,
                top_p=float(body.get("top_p", 1.0)),
                top_k=int(body.get("top_k", 0)),
            )
        return kwargs

    def generate(self, kwargs: dict[str, Any]) -> Any:
        import torch

        # Each Flask thread gets torch's thread count on first use: pin it per thread.
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model.generate(**kwargs)

    def chunk(self, rid: str, text: str, reason: str | None, use: dict | None = None) -> str:
        choices = [] if use else [{"index": 0, "text": text, "finish_reason": reason}]
        payload: dict[str, Any] = {"id": rid, "object": "text_completion", "model": self.name}
        payload["choices"] = choices
        if use:
            payload["usage"] = use
        return f"data: {json.dumps(payload)}\n\n"

    def complete(self, body: dict[str, Any], kwargs: dict[str, Any], rid: str) -> dict[str, Any]:
        """A non-streamed completion's JSON body."""
        n_prompt = int(kwargs["input_ids"].shape[1])
        out = self.generate(kwargs)[0, n_prompt:]
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        n_out = int(out.shape[0])
        reason = "length" if n_out >= kwargs["max_new_tokens"] else "stop"
        choice = {"index": 0, "text": text, "finish_reason": reason}
        return {"id": rid, "object": "text_completion", "model": self.name, "choices": [choice]} | {
            "usage": _usage(n_prompt, n_out)
        }

    def stream(self, body: dict[str, Any], kwargs: dict[str, Any], rid: str) -> Iterator[str]:
        """SSE frames: generate runs in a helper thread, this one relays what it streams."""
        from transformers import TextIteratorStreamer

        n_prompt = int(kwargs["input_ids"].shape[1])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        holder: dict[str, Any] = {}

        def work() -> None:
            holder["out"] = self.generate({**kwargs, "streamer": streamer})

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[str]:
            for text in streamer:
                if text:
                    yield self.chunk(rid, text, None)
            worker.join()
            n_out = int(holder["out"].shape[1]) - n_prompt
            yield self.chunk(rid, "", "length" if n_out >= kwargs["max_new_tokens"] else "stop")
            if with_usage:
                yield self.chunk(rid, "", None, _usage(n_prompt, n_out))
            yield "data: [DONE]\n\n"

        return events()


def create_app(model_dir: str | Path, threads: int = THREADS) -> Any:
    """The Flask app: the model and tokenizer are loaded once and shared by request threads."""
    import torch
    from flask import Flask, Response, jsonify, request, stream_with_context

    gen = _Generator(model_dir, threads)
    app = Flask("slimserve-baseline")

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok", "model": gen.name, "threads": torch.get_num_threads()})

    @app.post("/v1/completions")
    def completions() -> Any:
        body = request.get_json(force=True)
        kwargs = gen.gen_kwargs(body)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            return jsonify(gen.complete(body, kwargs, rid))
        events = gen.stream(body, kwargs, rid)
        return Response(stream_with_context(events), mimetype="text/event-stream")

    return app


def serve(model_dir: str | Path, host: str, port: int, threads: int = THREADS) -> None:
    """Run the Flask development server, one thread per request (the older setup)."""
    app = create_app(model_dir, threads)
    app.run(host=host, port=port, threaded=True, use_reloader=False)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def start_baseline(
    model_dir: str | Path,
    *,
    port: int | None = None,
    threads: int = THREADS,
    timeout_s: float = 180.0,
    log: str | Path | None = None,
) -> Iterator[BaselineServer]:
    """Run the baseline as its own process on a free port; yield it; stop it after.

    OMP/MKL thread variables are set too, so every thread torch creates in that process uses
    `threads` intra-op threads, whatever thread the request runs on.
    """
    if port is None:
        from slimserve.net import free_port

        port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "bench.baseline", str(model_dir), "--port", str(port)]
    cmd += ["--threads", str(threads)]
    url = f"http://127.0.0.1:{port}"
    with server_process(
        cmd,
        ready=lambda: _healthy(url),
        exited=lambda rc: RuntimeError(f"baseline server exited with {rc} (log: {log})"),
        timed_out=lambda: TimeoutError(f"baseline server not healthy after {timeout_s:.0f}s"),
        stop=terminate,
        log=Path(log) if log else None,
        timeout_s=timeout_s,
        poll_s=0.2,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    ) as proc:
        yield BaselineServer(url, proc.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a Hugging Face GPT-2 folder (e.g. the student)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8100, help="HTTP port")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    args = parser.parse_args(argv)
    serve(args.model_dir, args.host, args.port, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
