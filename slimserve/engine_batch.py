"""The worker thread's half of the engine: the batch's KV state and one model step over it.

Logprobs cost nothing unless asked for: a step computes them for the rows that ask only
(`slimserve.sampling_logprobs`, raw: from the runtime's logits before any penalty). Prompt
logprobs (echo) need every prompt position's logits, and every runtime's prefill keeps only
the last position's (torch and ONNX Runtime on CPU compute only that one; TensorRT and ONNX
Runtime with I/O binding compute all and drop the rest), so a request that asks for them gets
one more forward pass over its prompt, `Runtime.score`, in the same step; the prefill path of
every other request is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slimserve.runtimes.base import KVState, Runtime, merge, select
from slimserve.sampling import SamplingParams, sample
from slimserve.sampling_logprobs import TokenLogprob, prompt_logprobs, step_logprobs

if TYPE_CHECKING:
    from slimserve.engine_request import Request


@dataclass
class StepPlan:
    """One step's instructions for the worker (built on the loop, read in the worker)."""

    keep: list[int] | None  # rows of the current batch to keep, None = all
    prefill: list[list[int]]  # prompts of newly admitted requests
    params: list[SamplingParams]  # every row after the step: kept rows, then prefilled ones
    generators: list[torch.Generator]
    seen: list[list[int]] | None  # per row, only when some row has a repetition penalty
    outputs: list[list[int]] | None = None  # per row, when some row has a presence/frequency one
    logprob_rows: list[int] = field(default_factory=list)  # rows that report logprobs
    logprob_ks: list[int] = field(default_factory=list)  # their top-k, in the same order
    score: list[tuple[list[int], int]] = field(default_factory=list)  # (prompt, top-k) to score
    burst: int = 1  # decode steps to run back to back (> 1 only for a plain decode step)
    interrupt: Callable[[], bool] | None = None  # checked between burst steps: True = hand over

    def allow_burst(
        self, rows: list[Request], limit: int, context_length: int, waiting: Sized
    ) -> None:
        """Let this plain decode step run up to `limit` steps (`EngineConfig.decode_burst`):
        as many as every row has left before `max_tokens` and the context, none while a row
        needs the loop between steps (a penalty, logprobs); the worker hands the batch back
        early once `waiting` holds a request or a row is cancelled."""
        if any(r.extras for r in rows):
            return
        left = min(
            min(r.params.max_tokens, context_length - len(r.prompt_ids)) - len(r.token_ids)
            for r in rows
        )
        self.burst = max(1, min(limit, left))
        if self.burst > 1:
            rows = list(rows)
            self.interrupt = lambda: bool(waiting) or any(r.cancelled for r in rows)

    @classmethod
    def of(
        cls,
        keep: list[int] | None,
        rows: list[Request],
        joining: list[Request],
        admitted: list[Request],
    ) -> StepPlan:
        """The plan for the batch `rows` after the step (kept rows, then `joining`, the
        admitted requests that generate); every admitted request asking for prompt logprobs
        is scored."""
        score = [(r.prompt_ids, k) for r in admitted if (k := r.params.prompt_logprobs) is not None]
        if not any(r.extras for r in rows):  # the usual step: as cheap as before these fields
            prefill, params = [r.prompt_ids for r in joining], [r.params for r in rows]
            return cls(keep, prefill, params, [r.generator for r in rows], None, score=score)
        repeated = any(r.params.repetition_penalty != 1.0 for r in rows)
        counted = any(r.params.presence_penalty or r.params.frequency_penalty for r in rows)
        asked = [
            (i, r.params.logprobs) for i, r in enumerate(rows) if r.params.logprobs is not None
        ]
        return cls(
            keep=keep,
            prefill=[r.prompt_ids for r in joining],
            params=[r.params for r in rows],
            generators=[r.generator for r in rows],
            seen=[r.seen for r in rows] if repeated else None,
            outputs=[r.token_ids for r in rows] if counted else None,
            logprob_rows=[i for i, _ in asked],
            logprob_ks=[k for _, k in asked],  # type: ignore[misc]
            score=score,
        )


