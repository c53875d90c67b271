"""The ingress's own memory of which variants' queues are full, so overload is answered at once.

A variant's queue limit (`max_queued_requests`) lives in Serve's router, which runs on its own
event loop in the ingress process. Asking it costs a hand-over to that loop and back, and under
overload that loop is at its busiest: it places every queued request on a replica as slots
free up. So once the router has said a variant is full (BackPressureError), the ingress answers
that variant's next requests with the same 503 itself, without asking, until a request to it
ends (a slot freed, so the router's queue has room again) or FULL_RECHECK_S has passed (then
the next request asks the router again).
"""

from __future__ import annotations

import time
from typing import Any

from deployments.errors import ApiError

FULL_RECHECK_S = 0.25


class FullQueues:
    """Variants whose queue Serve reported full a moment ago, with the 503 it gave."""

    def __init__(self, recheck_s: float = FULL_RECHECK_S):
        self.recheck_s = recheck_s
        self._full: dict[str, tuple[float, dict[str, Any]]] = {}

    def check(self, model: str) -> None:
        """Raise the remembered 503 when `model`'s queue was full within `recheck_s`."""
        seen = self._full.get(model)
        if seen is not None and time.monotonic() - seen[0] < self.recheck_s:
            raise ApiError.from_data(seen[1])

    def full(self, model: str, error: ApiError) -> None:
        """Serve just answered `error` (a 503) for `model`: remember it."""
        self._full[model] = (time.monotonic(), error.data)

    def freed(self, model: str) -> None:
        """A request to `model` ended: its queue has room again."""
        self._full.pop(model, None)
