"""The generation engine: continuous batching, sampling, stop rules and streaming over any Runtime.

No Ray here: a Serve replica wraps one `Engine`, and tests and benchmarks drive it directly.

How a step works
----------------
One asyncio task (the scheduler) plans a step, runs it in ONE worker thread (model work never
blocks the event loop), then turns the sampled tokens into text on the loop:

1. rows whose request finished or was cancelled leave the batch (`select`);
2. the running rows decode one token (`runtime.decode`);
3. newly admitted requests are prefilled together and `merge`d in behind the running rows,
   so they join the next decode step (iteration-level batching, as vLLM and TGI do);
4. one vectorised `sample` picks a token for every row (prefilled rows get their first token).

Overlap (`EngineConfig.overlap`; by default on for a GPU runtime, off on a CPU): as soon as a
step's tokens are back, the next step is planned and handed to the worker, and only then are
the tokens turned into text, so the loop's per-token work (detokenizing, stop strings,
streaming) runs while the model does. That pays when the step waits on a device; on a CPU the
step's own Python holds the GIL the loop needs, and under Serve at 16 clients it gained
nothing measurable (2-core Xeon) while a lone request got slower, so it is off there.
The next step cannot know yet which rows that text work will end: rows ending by `max_tokens`
or the context are left out (that is known from the counts), and a row ending on EOS or a stop
string decodes one more token that is thrown away. With a repetition penalty in the batch the
next step needs this step's tokens, so the two run in turn.

A request waits in a bounded queue until a batch slot is free. When the engine is idle, the
first request waits up to `max_wait_ms` for company so that a burst is prefilled together.
Long prompts are prefilled whole (no chunked prefill), so they delay that step's decode.

Text
----
Ids are decoded incrementally (byte-level BPE): only the tail since the last clean character
boundary is re-decoded, and a trailing U+FFFD (a UTF-8 sequence still incomplete) is held
back, so streamed deltas always concatenate to exactly the final text. A stop string cuts the
text before it (OpenAI semantics); while streaming, any suffix that could start a stop string
is held back until it cannot. EOS ends a request with "stop" and is not part of the output
(neither text nor token_ids); `token_ids` hold every other generated id, including those of
a stop string that was cut from the text.

Lifecycle: the engine starts lazily on the first request, bound to the running event loop;
`await engine.stop()` fails what is in flight with `EngineClosedError` and frees the worker
thread (a later request starts it again, on whatever loop is then running).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from slimserve.engine_types import (
    Completion,
    EngineClosedError,
    EngineConfig,
    EngineError,
    EngineStats,
    FinishReason,
    QueueFullError,
    RequestMetrics,
    StepInfo,
    StreamChunk,
    Timings,
)
from slimserve.runtimes.base import KVState, Runtime, merge, select
from slimserve.sampling import ParameterError, SamplingParams, sample
from slimserve.textstream import IncrementalDetokenizer, find_stop, held_suffix
from slimserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class _Request:
    """One request's state; touched on the event loop, read (not written) by the worker."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, tok: TextTokenizer):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = params.make_generator()
        self.seen = list(prompt_ids)  # prompt + output ids, for the repetition penalty
        self.token_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tok)
        self.emitted = ""  # text already streamed
        self.searched = 0  # stable text already searched for stop strings
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.queue: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.done = False
        self.finish_reason: FinishReason | None = None
        self.final_text = ""
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.token_s: list[float] = []
        self.t_end: float | None = None

    def put(self, item: StreamChunk | BaseException) -> None:
        """Hand an item to the consumer (ignored when its event loop is already closed)."""
        with contextlib.suppress(RuntimeError):
            self.queue.put_nowait(item)

    def timings(self) -> Timings:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        start = self.t_start if self.t_start is not None else end
        return Timings(
            queue_s=start - self.t_submit,
            ttft_s=self.token_s[0] if self.token_s else end - self.t_submit,
            e2e_s=end - self.t_submit,
            token_s=list(self.token_s),
        )

    def completion(self) -> Completion:
        if self.finish_reason is None:
            raise RuntimeError(f"request {self.id} has not finished")
        return Completion(
            text=self.final_text,
            token_ids=list(self.token_ids),
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            finish_reason=self.finish_reason,
            timings=self.timings(),
        )


