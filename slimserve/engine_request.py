"""One request inside the engine: its state, its text, and the stream a caller iterates.

Text
----
Ids are decoded incrementally (byte-level BPE): only the tail since the last clean character
boundary is re-decoded, and a trailing U+FFFD (a UTF-8 sequence still incomplete) is held
back, so streamed deltas always concatenate to exactly the final text. A stop string cuts the
text before it (OpenAI semantics); while streaming, any suffix that could start a stop string
is held back until it cannot. EOS ends a request with "stop" and is not part of the output
(neither text nor token_ids); `token_ids` hold every other generated id, including those of
a stop string that was cut from the text.

Logprobs (when `params.logprobs` is set) follow `token_ids` one for one, in the chunks and in
the completion; prompt logprobs (`params.prompt_logprobs`) ride on the request's first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from slimserve.engine_types import Completion, FinishReason, RequestMetrics, StreamChunk, Timings
from slimserve.sampling import ParameterError, SamplingParams
from slimserve.sampling_logprobs import TokenLogprob
from slimserve.textstream import IncrementalDetokenizer, find_stop, held_suffix
from slimserve.tokenizer import TextTokenizer


def prompt_ids(
    prompt: str | list[int],
    params: SamplingParams,
    tok: TextTokenizer,
    *,
    vocab_size: int,
    context_length: int,
    can_score: bool = True,
) -> list[int]:
    """The prompt's token ids, once `params` and the prompt are checked; ParameterError (naming
    the field) for bad sampling values, a bad or empty prompt, one that leaves no room for
    `max_tokens` in the context, or prompt logprobs from a runtime that cannot score
    (`can_score`: it has `Runtime.score`)."""
    params.validate()
    if params.prompt_logprobs is not None and not can_score:
        raise ParameterError([("prompt_logprobs", "this runtime cannot score a prompt")])
    if isinstance(prompt, str):
        ids = tok.encode(prompt)
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
            raise ParameterError([("prompt", f"token ids outside [0, {vocab_size})")])
    else:
        raise ParameterError([("prompt", "must be a string or a list of token ids")])
    if not ids:
        raise ParameterError([("prompt", "must not be empty")])
    if len(ids) + params.max_tokens > context_length:
        raise ParameterError(
            [
                (
                    "max_tokens",
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                    f"the context length ({context_length})",
                )
            ]
        )
    return ids


class Request:
    """One request's state; touched on the event loop, read (not written) by the worker."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, tok: TextTokenizer):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = params.make_generator()
        self.seen = list(prompt_ids)  # prompt + output ids, for the repetition penalty
        # Whether a step must do more for this row than sample it (a penalty, logprobs).
        self.extras = params.penalised or params.logprobs is not None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self._prompt_unsent = False  # prompt logprobs not yet on a chunk
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
        if isinstance(item, StreamChunk) and self._prompt_unsent:
            item.prompt_logprobs, self._prompt_unsent = self.prompt_logprobs, False
        with contextlib.suppress(RuntimeError):
            self.queue.put_nowait(item)

    def set_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """The scored prompt's entries: on the next chunk, and in the completion."""
        self.prompt_logprobs, self._prompt_unsent = entries, True

    def finish_scored(self) -> FinishReason:
        """End a request that generates nothing (max_tokens 0) once its prompt is scored."""
        return self._finish_text([], "length")

    def add_token(
        self, tok: int, eos: int, context_length: int, logprob: TokenLogprob | None = None
    ) -> FinishReason | None:
        """Take one sampled id (and its logprob entry, when asked for): queue its text delta,
        or the final chunk when the id ends the request (EOS, a stop string, `max_tokens` or
        the context); returns why it ended."""
        if tok == eos and not self.params.ignore_eos:
            return self._finish_text([], "stop")
        self.token_ids.append(tok)
        lps = None
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            lps = [logprob]
        self.seen.append(tok)
        self.detok.add(tok)
        stops = self.params.stop
        stable = self.detok.stable
        if stops:
            cut = find_stop(stable, stops, max(0, self.searched - self.max_stop + 1))
            self.searched = len(stable)
            if cut >= 0:
                return self._finish_text([tok], "stop", stable[:cut], lps)
        n = len(self.token_ids)
        if n >= self.params.max_tokens or len(self.prompt_ids) + n >= context_length:
            return self._finish_text([tok], "length", None, lps)
        show = stable[: len(stable) - held_suffix(stable, stops)] if stops else stable
        delta = show[len(self.emitted) :]
        self.emitted = show if len(show) > len(self.emitted) else self.emitted
        self.put(StreamChunk(delta, [tok], logprobs=lps))
        return None

    def _finish_text(
        self,
        ids: list[int],
        reason: FinishReason,
        text: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> FinishReason:
        """Final chunk: flush what was held back (cut at a stop string)."""
        if text is None:
            text = self.detok.text
            cut = find_stop(text, self.params.stop, 0) if self.params.stop else -1
            if cut >= 0:
                text = text[:cut]
        self.final_text = text
        if logprobs is None and self.logprobs is not None:
            logprobs = []  # the EOS-final chunk: no token, so no entry
        self.put(StreamChunk(text[len(self.emitted) :], ids, reason, logprobs))
        self.emitted = text
        self.finish_reason = reason
        return reason

    def timings(self) -> Timings:
        end = self.t_end if self.t_end is not None else time.perf_counter()
        start = self.t_start if self.t_start is not None else end
        return Timings(
            queue_s=start - self.t_submit,
            ttft_s=self.token_s[0] if self.token_s else end - self.t_submit,
            e2e_s=end - self.t_submit,
            token_s=list(self.token_s),
        )

    def metrics(self, reason: str) -> RequestMetrics:
        """What the engine reports when the request leaves (`Engine.on_finish`)."""
        t = self.timings()
        return RequestMetrics(
            request_id=self.id,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            finish_reason=reason,
            queue_s=t.queue_s if self.t_start is not None else None,
            ttft_s=t.ttft_s if self.token_s else None,
            tpot_s=t.tpot_s,
            e2e_s=t.e2e_s,
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
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=self.prompt_logprobs,
        )


class RequestStream:
    """Async iterator over one request's `StreamChunk`s, returned by `Engine.stream`.

    Stopping early frees the request's batch slot at the next step: `aclose()` / `cancel()`,
    leaving an `async with` block, cancelling the task awaiting a chunk, or simply dropping
    the stream (its finaliser cancels the request).
    """

    def __init__(self, req: Request, cancel: Callable[[Request], None]):
        self._req = req
        self._cancel = cancel  # the engine's: safe from any thread
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
            self._cancel(self._req)

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
                self._cancel(self._req)
