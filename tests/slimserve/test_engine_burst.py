"""Decode bursts (`EngineConfig.decode_burst`): several decode steps per hand-off to the loop.

A burst must change no output, never run a row past `max_tokens` or the context, and hand the
batch back at once when a request waits or a row is cancelled. Concurrency is driven by
conditions (stream progress, step callbacks), never sleeps.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from slimserve.engine import Engine, EngineConfig, StepInfo
from slimserve.sampling import ParameterError, SamplingParams
from tests.slimserve.test_engine import PROMPTS, CountingEosAt, every_ending, greedy, run


class Gated(CountingEosAt):
    """CountingEosAt whose decode can be held at a gate (to act while a burst is running)."""

    def __init__(self, runtime, eos: int, at: int):
        super().__init__(runtime, eos, at)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.decodes = 0

    def decode(self, tokens, state):
        self.decodes += 1
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        return super().decode(tokens, state)


def completions(runtime, tokenizer, jobs, burst: int, steps: list[StepInfo] | None = None):
    async def body():
        engine = Engine(
            runtime,
            tokenizer,
            EngineConfig(max_batch_size=4, decode_burst=burst),
            on_step=None if steps is None else steps.append,
        )
        done = await asyncio.gather(*(engine.generate(p, s) for p, s in jobs))
        stats = engine.stats()
        await engine.stop()
        return done, stats

    done, stats = run(body())
    return [(c.text, c.token_ids, c.finish_reason) for c in done], stats


def test_bursts_change_no_output(tiny_runtime, tiny_tokenizer):
    """Whatever ends each request (EOS, length, a stop string, the context), bursts of 8 and of
    64 give the completions of one step per hand-off, and the steps are counted alike."""
    eos = tiny_tokenizer.eos_token_id
    jobs = every_ending(tiny_runtime.info.context_length)
    steps: list[StepInfo] = []
    one, one_stats = completions(CountingEosAt(tiny_runtime, eos, at=40), tiny_tokenizer, jobs, 1)
    eight, _ = completions(CountingEosAt(tiny_runtime, eos, at=40), tiny_tokenizer, jobs, 8, steps)
    many, _ = completions(CountingEosAt(tiny_runtime, eos, at=40), tiny_tokenizer, jobs, 64)
    assert eight == one and many == one
    assert one[0][2] == "stop" and one[4][2] == "length" and len(one[1][1]) == 9
    assert max(s.steps for s in steps) > 1  # bursts did run
    assert one_stats.steps > 0


def test_a_burst_stops_at_max_tokens_and_wastes_steps_only_after_eos(tiny_runtime, tiny_tokenizer):
    """One request alone: with `max_tokens` 8 the burst decodes exactly the 7 tokens after the
    prefill's; ending on EOS (the 4th token) it may decode on to the end of the burst, but the
    completion is the same as without bursts."""

    def decoded(burst: int, ignore_eos: bool) -> tuple[int, list[int]]:
        at = len(tiny_tokenizer.encode(PROMPTS[0])) + 3  # EOS as the 4th token
        rt = CountingEosAt(tiny_runtime, tiny_tokenizer.eos_token_id, at=at)
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=ignore_eos)
        [(_, ids, _)], _ = completions(rt, tiny_tokenizer, [(PROMPTS[0], params)], burst)
        return rt.rows, ids

    assert decoded(8, True) == decoded(1, True) and decoded(8, True)[0] == 7
    (burst_rows, burst_ids), (turn_rows, turn_ids) = decoded(8, False), decoded(1, False)
    assert burst_ids == turn_ids and len(turn_ids) == 3 and turn_rows == 3
    assert 3 <= burst_rows <= 7  # the rest of the burst after EOS, never past max_tokens


@pytest.mark.parametrize("event", ["arrival", "cancel"])
def test_a_waiting_request_or_a_cancel_cuts_the_burst(tiny_runtime, tiny_tokenizer, event):
    """While a burst of up to 100 steps runs, a new request (or cancelling the running one)
    makes the worker hand the batch back after the step in progress: the newcomer is admitted
    within two decode steps, not at the end of the burst."""
    rt = Gated(tiny_runtime, tiny_tokenizer.eos_token_id, at=10_000)

    async def body():
        engine = Engine(
            rt,
            tiny_tokenizer,
            EngineConfig(max_batch_size=4, max_wait_ms=0, decode_burst=100),
        )
        long = engine.stream(PROMPTS[0], greedy(100))
        await long.__anext__()  # the prefill's token: the next hand-off is a burst
        rt.entered.clear()
        rt.gate.clear()
        await asyncio.to_thread(rt.entered.wait, 60)  # the worker is inside the burst
        before = rt.decodes
        if event == "arrival":
            other = engine.stream(PROMPTS[1], greedy(2))
        else:
            long.cancel()
        rt.gate.set()
        if event == "arrival":
            await other.__anext__()
        else:
            while not engine.stats().cancelled:
                await asyncio.sleep(0.001)
        after = rt.decodes
        long.cancel()
        await engine.stop()
        return before, after

    before, after = run(body())
    assert after - before <= 2


def test_penalties_and_logprobs_run_one_step_per_hand_off(tiny_runtime, tiny_tokenizer):
    for extra in ({"frequency_penalty": 1.0}, {"logprobs": 2}):
        steps: list[StepInfo] = []
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **extra)
        completions(tiny_runtime, tiny_tokenizer, [(PROMPTS[1], params)], 8, steps)
        assert [s.steps for s in steps] == [1] * 12, extra


def test_decode_burst_must_be_positive():
    with pytest.raises(ParameterError) as err:
        EngineConfig(decode_burst=0)
    assert "decode_burst" in str(err.value)