class RequestStream:
    """Async iterator over one request's `StreamChunk`s, returned by `Engine.stream`.

    Stopping early frees the request's batch slot at the next step: `aclose()` / `cancel()`,
    leaving an `async with` block, cancelling the task awaiting a chunk, or simply dropping
    the stream (its finaliser cancels the request).
    """

    def __init__(self, engine: Engine, req: _Request):
        self._engine = engine
        self._req = req
        self._ended = False
        self.request_id = req.id
        self.prompt_tokens = len(req.prompt_ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._req.queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def cancel(self) -> None:
        """Abandon the request (no-op once it has finished)."""
        self._ended = True
        if not self._req.done:
            self._engine._cancel(self._req)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def completion(self) -> Completion:
        """The finished request (text, ids, timings); raises if it has not finished."""
        return self._req.completion()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._req.done:
                self._engine._cancel(self._req)


@dataclass
class _Plan:
    """One step's instructions for the worker (built on the loop, read in the worker)."""

    keep: list[int] | None  # rows of the current batch to keep, None = all
    prefill: list[list[int]]  # prompts of newly admitted requests
    params: list[SamplingParams]  # every row after the step: kept rows, then prefilled ones
    generators: list[torch.Generator]
    seen: list[list[int]] | None  # per row, only when some row has a repetition penalty


@dataclass
class _Step:
    """A step handed to the worker: its future and the rows (in KV-state order) it samples for."""

    future: Future
    rows: list[_Request]
    admitted: list[_Request]
    removed: int
    n_decode: int
    t0: float


class Engine:
    """Continuous batching over one Runtime (see the module docstring).

    Call from one event loop: `stream`, `generate`, `stats`, `stop`. Callbacks run on
    that loop after each step (`on_step`) and when a request leaves (`on_finish`); an exception
    in a callback is logged and ignored.
    """

    def __init__(
        self,
        runtime: Runtime,
        tokenizer: TextTokenizer,
        config: EngineConfig | None = None,
        *,
        on_step: Callable[[StepInfo], None] | None = None,
        on_finish: Callable[[RequestMetrics], None] | None = None,
    ):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.on_step = on_step
        self.on_finish = on_finish
        # A runtime may build batch-membership changes its own way (same contract as base.py's).
        self._select = getattr(runtime, "select", select)
        self._merge = getattr(runtime, "merge", merge)
        self.context_length = runtime.info.context_length
        self.vocab_size = runtime.info.vocab_size
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # in KV-state row order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None  # the last step handed to the worker
        # Owned by the worker thread between steps:
        self._state: KVState | None = None
        self._last: torch.Tensor | None = None  # (B,) last sampled token per row
        self._next_id = 0
        self._counts = dict.fromkeys(
            ("steps", "submitted", "finished", "cancelled", "failed", "rejected", "peak"), 0
        )
        self._prompt_tokens = 0
        self._gen_tokens = 0

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        config: EngineConfig | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
    ) -> Engine:
        """Load an artifact folder's runtime and tokenizer and wrap them in an engine."""
        from slimserve.runtimes import load
        from slimserve.tokenizer import load_tokenizer

        runtime = load(folder, device=device, dtype=dtype, threads=threads)
        return cls(runtime, load_tokenizer(folder), config)

    # -- public API ---------------------------------------------------------------------------

    def stream(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Validate and queue a request now; iterate the result for its chunks.

        Raises ParameterError (a ValueError naming `.param`) for bad input and QueueFullError
        when the queue is full, before anything is queued. Must run on the event loop.
        """
        return RequestStream(self, self._submit(prompt, params))

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """Run one request to the end; cancelling the awaiting task cancels the request."""
        stream = self.stream(prompt, params)
        try:
            async for _ in stream:
                pass
        finally:
            stream.cancel()
        return stream.completion()

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(
            running=sum(not r.done for r in self._running),
            waiting=len(self._waiting),
            steps=c["steps"],
            submitted=c["submitted"],
            finished=c["finished"],
            cancelled=c["cancelled"],
            failed=c["failed"],
            rejected=c["rejected"],
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._gen_tokens,
            peak_running=c["peak"],
        )

    async def stop(self) -> None:
        """Fail in-flight requests with EngineClosedError, finish the step, free the thread."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        inflight = self._inflight
        if inflight is not None and not inflight.done():  # let the step end before dropping
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(inflight)
        self._fail_all(EngineClosedError("engine stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._loop = None

    # -- submission ---------------------------------------------------------------------------

    def _submit(self, prompt: str | list[int], params: SamplingParams) -> _Request:
        params.validate()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ParameterError([("prompt", f"token ids outside [0, {self.vocab_size})")])
        else:
            raise ParameterError([("prompt", "must be a string or a list of token ids")])
        if not ids:
            raise ParameterError([("prompt", "must not be empty")])
        if len(ids) + params.max_tokens > self.context_length:
            raise ParameterError(
                [
                    (
                        "max_tokens",
                        f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                        f"the context length ({self.context_length})",
                    )
                ]
            )
        self._ensure_started()
        live = sum(not (r.done or r.cancelled) for r in self._running)
        free = max(0, self.config.max_batch_size - live)
        if len(self._waiting) >= self.config.max_queue + free:
            self._counts["rejected"] += 1
            raise QueueFullError(
                f"queue full: {len(self._waiting)} waiting, {len(self._running)} running"
            )
        req = _Request(self._next_id, ids, params, self.tokenizer)
        self._next_id += 1
        self._counts["submitted"] += 1
        self._waiting.append(req)
        assert self._wakeup is not None
        self._wakeup.set()
        return req

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            if not self._loop.is_closed() and self._task is not None and not self._task.done():
                raise RuntimeError("this engine runs on another event loop")
            # The old loop is gone: let its last step finish, then forget what was bound to it.
            if self._inflight is not None and not self._inflight.done():
                with contextlib.suppress(BaseException):
                    self._inflight.result()
            self._task = None
            self._fail_all(EngineClosedError("event loop closed"))
        if self._executor is None:
            # torch's intra-op thread count is per OS thread once set: pin the worker's to the
            # runtime's, whatever the process-wide value is when the worker first runs.
            self._executor = ThreadPoolExecutor(
                1,
                thread_name_prefix="slimserve-engine",
                initializer=torch.set_num_threads,
                initargs=(max(1, self.runtime.info.threads),),
            )
        if self._task is None or self._task.done():
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="slimserve-engine")

    def _cancel(self, req: _Request) -> None:
        """Mark a request cancelled; safe from any thread (e.g. a finaliser)."""
        if req.done or req.cancelled:
            return
        req.cancelled = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._reap_cancelled_waiting()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._reap_cancelled_waiting)

    def _reap_cancelled_waiting(self) -> None:
        """Drop cancelled requests that never got a slot; running ones leave at the next step."""
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._finish(req, None, "cancelled")
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the scheduler --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None and self._executor is not None
        pending: _Step | None = None  # launched, its tokens not yet collected
        while True:
            if pending is None:
                if not self._running and not self._waiting:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if not self._running:
                    await self._wait_for_company()
                pending = self._launch(ahead=False)
                if pending is None:
                    continue
            try:
                tokens = await asyncio.wrap_future(pending.future)
            except Exception as exc:  # an engine fault: fail this batch, keep serving
                log.exception("engine step failed")
                self._state, self._last = None, None
                for req in self._running:
                    err = EngineError(f"model step failed: {exc!r}")
                    err.__cause__ = exc
                    self._finish(req, err, "error")
                self._running = []
                pending = None
                continue
            done, pending = pending, None
            if self._overlap and not any(r.params.repetition_penalty != 1.0 for r in done.rows):
                pending = self._launch(ahead=True)
            self._collect(done, tokens)
            await asyncio.sleep(0)  # let consumers and submitters run between steps

    @property
    def _overlap(self) -> bool:
        if self.config.overlap is None:
            return self.runtime.info.device.startswith("cuda")
        return self.config.overlap

    def _launch(self, ahead: bool) -> _Step | None:
        """Plan a step and hand it to the worker (None: nothing to run).

        `ahead`: the previous step's tokens are not collected yet (overlap). Its rows that
        reach max_tokens or the context with that token are left out now (they finish when
        it is collected); a row that ends on EOS or a stop string runs one step for nothing,
        and its extra token is ignored (the request is done by then).
        """
        plan, admitted, removed, n_decode = self._plan(ahead)
        if plan is None:
            return None
        self._inflight = self._executor.submit(self._model_step, plan)  # type: ignore[union-attr]
        return _Step(
            self._inflight, list(self._running), admitted, removed, n_decode, time.perf_counter()
        )

    def _collect(self, step: _Step, tokens: list[int]) -> None:
        """A finished step's tokens to text, on the loop (maybe while the next step runs)."""
        self._counts["steps"] += 1
        now = time.perf_counter()
        for req, tok in zip(step.rows, tokens, strict=True):
            self._on_token(req, tok, now)
        self._counts["peak"] = max(self._counts["peak"], len(step.rows))
        self._emit_step(
            StepInfo(
                step=self._counts["steps"],
                batch_size=len(tokens),
                decoded=step.n_decode,
                prefilled=len(step.admitted),
                removed=step.removed,
                seconds=now - step.t0,
            )
        )

    async def _wait_for_company(self) -> None:
        """Idle engine: give the oldest request up to max_wait_ms to gather a fuller batch."""
        assert self._wakeup is not None
        deadline = self._waiting[0].t_submit + self.config.max_wait_ms / 1000
        while len(self._waiting) < self.config.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), left)
            if not self._waiting:
                return

    def _plan(self, ahead: bool = False) -> tuple[_Plan | None, list[_Request], int, int]:
        """Drop finished/cancelled rows, admit waiting requests, and describe the step.

        `ahead`: also drop rows whose uncollected token is their last by length (`_launch`).
        """
        keep = [
            i
            for i, r in enumerate(self._running)
            if not (r.done or r.cancelled or (ahead and self._last_by_length(r)))
        ]
        for req in self._running:
            if req.cancelled and not req.done:
                self._finish(req, None, "cancelled")
        removed = len(self._running) - len(keep)
        kept = [self._running[i] for i in keep]
        admitted: list[_Request] = []
        while self._waiting and len(kept) + len(admitted) < self.config.max_batch_size:
            req = self._waiting.popleft()
            if req.cancelled:
                self._finish(req, None, "cancelled")
                continue
            req.t_start = time.perf_counter()
            admitted.append(req)
        self._running = kept + admitted
        if not self._running:
            if removed:  # the worker still holds the rows' cache: drop it now
                self._state, self._last = None, None
            return None, admitted, removed, 0
        rows = self._running
        penalised = any(r.params.repetition_penalty != 1.0 for r in rows)
        plan = _Plan(
            keep=None if removed == 0 else keep,
            prefill=[r.prompt_ids for r in admitted],
            params=[r.params for r in rows],
            generators=[r.generator for r in rows],
            seen=[r.seen for r in rows] if penalised else None,
        )
        for req in admitted:
            self._prompt_tokens += len(req.prompt_ids)
        return plan, admitted, removed, len(kept)

    def _last_by_length(self, req: _Request) -> bool:
        """Whether the token the running step gives `req` ends it by `max_tokens` or the
        context (the test `_on_token` applies once that token is collected)."""
        n = len(req.token_ids) + 1
        return n >= req.params.max_tokens or len(req.prompt_ids) + n >= self.context_length

    def _model_step(self, plan: _Plan) -> list[int]:
        """Worker thread: select, decode, prefill + merge, sample. Returns one id per row."""
        with torch.inference_mode():
            state, last = self._state, self._last
            if plan.keep is not None and state is not None and last is not None:
                if plan.keep:
                    state = self._select(state, plan.keep)
                    index = torch.tensor(plan.keep, dtype=torch.long, device=last.device)
                    last = last.index_select(0, index)
                else:
                    state, last = None, None
            parts: list[torch.Tensor] = []  # (B_i, V) logits
            if state is not None and last is not None:
                logits, state = self.runtime.decode(last, state)
                parts.append(logits)
            if plan.prefill:
                logits, fresh = self.runtime.prefill(plan.prefill)
                parts.append(logits)
                state = fresh if state is None else self._merge(state, fresh)
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            tokens = sample(logits, plan.params, plan.generators, plan.seen)  # (B,)
            self._state, self._last = state, tokens
            return tokens.tolist()

    # -- tokens to text -----------------------------------------------------------------------

    def _on_token(self, req: _Request, tok: int, now: float) -> None:
        if req.done:
            return
        req.token_s.append(now - req.t_submit)
        self._gen_tokens += 1
        if tok == self.tokenizer.eos_token_id and not req.params.ignore_eos:
            self._finish_text(req, [], "stop")
            return
        req.token_ids.append(tok)
        req.seen.append(tok)
        req.detok.add(tok)
        stops = req.params.stop
        stable = req.detok.stable
        if stops:
            cut = find_stop(stable, stops, max(0, req.searched - req.max_stop + 1))
            req.searched = len(stable)
            if cut >= 0:
                self._finish_text(req, [tok], "stop", stable[:cut])
                return
        n = len(req.token_ids)
        if n >= req.params.max_tokens or len(req.prompt_ids) + n >= self.context_length:
            self._finish_text(req, [tok], "length")
            return
        show = stable[: len(stable) - held_suffix(stable, stops)] if stops else stable
        delta = show[len(req.emitted) :]
        req.emitted = show if len(show) > len(req.emitted) else req.emitted
        req.put(StreamChunk(delta, [tok]))

    def _finish_text(
        self, req: _Request, ids: list[int], reason: FinishReason, text: str | None = None
    ) -> None:
        """Final chunk: flush what was held back (cut at a stop string) and finish."""
        if text is None:
            text = req.detok.text
            cut = find_stop(text, req.params.stop, 0) if req.params.stop else -1
            if cut >= 0:
                text = text[:cut]
        req.final_text = text
        req.put(StreamChunk(text[len(req.emitted) :], ids, reason))
        req.emitted = text
        req.finish_reason = reason
        self._finish(req, None, reason)

    def _finish(self, req: _Request, error: BaseException | None, reason: str) -> None:
        """Mark a request done (it leaves the batch at the next step) and report it."""
        if req.done:
            return
        req.done = True
        req.t_end = time.perf_counter()
        if error is not None:
            req.put(error)
        key = {"cancelled": "cancelled", "error": "failed"}.get(reason, "finished")
        self._counts[key] += 1
        if self.on_finish is not None:
            t = req.timings()
            metrics = RequestMetrics(
                request_id=req.id,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=len(req.token_ids),
                finish_reason=reason,
                queue_s=t.queue_s if req.t_start is not None else None,
                ttft_s=t.ttft_s if req.token_s else None,
                tpot_s=t.tpot_s,
                e2e_s=t.e2e_s,
            )
            try:
                self.on_finish(metrics)
            except Exception:
                log.exception("on_finish callback failed")

    def _emit_step(self, info: StepInfo) -> None:
        if self.on_step is not None:
            try:
                self.on_step(info)
            except Exception:
                log.exception("on_step callback failed")

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self._waiting) + self._running:
            self._finish(req, error, "error" if not req.cancelled else "cancelled")
        self._waiting.clear()
        self._running = []
        self._state, self._last = None, None


__all__ = [
    "Engine",
    "RequestStream",
    "QueueFullError",
    "EngineClosedError",
    "EngineError",
    "EngineConfig",
    "StreamChunk",
    "Timings",
    "Completion",
    "RequestMetrics",
    "StepInfo",
    "EngineStats",
]