@dataclass
class StepOutput:
    """What one step gives back to the loop."""

    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob] | None  # one per `plan.logprob_rows` entry (None: none asked)
    prompts: list[list[TokenLogprob]]  # one per `plan.score` entry
    more: list[list[int]] = field(default_factory=list)  # a burst's later steps, one per row each

    def per_row(self, rows: list[Request]) -> list[TokenLogprob | None]:
        """Each row's logprob entry (None for rows that did not ask)."""
        if self.logprobs is None:
            return [None] * len(rows)
        given = iter(self.logprobs)
        return [next(given) if r.params.logprobs is not None else None for r in rows]


@dataclass
class LaunchedStep:
    """A step handed to the worker: its future and the rows (in KV-state order) it samples for."""

    future: Future
    rows: list[Request]
    admitted: list[Request]
    removed: int
    n_decode: int
    t0: float

    @property
    def scored(self) -> list[Request]:
        """Whose prompts the step scores, in `StepPlan.score`'s order."""
        return [r for r in self.admitted if r.params.prompt_logprobs is not None]

    @property
    def score_only(self) -> list[Request]:
        """Admitted requests that generate nothing (max_tokens 0): they end with the step."""
        return [r for r in self.admitted if r.params.max_tokens == 0]


class BatchWorker:
    """The running batch's KV state and last sampled tokens; only the worker thread touches
    them between steps (the loop calls `drop` only when no step is in flight)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        # A runtime may build batch-membership changes its own way (same contract as base.py's).
        self._select = getattr(runtime, "select", select)
        self._merge = getattr(runtime, "merge", merge)
        self._state: KVState | None = None
        self._last: torch.Tensor | None = None  # (B,) last sampled token per row

    def drop(self) -> None:
        """Forget the batch (every row left, or a step failed)."""
        self._state, self._last = None, None

    def step(self, plan: StepPlan) -> StepOutput:
        """Select, decode, prefill + merge, sample, then the logprobs asked for and the
        prompts to score (a full forward pass each, `Runtime.score`)."""
        with torch.inference_mode():
            prompts = [self._score(ids, k) for ids, k in plan.score]
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
            if not parts:  # a step that only scores prompts: no row is running
                self._state, self._last = None, None
                return StepOutput([], None, prompts)
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            tokens = sample(logits, plan.params, plan.generators, plan.seen, plan.outputs)  # (B,)
            self._state, self._last = state, tokens
            logprobs = None
            if plan.logprob_rows:  # raw: the runtime's logits, before any penalty
                logprobs = step_logprobs(logits, tokens, plan.logprob_rows, plan.logprob_ks)
            return StepOutput(tokens.tolist(), logprobs, prompts, self._burst(plan))

    def _burst(self, plan: StepPlan) -> list[list[int]]:
        """A decode burst's steps after the first: decode and sample the same rows again
        until `plan.burst` steps ran or `plan.interrupt` says the loop needs the batch. Only
        plain steps burst (no penalty, no logprobs: `Engine._plan`), so nothing from the loop
        is needed between them."""
        more: list[list[int]] = []
        state, tokens = self._state, self._last
        while state is not None and tokens is not None and len(more) + 1 < plan.burst:
            if plan.interrupt is not None and plan.interrupt():
                break
            logits, state = self.runtime.decode(tokens, state)
            tokens = sample(logits, plan.params, plan.generators)
            self._state, self._last = state, tokens
            more.append(tokens.tolist())
        return more

    def _score(self, ids: list[int], k: int) -> list[TokenLogprob]:
        logits = self.runtime.score(torch.tensor([ids], dtype=torch.long))[0]  # (T, V)
        return prompt_logprobs(logits, ids, k)
