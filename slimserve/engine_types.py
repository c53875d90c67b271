"""Value types of the engine's API: errors, configuration, chunks, results, statistics.

Kept apart from `engine.py` so callers (Serve replicas, benchmarks) can read the shapes of what
the engine returns without reading the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimserve.sampling import ParameterError
from slimserve.sampling_logprobs import TokenLogprob

FinishReason = Literal["stop", "length"]


class QueueFullError(RuntimeError):
    """The waiting queue is full: the caller should shed load (HTTP 503 / retry later)."""


class EngineClosedError(RuntimeError):
    """The engine was stopped while the request was waiting or running."""


class EngineError(RuntimeError):
    """A model step failed (an engine fault, not the client's): its requests end with this."""


@dataclass
class EngineConfig:
    """Scheduling knobs of one engine."""

    max_batch_size: int = 16
    """Most requests decoded together in one step."""
    max_wait_ms: float = 2.0
    """How long the first request reaching an idle engine waits for company before prefill."""
    max_queue: int = 1024
    """Most requests waiting for a batch slot; past it `submit` raises QueueFullError."""
    overlap: bool | None = None
    """Launch the next model step before turning this step's tokens into text; None = on when
    the runtime runs on a GPU, off on a CPU.

    As soon as a step's tokens are back, the next step is planned and handed to the worker, and
    only then are the tokens turned into text, so the loop's per-token work (detokenizing, stop
    strings, streaming) runs while the model does. That pays when the step waits on a device;
    on a CPU the step's own Python holds the GIL the loop needs (reports/profile_serving.md
    measured no gain under Serve and a slower lone request). The next step cannot know yet
    which rows that text work will end: rows ending by `max_tokens` or the context are left
    out (known from the counts), and a row ending on EOS or a stop string decodes one more
    token that is thrown away. With a penalty (repetition, presence, frequency) in the batch
    the next step needs this step's tokens, so the two run in turn."""
    decode_burst: int = 16
    """Most decode steps the worker runs back to back before it hands the tokens to the loop
    (a burst); 1 = every step goes back to the loop.

    Each hand-off costs the loop's planning, a thread switch and the per-step bookkeeping,
    which for a small model on a CPU is more than the model step itself. A burst is cut short
    as soon as a request waits for a slot or a row is cancelled, so a newcomer waits at most
    one step as before, and it never runs a row past `max_tokens` or the context. It applies
    only to steps that admit no request (a prefill step hands its first tokens over at once),
    with overlap off, and while no row has a penalty or asks for logprobs (their inputs come
    from the loop each step). Costs: tokens reach a stream in groups of up to this many, and
    a row that ends on EOS or a stop string inside a burst decodes the rest of it for
    nothing (the extra tokens are dropped)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(("max_batch_size", f"must be >= 1, got {self.max_batch_size}"))
        if self.max_wait_ms < 0:
            problems.append(("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}"))
        if self.max_queue < 0:
            problems.append(("max_queue", f"must be >= 0, got {self.max_queue}"))
        if self.decode_burst < 1:
            problems.append(("decode_burst", f"must be >= 1, got {self.decode_burst}"))
        if problems:
            raise ParameterError(problems)


@dataclass
class StreamChunk:
    """One generated token's worth of output (text may be "" while held back)."""

    text: str  # new text since the previous chunk
    token_ids: list[int]  # ids generated since the previous chunk ([] for the EOS-final chunk)
    finish_reason: FinishReason | None = None  # set on the last chunk only
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk, when asked for


@dataclass
class Timings:
    """Where a request's time went, in seconds from `submit`."""

    queue_s: float  # until its prefill started
    ttft_s: float  # until its first token was sampled
    e2e_s: float  # until it finished
    token_s: list[float] = field(default_factory=list)  # when each sampled token (EOS too) came

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if len(self.token_s) < 2:
            return None
        return (self.token_s[-1] - self.token_s[0]) / (len(self.token_s) - 1)


@dataclass
class Completion:
    """A finished request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry (params.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = (
        None  # one per prompt token (params.prompt_logprobs)
    )


@dataclass
class RequestMetrics:
    """What `on_finish` receives for every request that leaves the engine, however it ends."""

    request_id: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    queue_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float


@dataclass
class StepInfo:
    """What `on_step` receives after every hand-off from the worker: one model step, or a
    decode burst of `steps` of them."""

    step: int  # 1-based step counter (the last step of a burst)
    batch_size: int  # rows sampled in this step (decoded + prefilled)
    decoded: int
    prefilled: int
    removed: int  # rows that left the batch at the start of the step
    seconds: float  # wall time of the model work in the worker
    steps: int = 1  # model steps in this hand-off (> 1: a decode burst)


@dataclass
class EngineStats:
    """Counters for metrics (`num_requests_running`, `prompt_tokens_total`, ...)."""

    running: int
    waiting: int
    steps: int
    submitted: int
    finished: int
    cancelled: int
    failed: int
    rejected: int
    prompt_tokens_total: int
    generation_tokens_total: int
    peak_running: int


class Company:
    """Whether an idle engine's first request should wait `max_wait_ms` for company.

    The wait gathers a burst into one prefill, but a client that sends one request after
    another finds the engine idle every time and would wait the whole `max_wait_ms` for
    company that never comes. So the engine waits only when its last busy spell (from leaving
    idle to being idle again) held two requests or more at once; before the first spell it
    does not know, and waits. A spell that holds two turns the wait back on for the next.
    """

    def __init__(self) -> None:
        self.peak = 0  # most requests in the engine at once in this busy spell
        self.wait = True  # whether the next idle engine waits for company

    def seen(self, requests: int) -> None:
        """Requests in the engine (running and waiting) at a step."""
        self.peak = max(self.peak, requests)

    def idle(self) -> None:
        """The engine has nothing to run: the busy spell, if there was one, ends."""
        if self.peak:
            self.wait, self.peak = self.peak > 1, 0
