"""The valid range of each sampling parameter, written once.

`slimserve.sampling` checks them (the engine's own guard, for any caller) and
`slimserve.protocol` turns them into pydantic `Field` bounds (the HTTP edge, which adds its own
upper caps on top). This module imports nothing heavy, so the protocol stays free of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """`low <= x` (or `low < x` when `low_open`), and `x <= high` when `high` is set."""

    low: float
    low_open: bool = False
    high: float | None = None

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        return above and (self.high is None or x <= self.high)

    def text(self) -> str:
        """'>= 1', '> 0' or 'in (0, 1]', as error messages say it."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def field_kwargs(self) -> dict[str, Any]:
        """The same bounds as pydantic `Field` keyword arguments."""
        out: dict[str, Any] = {"gt" if self.low_open else "ge": self.low}
        if self.high is not None and math.isfinite(self.high):
            out["le"] = self.high
        return out


MAX_TOKENS = Range(1)
"""The engine also takes 0 with prompt_logprobs (score the prompt, generate nothing), which the
HTTP edge allows only on `/v1/completions` with `echo`."""
TEMPERATURE = Range(0.0)
TOP_P = Range(0.0, low_open=True, high=1.0)
TOP_K = Range(0)
REPETITION_PENALTY = Range(0.0, low_open=True)
PENALTY = Range(-2.0, high=2.0)
"""presence_penalty and frequency_penalty: OpenAI's documented range."""
LOGPROBS = Range(0, high=20)
"""Alternatives returned per position (OpenAI's cap): logprobs, top_logprobs, prompt_logprobs."""
