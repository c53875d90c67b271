"""The ingress's own memory of which variants' queues are full, so overload is answered at once.

A variant's queue limit (`max_queued_requests`) lives in Serve's router, which runs in the
ingress process. Asking it costs several hand-overs through the event loop, and under overload
that loop is at its busiest: it places every queued request on a replica as slots free up. So
once the router has said a variant is full (BackPressureError), the ingress answers that
variant's next requests with the same 503 itself, without asking.

Each request to the variant that ends frees one slot, so the router's queue has room for one
more: it grants one ticket, and the next request holding it asks the router again (and is
queued, or finds the queue full again). Everyone else keeps getting the 503 at once. After
FULL_RECHECK_S without a new "full" from the router the memory is dropped: the load may have
gone, and every request asks again.
"""

from __future__ import annotations

import time
from typing import Any

from deployments.errors import ApiError

FULL_RECHECK_S = 0.25


class _Full:
    """One variant's full queue: when Serve said so, its 503, and the slots freed since."""

    __slots__ = ("at", "data", "tickets")

    def __init__(self, at: float, data: dict[str, Any]):
        self.at = at
        self.data = data
        self.tickets = 0


class FullQueues:
    """Variants whose queue Serve reported full a moment ago, with the 503 it gave."""

    def __init__(self, recheck_s: float = FULL_RECHECK_S):
        self.recheck_s = recheck_s
        self._full: dict[str, _Full] = {}

    def check(self, model: str) -> None:
        """Raise the remembered 503 when `model`'s queue was full within `recheck_s` and no
        slot has freed since; a freed slot lets one request through to ask Serve."""
        seen = self._full.get(model)
        if seen is None:
            return
        if time.monotonic() - seen.at >= self.recheck_s:
            del self._full[model]
        elif seen.tickets > 0:
            seen.tickets -= 1
        else:
            raise ApiError.from_data(seen.data)

    def full(self, model: str, error: ApiError) -> None:
        """Serve just answered `error` (a 503) for `model`: remember it."""
        self._full[model] = _Full(time.monotonic(), error.data)

    def freed(self, model: str) -> None:
        """A request to `model` ended: its queue has room for one more."""
        seen = self._full.get(model)
        if seen is not None:
            seen.tickets += 1
