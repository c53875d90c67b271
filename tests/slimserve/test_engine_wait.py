"""An idle engine's wait for company (`EngineConfig.max_wait_ms`, `engine_types.Company`).

The first request to reach an idle engine waits up to `max_wait_ms` for others to prefill
with, unless the engine's last busy spell only ever held one request at a time (a lone
client, which would pay the whole wait on every request). A long `max_wait_ms` makes the
wait plain in each request's `queue_s`.
"""

from __future__ import annotations

import asyncio

import pytest

from slimserve.engine import Engine, EngineConfig
from slimserve.engine_types import Company
from tests.slimserve.test_engine import PROMPTS, greedy, run

pytestmark = pytest.mark.timeout(60)

WAIT_MS = 300.0
WAITED_S = WAIT_MS / 1000 * 0.9  # a request that waited for company queued at least this long


def test_company_waits_until_a_spell_ran_alone():
    company = Company()
    assert company.wait  # nothing known yet: wait, as a burst may be starting
    company.idle()  # idle before any spell: still unknown
    assert company.wait
    company.seen(1)
    company.seen(1)
    company.idle()
    assert not company.wait  # one request at a time: a lone client
    company.idle()  # idle again without a spell: no news
    assert not company.wait
    company.seen(1)
    company.seen(3)
    company.seen(0)
    company.idle()
    assert company.wait  # three at once: bursts happen, wait for them again


async def idle() -> None:
    """Let the engine's scheduler see that it has nothing left to run."""
    await asyncio.sleep(0.02)


def test_lone_client_stops_waiting_and_a_burst_turns_the_wait_back_on(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=WAIT_MS))
        queued = []
        for _ in range(3):  # one client, one request after another
            queued.append((await engine.generate(PROMPTS[0], greedy(2))).timings.queue_s)
            await idle()
        burst = await asyncio.gather(*(engine.generate(p, greedy(2)) for p in PROMPTS[:3]))
        await idle()
        after_burst = (await engine.generate(PROMPTS[0], greedy(2))).timings.queue_s
        await idle()
        alone_again = (await engine.generate(PROMPTS[0], greedy(2))).timings.queue_s
        stats = engine.stats()
        await engine.stop()
        return queued, burst, after_burst, alone_again, stats

    queued, burst, after_burst, alone_again, stats = run(body())
    first, *lone = queued
    assert first >= WAITED_S  # a fresh engine cannot tell a lone client from a burst's first
    assert all(q < WAITED_S / 3 for q in lone)  # the spell before ran one request: no wait
    assert all(c.finish_reason == "length" for c in burst)
    assert after_burst >= WAITED_S  # the burst held three at once: wait for company again
    assert alone_again < WAITED_S / 3
    assert stats.finished == 8 and stats.failed == 0


def test_without_the_wait_a_request_arriving_next_still_joins_the_batch(
    tiny_runtime, tiny_tokenizer
):
    """A lone client's engine no longer waits, yet a second request that comes while the
    first runs joins the running batch at the next step (continuous batching)."""

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=WAIT_MS))
        await engine.generate(PROMPTS[0], greedy(2))
        await idle()
        first = engine.stream(PROMPTS[1], greedy(40))
        chunks = aiter(first)
        await anext(chunks)  # the first request runs (it did not wait for company)
        second = await engine.generate(PROMPTS[2], greedy(3))
        async for _ in chunks:
            pass
        peak = engine.stats().peak_running
        await engine.stop()
        return first.completion(), second, peak

    first, second, peak = run(body())
    assert first.timings.queue_s < WAITED_S / 3
    assert second.timings.queue_s < WAITED_S / 3
    assert len(first.token_ids) == 40 and len(second.token_ids) == 3
    assert peak == 2
