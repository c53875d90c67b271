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
4. one vectorised `sample` picks a token for every row (prefilled rows get their first token);
5. logprobs, only for the requests that ask (`slimserve.engine_batch`): a request with
   `max_tokens` 0 is only scored and never joins the batch;
6. a step that admits nobody may decode the same rows up to `EngineConfig.decode_burst` times
   (until a request waits or a row is cancelled): the loop's share is paid once per burst.

Overlap (`EngineConfig.overlap`, on by default for a GPU runtime only) plans and launches the
next step before this step's tokens become text; its limits are described there.

A request waits in a bounded queue until a batch slot is free. An idle engine's first request
waits up to `max_wait_ms` for a burst to prefill together (not a lone client's: `Company`).
Long prompts are prefilled whole (no chunked prefill), so they delay that step's decode.

How sampled ids become text, stop strings and streamed deltas: `slimserve.engine_request`.
The worker's half of a step (KV state, select / decode / prefill / merge / sample):
`slimserve.engine_batch`.

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
from pathlib import Path

import torch

from slimserve.engine_batch import BatchWorker, LaunchedStep, StepOutput, StepPlan
from slimserve.engine_request import Request, RequestStream, prompt_ids
from slimserve.engine_types import (
    Company,
    Completion,
    EngineClosedError,
    EngineConfig,
    EngineError,
    EngineStats,
    QueueFullError,
    RequestMetrics,
    StepInfo,
    StreamChunk,
    Timings,
)
from slimserve.runtimes.base import Runtime
from slimserve.sampling import SamplingParams
from slimserve.sampling_logprobs import TokenLogprob
from slimserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


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
        self.context_length = runtime.info.context_length
        self.vocab_size = runtime.info.vocab_size
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # in KV-state row order
        self._scoring: list[Request] = []  # max_tokens 0: in a step's scoring, not in the batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None  # the last step handed to the worker
        self._batch = BatchWorker(runtime)  # the KV state: the worker thread's between steps
        self._next_id = 0
        self._company = Company()  # whether an idle engine waits max_wait_ms for company
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
        """Validate and queue a request now; iterate the result for its chunks. Raises
        ParameterError (a ValueError naming `.param`) for bad input and QueueFullError when the
        queue is full, before anything is queued. Must run on the event loop."""
        return RequestStream(self._submit(prompt, params), self._cancel)

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

    def _submit(self, prompt: str | list[int], params: SamplingParams) -> Request:
        ids = prompt_ids(
            prompt,
            params,
            self.tokenizer,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            can_score=callable(getattr(self.runtime, "score", None)),
        )
        self._ensure_started()
        live = sum(not (r.done or r.cancelled) for r in self._running)
        free = max(0, self.config.max_batch_size - live)
        if len(self._waiting) >= self.config.max_queue + free:
            self._counts["rejected"] += 1
            raise QueueFullError(
                f"queue full: {len(self._waiting)} waiting, {len(self._running)} running"
            )
        req = Request(self._next_id, ids, params, self.tokenizer)
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

    def _cancel(self, req: Request) -> None:
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
        pending: LaunchedStep | None = None  # launched, its tokens not yet collected
        while True:
            if pending is None:
                if not self._running and not self._waiting:
                    self._company.idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if not self._running and self._company.wait:
                    await self._wait_for_company()
                pending = self._launch(ahead=False)
                if pending is None:
                    continue
            try:
                out = await asyncio.wrap_future(pending.future)
            except Exception as exc:  # an engine fault: fail this batch, keep serving
                log.exception("engine step failed")
                self._batch.drop()
                for req in self._running + pending.score_only:
                    err = EngineError(f"model step failed: {exc!r}")
                    err.__cause__ = exc
                    self._finish(req, err, "error")
                self._running = []
                self._scoring = [r for r in self._scoring if r not in pending.score_only]
                pending = None
                continue
            done, pending = pending, None
            if self._overlap and not any(r.params.penalised for r in done.rows):
                pending = self._launch(ahead=True)
            self._collect(done, out)
            await asyncio.sleep(0)  # let consumers and submitters run between steps

    @property
    def _overlap(self) -> bool:
        if self.config.overlap is None:
            return self.runtime.info.device.startswith("cuda")
        return self.config.overlap

    def _launch(self, ahead: bool) -> LaunchedStep | None:
        """Plan a step and hand it to the worker (None: nothing to run).

        `ahead`: the previous step's tokens are not collected yet (overlap). Its rows that
        reach max_tokens or the context with that token are left out now (they finish when
        it is collected); a row that ends on EOS or a stop string runs one step for nothing,
        and its extra token is ignored (the request is done by then).
        """
        plan, admitted, removed, n_decode = self._plan(ahead)
        if plan is None:
            return None
        self._inflight = self._executor.submit(self._batch.step, plan)  # type: ignore[union-attr]
        step = LaunchedStep(
            self._inflight, list(self._running), admitted, removed, n_decode, time.perf_counter()
        )
        self._scoring += step.score_only
        return step

    def _collect(self, step: LaunchedStep, out: StepOutput) -> None:
        """A finished step's tokens to text, on the loop (maybe while the next step runs)."""
        self._counts["steps"] += 1
        now = time.perf_counter()
        for req, entries in zip(step.scored, out.prompts, strict=True):
            req.set_prompt_logprobs(entries)
        for req, tok, lp in zip(step.rows, out.tokens, out.per_row(step.rows), strict=True):
            self._on_token(req, tok, now, lp)
        for tokens in out.more:  # a decode burst's later steps (no logprobs asked in one)
            for req, tok in zip(step.rows, tokens, strict=True):
                self._on_token(req, tok, now, None)
        self._counts["steps"] += len(out.more)
        for req in step.score_only:  # scored, or cancelled while it was
            self._scoring.remove(req)
            self._finish(req, None, "cancelled" if req.cancelled else req.finish_scored())
        self._counts["peak"] = max(self._counts["peak"], len(step.rows))
        self._callback(
            self.on_step,
            StepInfo(
                step=self._counts["steps"],
                batch_size=len(out.tokens),
                decoded=step.n_decode,
                prefilled=len(step.admitted),
                removed=step.removed,
                seconds=now - step.t0,
                steps=1 + len(out.more),
            ),
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

    def _plan(self, ahead: bool = False) -> tuple[StepPlan | None, list[Request], int, int]:
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
        admitted: list[Request] = []
        while self._waiting and len(kept) + len(admitted) < self.config.max_batch_size:
            req = self._waiting.popleft()
            if req.cancelled:
                self._finish(req, None, "cancelled")
                continue
            req.t_start = time.perf_counter()
            admitted.append(req)
        joining = [r for r in admitted if r.params.max_tokens > 0]
        self._running = kept + joining
        self._company.seen(len(kept) + len(admitted) + len(self._waiting))
        if not self._running and len(joining) == len(admitted):
            if removed:  # the worker still holds the rows' cache: drop it now
                self._batch.drop()
            return None, admitted, removed, 0
        plan = StepPlan.of(None if removed == 0 else keep, self._running, joining, admitted)
        if not admitted and not ahead and not self._overlap:
            plan.allow_burst(
                self._running, self.config.decode_burst, self.context_length, self._waiting
            )
        self._prompt_tokens += sum(len(req.prompt_ids) for req in admitted)
        return plan, admitted, removed, len(kept)

    def _last_by_length(self, req: Request) -> bool:
        """Whether the token the running step gives `req` ends it by `max_tokens` or the
        context (the test `_on_token` applies once that token is collected)."""
        n = len(req.token_ids) + 1
        return n >= req.params.max_tokens or len(req.prompt_ids) + n >= self.context_length

    # -- tokens to text -----------------------------------------------------------------------

    def _on_token(self, req: Request, tok: int, now: float, logprob: TokenLogprob | None) -> None:
        if req.done:
            return
        req.token_s.append(now - req.t_submit)
        self._gen_tokens += 1
        reason = req.add_token(tok, self.tokenizer.eos_token_id, self.context_length, logprob)
        if reason is not None:
            self._finish(req, None, reason)

    def _finish(self, req: Request, error: BaseException | None, reason: str) -> None:
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
            self._callback(self.on_finish, req.metrics(reason))

    def _callback(self, callback: Callable[..., None] | None, arg: object) -> None:
        """Run `on_step` or `on_finish` (when set); its exception is logged and ignored."""
        if callback is not None:
            try:
                callback(arg)
            except Exception:
                log.exception("engine callback %r failed", callback)

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self._waiting) + self._running + self._scoring:
            self._finish(req, error, "error" if not req.cancelled else "cancelled")
        self._waiting.clear()
        self._running = []
        self._scoring = []
        self._batch.drop()


__all__ = [  # noqa: RUF022 (the engine first, then what it raises and returns)
    "Engine", "RequestStream", "QueueFullError", "EngineClosedError", "EngineError", "EngineConfig",
    "StreamChunk", "Timings", "Completion", "RequestMetrics", "StepInfo", "EngineStats"
]  # fmt: skip
