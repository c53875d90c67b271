"""One Ray Serve deployment class for every variant: `ModelServer.options(name=<variant>)`.

A replica loads one artifact folder with the runtime its manifest names and wraps it in the
`slimserve.engine.Engine`, which does continuous batching: every request a replica accepts
(up to `max_ongoing_requests`) joins the running batch at the next decode step. The replica
itself adds only what Serve needs: methods the ingress calls through handles, health checks,
live batch settings (`reconfigure`) and per-variant metrics. Client faults come back as data
(`deployments.messages`), so the ingress can answer 4xx before it starts a stream.

Streamed tokens are coalesced under load (`deployments.events`): a replica sends about
`stream_frames_per_step` events per engine step, and a lone stream an event at most every
`stream_min_interval_ms`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from ray import serve

from deployments import events, outbox
from deployments.events import Event
from deployments.messages import error
from deployments.metrics import VariantMetrics
from slimserve import runtimes
from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.engine import Engine, EngineConfig, QueueFullError, RequestStream
from slimserve.sampling import ParameterError, SamplingParams
from slimserve.textstream import TokenTexts
from slimserve.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")

NICENESS_ENV = "SLIMSERVE_REPLICA_NICENESS"
REPLICA_NICENESS = 10
"""How much lower than the proxy's and the ingress's a model replica's CPU priority is (the
`nice` increment, 0-19; $SLIMSERVE_REPLICA_NICENESS overrides). Only contention makes it
matter: when the cores are saturated (overload), the kernel serves the request path first,
so rejections (503), health checks and routing stay quick while the replicas take the rest
(reliability/README.md has the overload figures at 0, 5 and 10)."""


@serve.deployment(name="model")
class ModelServer:
    """A replica of one variant. Methods are called by the ingress through a handle."""

    def __init__(
        self, variant: str, folder: str, device: str, threads: int, dtype: str | None = None
    ):
        self.variant = variant
        self.folder = Path(folder)
        lower_priority()
        manifest = read_manifest(self.folder)
        self.artifact_hash = manifest.artifact_hash
        # threads is explicit: a fractional-CPU replica would otherwise get one thread by
        # accident or every core of the node (torch's default).
        self.runtime = runtimes.load(self.folder, device=device, dtype=dtype, threads=threads)
        self.tokenizer = load_tokenizer(self.folder)
        self.token_texts = TokenTexts(self.tokenizer)  # logprob entries' token texts, cached
        self.metrics = VariantMetrics(variant)
        self._internal: set[int] = set()  # engine request ids of health checks (not metered)
        self.engine = Engine(
            self.runtime,
            self.tokenizer,
            EngineConfig(),
            on_step=lambda _: self.metrics.on_step(self.engine.stats),
            on_finish=self._on_finish,
        )
        self.outboxes = outbox.Outboxes()  # connections to the ingresses' event inboxes
        self.frames_per_step = events.STREAM_FRAMES_PER_STEP
        self.min_interval_s = events.STREAM_MIN_INTERVAL_MS / 1e3
        self._every = (0.0, 1)  # (when, tokens per event): recomputed at most once per ms
        self._open = asyncio.Event()  # admission gate; cleared only by `hold`
        self._open.set()
        self._held_until = 0.0
        log.info(
            "%s: loaded %s on %s", variant, self.runtime.info.runtime, self.runtime.info.device
        )

    # -- Serve hooks ------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings from `user_config`: the engine's (max_batch_size, max_wait_ms,
        max_queue, decode_burst) and, optionally, streaming's `stream_frames_per_step` and
        `stream_min_interval_ms`.

        The engine reads its config at every step, so a new batch size applies at once.
        """
        config = dict(user_config)
        self.frames_per_step = int(
            config.pop("stream_frames_per_step", events.STREAM_FRAMES_PER_STEP)
        )
        interval_ms = float(config.pop("stream_min_interval_ms", events.STREAM_MIN_INTERVAL_MS))
        self.min_interval_s = max(0.0, interval_ms) / 1e3
        self.engine.config = EngineConfig(**config)

    async def check_health(self) -> None:
        """Raise (so Serve replaces this replica) when the model cannot serve.

        Runs the model on one token through the engine (so a dead scheduler fails too), and
        fails when the artifact on disk was rebuilt or removed since this replica loaded it:
        the replacement replica then loads the new files.
        """
        try:
            current = read_manifest(self.folder).artifact_hash
        except ArtifactError as exc:
            raise RuntimeError(f"{self.variant}: artifact unreadable: {exc}") from exc
        if current != self.artifact_hash:
            raise RuntimeError(
                f"{self.variant}: artifact rebuilt on disk since this replica loaded"
            )
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        try:
            stream = self.engine.stream([self.tokenizer.eos_token_id], params)
        except QueueFullError:
            return  # busy serving is healthy
        self._internal.add(stream.request_id)
        async with stream:
            async for _ in stream:
                pass

    # -- generation -----------------------------------------------------------------------------

    async def stream(self, job: dict[str, Any]) -> AsyncIterator[list[Event]]:
        """Streaming generation (call with `handle.options(stream=True)`); see messages.py.

        Yields lists of events, one list per message to the ingress (and one SSE body chunk
        there): `start` goes with the first delta, and (one choice) the last delta with `end`.
        Neither waits: they come out of the engine together. `stream_to` sends the same lists
        over the ingress's socket instead.
        """
        held: list[Event] = []
        one = int(job.get("n", 1)) == 1
        async for event in self._run(job):
            held.append(event)
            kind = event["event"]
            if kind == "start" or (one and kind == "delta" and event["finish_reason"] is not None):
                continue
            yield held
            held = []
        if held:
            yield held

    async def stream_to(
        self, job: dict[str, Any], inbox: dict[str, str], rid: str
    ) -> dict[str, Any]:
        """Streaming generation whose event lists (those of `stream`) go to the ingress's
        inbox (`deployments.channel`) as request `rid`, instead of back through Serve.

        Returns `{"sent": lists written, "conn": the connection's id}` once the last list is
        written (the ingress then knows at once whether some are still missing), with `"lost"`
        when the connection broke on the way (generation stops there, the batch slots are
        freed), or `{"unreachable": reason}` without generating when the inbox cannot be
        reached. Events that cannot be sent (not msgpack data) fail this call only.
        """
        try:
            box = await self.outboxes.get(inbox)
        except OSError as exc:
            return {"unreachable": f"{inbox['address']}: {exc}"}
        return await outbox.send_all(box, rid, self.stream(job))

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        """Non-streamed generation: `{"choices", "usage", "timings", "prompt_ids"}` or
        `{"error"}`."""
        choices: dict[int, dict[str, Any]] = {}
        result: dict[str, Any] = {}
        async for event in self._run(job, stream=False):
            kind = event["event"]
            if kind == "error":
                return {"error": event["error"]}
            if kind == "delta":
                c = choices.setdefault(event["index"], {"text": "", "token_ids": []})
                c["text"] += event["text"]
                c["token_ids"] += event["token_ids"]
                c["finish_reason"] = event["finish_reason"]
                if "logprobs" in event:
                    c.setdefault("logprobs", []).extend(event["logprobs"])
            elif kind in ("start", "end"):
                result.update({k: v for k, v in event.items() if k != "event"})
        result["choices"] = [{"index": i, **choices[i]} for i in sorted(choices)]
        return result

    async def _run(self, job: dict[str, Any], stream: bool = True) -> AsyncIterator[Event]:
        """The events of one job (messages.py); `stream=False`: one delta per choice, with
        its whole text, once every choice has finished (no per-token events to merge)."""
        n = int(job.get("n", 1))
        describe = events.describer(self.token_texts) if job.get("logprobs") else None
        try:
            base = SamplingParams(**job["params"])
        except ParameterError as exc:
            yield {"event": "error", "error": error(400, str(exc), param=api_param(exc))}
            return
        except TypeError as exc:  # an unknown field: the ingress never sends one
            yield {"event": "error", "error": error(400, str(exc))}
            return
        await self._open.wait()  # `hold`: cancellable while waiting
        streams: list[RequestStream] = []
        try:
            try:
                for i in range(n):
                    seed = None if base.seed is None else base.seed + i  # n distinct samples
                    params = dataclasses.replace(base, seed=seed, stop=list(base.stop))
                    streams.append(self.engine.stream(job["prompt"], params))
            except ParameterError as exc:
                yield {"event": "error", "error": error(400, str(exc), param=api_param(exc))}
                return
            except QueueFullError as exc:
                msg = f"{self.variant} is overloaded ({exc}); retry later"
                yield {"event": "error", "error": error(503, msg, headers={"Retry-After": "1"})}
                return
            start: Event = {"event": "start", "prompt_tokens": streams[0].prompt_tokens}
            if job.get("return_prompt_ids"):
                start["prompt_ids"] = self._prompt_ids(job["prompt"])
            yield start
            echo = self._echo_text(job["prompt"]) if job.get("echo") else None
            if stream:
                merged = events.merge(streams)
                if echo is not None:
                    merged = events.echo_first(merged, echo)
                async for event in events.coalesce(
                    merged, self._tokens_per_event, self.min_interval_s, describe=describe
                ):
                    yield event
            else:
                for s in streams:  # they run together in the engine; wait for each to end
                    async for _ in s:
                        pass
                for i, s in enumerate(streams):
                    yield events.completed(i, s.completion(), echo, describe)
            yield {"event": "end", **events.summary(streams)}
        finally:
            for s in streams:  # client gone or timed out: free the batch slots now
                s.cancel()

    def _tokens_per_event(self) -> int:
        """ceil(running / frames_per_step), at least 1 (see `deployments.events`).

        Called for every chunk of every stream, so it is cached for a millisecond: counting
        the running requests walks the batch.
        """
        now = time.monotonic()
        if now - self._every[0] > 0.001:
            f = self.frames_per_step
            running = self.engine.stats().running if f > 0 else 0
            self._every = (now, max(1, -(-running // f)) if f > 0 else 1)
        return self._every[1]

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _echo_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(list(prompt))

    # -- scoring: /infer and /compare -----------------------------------------------------------

    async def next_token(self, prompt: str, top_k: int, max_new_tokens: int) -> dict[str, Any]:
        """The older API: next-token distribution (top-k) and an optional greedy continuation."""
        ids = self.tokenizer.encode(prompt)
        ctx = self.runtime.info.context_length
        if not ids:
            return {"error": error(400, "prompt encodes to no tokens", param="prompt")}
        if len(ids) + max_new_tokens > ctx:
            msg = (
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context length ({ctx})"
            )
            return {"error": error(400, msg, param="max_new_tokens")}
        await self._open.wait()
        logits = await asyncio.to_thread(self._scores, ids)  # (T, V)
        probs = logits[-1].softmax(-1)
        top = probs.topk(min(top_k, probs.shape[0]))
        tokens = [
            {"id": int(i), "text": self.tokenizer.token_text(int(i)), "prob": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        continuation = None
        if max_new_tokens > 0:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
            try:
                continuation = (await self.engine.generate(ids, params)).text
            except QueueFullError as exc:
                return {"error": error(503, f"{self.variant} is overloaded ({exc})")}
        return {"top_k": tokens, "continuation": continuation}

    async def top1(self, prompt_ids: list[int], token_ids: list[int]) -> list[int]:
        """This model's greedy pick at each generated position of someone else's output.

        Position i predicts token_ids[i] from prompt_ids + token_ids[:i]; /compare counts how
        often a variant's tokens equal the teacher's picks (top-1 agreement).
        """
        if not token_ids:
            return []
        ids = list(prompt_ids) + list(token_ids[:-1])
        logits = await asyncio.to_thread(self._scores, ids)  # (P + n - 1, V)
        start = len(prompt_ids) - 1
        return logits[start:].argmax(-1).tolist()

    def _scores(self, ids: list[int]) -> torch.Tensor:
        """Full-sequence logits (T, V) on a worker thread.

        torch modules and ONNX Runtime sessions accept concurrent inference calls, so this may
        overlap an engine step; a runtime that does not (a TensorRT execution context) needs
        the engine's worker thread instead (noted in the README as unverified on GPU).
        """
        ctx = self.runtime.info.context_length
        with torch.inference_mode():
            return self.runtime.score(torch.tensor([ids[-ctx:]], dtype=torch.long))[0].float()

    # -- operations -------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """What this replica runs (for /v1/models, /compare and tests)."""
        ctx = serve.get_replica_context()
        return {
            "variant": self.variant,
            "replica": ctx.replica_tag,
            "runtime": dataclasses.asdict(self.runtime.info),
            "engine": dataclasses.asdict(self.engine.config),
            "artifact_hash": self.artifact_hash,
        }

    async def stats(self) -> dict[str, Any]:
        """Engine counters (running, waiting, cancelled, tokens) and the admission gate."""
        return {
            **dataclasses.asdict(self.engine.stats()),
            "held_s": max(0.0, self._held_until - time.monotonic()),
        }

    async def hold(self, seconds: float) -> None:
        """Stop admitting new requests for `seconds` (running ones continue).

        An operator drill: it shows what clients see when a replica is saturated (requests
        pile up to `max_ongoing_requests`, then to the queue limit, then HTTP 503) or slow
        (HTTP 408), without needing a machine busy enough to produce it.
        """
        seconds = max(0.0, min(float(seconds), 600.0))
        self._open.clear()
        self._held_until = time.monotonic() + seconds
        asyncio.get_running_loop().call_later(seconds, self._release)

    def _release(self) -> None:
        if time.monotonic() >= self._held_until - 1e-3:
            self._open.set()

    def _on_finish(self, m: Any) -> None:
        if m.request_id in self._internal:  # a health check: not traffic, but gauges move
            self._internal.discard(m.request_id)
            self.metrics.set_gauges(self.engine.stats())
            return
        self.metrics.on_finish(m, self.engine.stats())


API_PARAMS = {"prompt_logprobs": "echo"}
"""Engine parameters the API names otherwise (prompt logprobs are asked for by `echo`)."""


def api_param(exc: ParameterError) -> str:
    return API_PARAMS.get(exc.param, exc.param)


def lower_priority() -> int:
    """Lower this process's CPU priority by REPLICA_NICENESS (or the env override, 0-19): an
    increment over what Ray gave every worker, so replicas rank below the proxy and the
    ingress whatever Ray's own worker niceness is. Returns the niceness now."""
    raw = os.environ.get(NICENESS_ENV, "").strip()
    try:
        step = max(0, min(19, int(raw))) if raw else REPLICA_NICENESS
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", NICENESS_ENV, raw, REPLICA_NICENESS)
        step = REPLICA_NICENESS
    return os.nice(step)
