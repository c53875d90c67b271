"""Per-variant serving metrics on Ray's Prometheus endpoint (beside Ray Serve's own).

Names follow vLLM's, which dashboards already know, prefixed `slimserve_`;
Ray adds `ray_` on export and `_total` to counters, e.g.
`ray_slimserve_time_to_first_token_seconds_bucket{model="student",...}`. Serve adds the
`deployment`, `replica` and `application` tags itself. Values come from the engine's own
callbacks (`on_finish` per request, `on_step` per model step), so they measure the model's
work inside the replica, not the HTTP hop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray.serve.metrics import Counter, Gauge, Histogram

from slimserve.engine import EngineStats, RequestMetrics

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
TOKEN_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
GAUGE_PERIOD_S = 0.25  # gauges are refreshed at most this often from the step callback


class VariantMetrics:
    """The metrics of one replica of one variant; create inside the replica."""

    def __init__(self, variant: str):
        tags = ("model",)
        self._tags = {"model": variant}
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds",
            "Time from request arrival at the engine to its first token.",
            LATENCY_BUCKETS,
            tags,
        )
        self.tpot = Histogram(
            "slimserve_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            TOKEN_BUCKETS,
            tags,
        )
        self.e2e = Histogram(
            "slimserve_e2e_request_latency_seconds",
            "Time from request arrival at the engine to its end.",
            LATENCY_BUCKETS,
            tags,
        )
        self.prompt_tokens = Counter("slimserve_prompt_tokens", "Prompt tokens prefilled.", tags)
        self.generation_tokens = Counter("slimserve_generation_tokens", "Tokens generated.", tags)
        self.finished = Counter(
            "slimserve_requests_finished",
            "Requests that left the engine, by finish reason (stop, length, cancelled, error).",
            ("model", "finish_reason"),
        )
        self.running = Gauge(
            "slimserve_num_requests_running", "Requests in the running batch.", tags
        )
        self.waiting = Gauge(
            "slimserve_num_requests_waiting", "Requests waiting for a batch slot.", tags
        )
        for metric in (self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens):
            metric.set_default_tags(dict(self._tags))
        for gauge in (self.running, self.waiting):
            gauge.set_default_tags(dict(self._tags))
        self._last_gauges = 0.0

    def on_finish(self, m: RequestMetrics, stats: EngineStats) -> None:
        """Engine callback: one request left (finished, cancelled or failed).

        The gauges are refreshed here too, so they read 0 once the last request is gone even
        when the rate limit skipped the last steps.
        """
        self.set_gauges(stats)
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        if m.tpot_s is not None:
            self.tpot.observe(m.tpot_s)
        if m.finish_reason in ("stop", "length"):
            self.e2e.observe(m.e2e_s)
        if m.queue_s is not None:  # it was prefilled
            self.prompt_tokens.inc(m.prompt_tokens)
        if m.completion_tokens:
            self.generation_tokens.inc(m.completion_tokens)
        self.finished.inc(1, {**self._tags, "finish_reason": m.finish_reason})

    def on_step(self, stats: Callable[[], EngineStats]) -> None:
        """Engine callback after a model step: refresh the gauges, at most every 0.25 s
        (`stats` is only called then: this runs once per generated token)."""
        if time.monotonic() - self._last_gauges >= GAUGE_PERIOD_S:
            self.set_gauges(stats())

    def set_gauges(self, stats: EngineStats) -> None:
        self._last_gauges = time.monotonic()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
