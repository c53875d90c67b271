"""The worker thread's half of the engine: the batch's KV state and one model step over it."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slimserve.runtimes.base import KVState, Runtime, merge, select
from slimserve.sampling import SamplingParams, sample

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


@dataclass
class LaunchedStep:
    """A step handed to the worker: its future and the rows (in KV-state order) it samples for."""

    future: Future
    rows: list[Request]
    admitted: list[Request]
    removed: int
    n_decode: int
    t0: float


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

    def step(self, plan: StepPlan) -> list[int]:
        """Select, decode, prefill + merge, sample. Returns one id per row."""
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
