"""The continuous-batching engine on the tiny torch runtime (CPU, no Ray).

Concurrency is driven by conditions (stream progress, step and finish callbacks), never sleeps.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

from slimserve.engine import (
    Engine,
    EngineClosedError,
    EngineConfig,
    QueueFullError,
    RequestMetrics,
    StepInfo,
)
from slimserve.generate_cli import generate_main
from slimserve.sampling import ParameterError, SamplingParams

PROMPTS = [
    "the",
    "quick brown fox",
    "the river over the quiet mountain",
    "café",
    "a model token cache batch server stream engine",
    "東京 日本語",
    "lazy dog jumps",
    "über straße résumé naïve façade",
    "🙂 🚀",
    "the engine streams the batch over the server and the cache",
]


def run(coro, timeout: float = 120):
    """Run one test body on a fresh event loop, failing instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


async def consume(stream) -> tuple[list[int], str, list]:
    ids, texts, chunks = [], [], []
    async for chunk in stream:
        ids += chunk.token_ids
        texts.append(chunk.text)
        chunks.append(chunk)
    return ids, "".join(texts), chunks


def test_greedy_alone_equals_joining_a_running_batch(tiny_runtime, tiny_tokenizer):
    """Ten requests of different lengths join one by one, each at a later decode step."""
    params = [greedy(40 - 2 * i) for i in range(len(PROMPTS))]

    async def body():
        alone = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_batch_size=1))
        refs = [await alone.generate(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
        await alone.stop()

        steps: list[StepInfo] = []
        engine = Engine(  # one step per hand-off, so each join lands while the others run
            tiny_runtime,
            tiny_tokenizer,
            EngineConfig(max_wait_ms=0, decode_burst=1),
            on_step=steps.append,
        )
        two_tokens = [asyncio.Event() for _ in PROMPTS]
        results: list = [None] * len(PROMPTS)

        async def client(i: int) -> None:
            stream = engine.stream(PROMPTS[i], params[i])
            ids, text = [], ""
            async for chunk in stream:
                ids += chunk.token_ids
                text += chunk.text
                if len(ids) >= 2:
                    two_tokens[i].set()
            results[i] = (ids, text, stream.completion())

        tasks = []
        for i in range(len(PROMPTS)):
            if i:
                await two_tokens[i - 1].wait()  # the previous request is decoding: join now
            tasks.append(asyncio.create_task(client(i)))
        await asyncio.gather(*tasks)
        stats = engine.stats()
        await engine.stop()
        return refs, results, steps, stats

    refs, results, steps, stats = run(body())
    for ref, (ids, text, done) in zip(refs, results, strict=True):
        assert ids == ref.token_ids == done.token_ids
        assert text == ref.text == done.text
        assert done.finish_reason == "length" and done.completion_tokens == len(ids)
    joins = [s for s in steps if s.prefilled and s.decoded]
    assert len(joins) >= len(PROMPTS) - 1  # every later request joined a running batch
    assert len({s.step for s in steps if s.prefilled}) == len(PROMPTS)  # each at its own step
    assert stats.peak_running >= 8
    assert stats.finished == len(PROMPTS) and stats.running == stats.waiting == 0


def test_streamed_text_equals_generated_text(tiny_runtime, tiny_tokenizer):
    """Sampling a random byte-level model emits broken UTF-8 pieces: deltas must still add up."""

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        out = []
        for seed in range(4):
            sp = SamplingParams(max_tokens=60, temperature=1.0, seed=seed, ignore_eos=True)
            done = await engine.generate(PROMPTS[seed], sp)
            ids, text, chunks = await consume(engine.stream(PROMPTS[seed], sp))
            out.append((done, ids, text, chunks))
        await engine.stop()
        return out

    for done, ids, text, chunks in run(body()):
        assert ids == done.token_ids
        assert text == done.text == tiny_tokenizer.decode(ids)
        assert len(chunks) == done.completion_tokens  # one chunk per token
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == "length"
        assert all(not c.text.endswith("\ufffd") for c in chunks[:-1])  # held back, not emitted


def test_top_k_1_equals_greedy(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        a = await engine.generate(PROMPTS[2], greedy(30))
        b = await engine.generate(
            PROMPTS[2], SamplingParams(max_tokens=30, temperature=1.7, top_k=1, ignore_eos=True)
        )
        await engine.stop()
        return a, b

    a, b = run(body())
    assert a.token_ids == b.token_ids and a.text == b.text


def test_seed_reproduces_alone_and_in_a_batch(tiny_runtime, tiny_tokenizer):
    def sp(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, seed=seed)

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=50))
        first = await engine.generate(PROMPTS[1], sp(11))
        batch = await asyncio.gather(
            *(engine.generate(PROMPTS[i], sp(11 if i == 1 else i)) for i in range(6))
        )
        other = await engine.generate(PROMPTS[1], sp(12))
        await engine.stop()
        return first, batch, other

    first, batch, other = run(body())
    assert batch[1].token_ids == first.token_ids and batch[1].text == first.text
    assert other.token_ids != first.token_ids


def test_stop_strings_cut_exactly(tiny_runtime, tiny_tokenizer):
    base = SamplingParams(max_tokens=60, temperature=1.0, seed=3, ignore_eos=True)

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        full = await engine.generate(PROMPTS[4], base)
        text = full.text
        # A stop string whose first occurrence is well inside the text (no U+FFFD in it).
        k = next(
            k
            for k in range(8, len(text) - 3)
            if "\ufffd" not in text[k : k + 3] and text.find(text[k : k + 3]) == k
        )
        stop = text[k : k + 3]
        later = text[k + 6 : k + 8]
        sp = SamplingParams(
            max_tokens=60, temperature=1.0, seed=3, ignore_eos=True, stop=[later, stop]
        )
        cut = await engine.generate(PROMPTS[4], sp)
        ids, streamed, chunks = await consume(engine.stream(PROMPTS[4], sp))
        await engine.stop()
        return full, stop, later, cut, ids, streamed, chunks

    full, stop, later, cut, ids, streamed, chunks = run(body())
    first = min(i for i in (full.text.find(stop), full.text.find(later)) if i >= 0)
    assert cut.text == full.text[:first]
    assert cut.finish_reason == "stop"
    assert streamed == cut.text and ids == cut.token_ids
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]  # same tokens up to the stop
    assert len(cut.token_ids) < len(full.token_ids)
    assert chunks[-1].finish_reason == "stop"
    emitted = ""
    for chunk in chunks:  # never any text past the cut, at any point of the stream
        emitted += chunk.text
        assert cut.text.startswith(emitted)


class EosAt:
    """The real tiny runtime, except that EOS wins once a row's position reaches `at`."""

    def __init__(self, runtime, eos: int, at: int):
        self.runtime, self.eos, self.at = runtime, eos, at
        self.info = runtime.info

    def _force(self, logits: torch.Tensor, state) -> torch.Tensor:
        logits = logits.clone()
        logits[state.positions >= self.at, self.eos] = 1e4
        return logits

    def prefill(self, seqs):
        logits, state = self.runtime.prefill(seqs)
        return self._force(logits, state), state

    def decode(self, tokens, state):
        logits, state = self.runtime.decode(tokens, state)
        return self._force(logits, state), state

    def score(self, input_ids):
        return self.runtime.score(input_ids)


def test_eos_ends_with_stop(tiny_runtime, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    prompt = tiny_tokenizer.encode(PROMPTS[2])
    rt = EosAt(tiny_runtime, eos, at=len(prompt) + 5)

    async def body():
        engine = Engine(rt, tiny_tokenizer)
        done = await engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0))
        ids, text, chunks = await consume(
            engine.stream(prompt, SamplingParams(max_tokens=20, temperature=0))
        )
        kept = await engine.generate(
            prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        )
        await engine.stop()
        return done, ids, text, chunks, kept

    done, ids, text, chunks, kept = run(body())
    assert done.finish_reason == "stop" and done.completion_tokens == 5
    assert eos not in done.token_ids and done.text == tiny_tokenizer.decode(done.token_ids)
    assert ids == done.token_ids and text == done.text
    assert chunks[-1].token_ids == [] and chunks[-1].finish_reason == "stop"
    assert kept.finish_reason == "length" and kept.token_ids[5:] == [eos] * 3


def test_prompt_filling_the_context_ends_with_length(tiny_runtime, tiny_tokenizer):
    n = tiny_runtime.info.context_length

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        done = await engine.generate([7] * (n - 8), greedy(8))
        await engine.stop()
        return done

    done = run(body())
    assert done.finish_reason == "length" and done.completion_tokens == 8
    assert done.prompt_tokens == n - 8
    t = done.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.e2e_s and len(t.token_s) == 8 and t.tpot_s > 0


def test_cancelled_stream_frees_its_slot_at_the_next_step(tiny_runtime, tiny_tokenizer):
    async def body():
        steps: list[StepInfo] = []
        engine = Engine(
            tiny_runtime,
            tiny_tokenizer,
            EngineConfig(max_batch_size=2, max_wait_ms=0),
            on_step=steps.append,
        )
        a = engine.stream(PROMPTS[0], greedy(100))
        b = engine.stream(PROMPTS[1], greedy(100))
        c = engine.stream(PROMPTS[2], greedy(3))
        got = 0
        async for _ in a:
            got += 1
            if got == 3:
                break
        assert engine.stats().waiting == 1  # c waits for a slot
        done_steps = engine.stats().steps
        await a.aclose()
        first = await c.__anext__()
        stats = engine.stats()
        admitted = next(s for s in steps if s.step > done_steps and s.prefilled)
        rest = await consume(c)
        b.cancel()
        await engine.stop()
        return done_steps, admitted, first, stats, rest

    done_steps, admitted, first, stats, rest = run(body())
    # The step in flight when `a` was cancelled may still carry it; the one after drops it.
    assert admitted.step <= done_steps + 2
    assert admitted.removed == 1 and admitted.prefilled == 1
    assert stats.cancelled == 1 and first.token_ids
    assert rest[2][-1].finish_reason == "length"


def test_cancelling_the_task_or_dropping_the_stream_cancels(tiny_runtime, tiny_tokenizer):
    async def body():
        cancelled = asyncio.Event()
        steps = asyncio.Event()
        metrics: list[RequestMetrics] = []

        def on_finish(m: RequestMetrics) -> None:
            metrics.append(m)
            if m.finish_reason == "cancelled":
                cancelled.set()

        engine = Engine(
            tiny_runtime,
            tiny_tokenizer,
            on_step=lambda s: steps.set(),
            on_finish=on_finish,
        )
        task = asyncio.create_task(engine.generate(PROMPTS[3], greedy(100)))
        await steps.wait()  # it is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await cancelled.wait()
        after_task = engine.stats()

        cancelled.clear()
        stream = engine.stream(PROMPTS[5], greedy(100))
        await stream.__anext__()
        del stream
        gc.collect()
        await cancelled.wait()
        after_drop = engine.stats()
        await engine.stop()
        return after_task, after_drop, metrics

    after_task, after_drop, metrics = run(body())
    assert after_task.cancelled == 1 and after_drop.cancelled == 2
    assert [m.finish_reason for m in metrics] == ["cancelled", "cancelled"]
    assert all(m.completion_tokens < 100 for m in metrics)


def test_queue_full_raises_queue_full_error(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_batch_size=1, max_queue=1))
        first = engine.stream(PROMPTS[0], greedy(50))  # takes the one slot
        second = engine.stream(PROMPTS[1], greedy(50))  # waits
        with pytest.raises(QueueFullError):
            engine.stream(PROMPTS[2], greedy(50))
        stats = engine.stats()
        await engine.stop()
        with pytest.raises(EngineClosedError):
            await first.__anext__()
        with pytest.raises(EngineClosedError):
            await consume(second)
        return stats

    stats = run(body())
    assert stats.submitted == 2 and stats.rejected == 1


@pytest.mark.parametrize(
    "prompt,change,param",
    [
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"temperature": float("nan")}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_k": -2}, "top_k"),
        ("hi", {"stop": [""]}, "stop"),
        ("hi", {"repetition_penalty": 0.0}, "repetition_penalty"),
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([1, 10_000], {}, "prompt"),
        ([1] * 120, {"max_tokens": 9}, "max_tokens"),  # 129 > the 128-token context
    ],
)
def test_bad_input_names_the_parameter_and_queues_nothing(
    tiny_runtime, tiny_tokenizer, prompt, change, param
):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        sp = SamplingParams(max_tokens=4)
        for key, value in change.items():  # mutate after construction: submit re-validates
            setattr(sp, key, value)
        with pytest.raises(ValueError, match=param) as info:
            engine.stream(prompt, sp)
        with pytest.raises(ValueError, match=param):
            await engine.generate(prompt, sp)
        stats = engine.stats()
        await engine.stop()
        return info.value, stats

    error, stats = run(body())
    assert isinstance(error, ParameterError) and error.param == param
    assert stats.submitted == stats.waiting == stats.running == stats.steps == 0


def test_repetition_penalty_runs_in_the_engine(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=50))
        plain, penalised = await asyncio.gather(
            engine.generate(PROMPTS[6], greedy(30)),
            engine.generate(PROMPTS[6], greedy(30, repetition_penalty=5.0)),
        )
        await engine.stop()
        return plain, penalised

    plain, penalised = run(body())
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert penalised.token_ids != plain.token_ids


def test_stats_and_metrics_callbacks(tiny_runtime, tiny_tokenizer):
    metrics: list[RequestMetrics] = []

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, on_finish=metrics.append)
        await asyncio.gather(*(engine.generate(p, greedy(5)) for p in PROMPTS[:3]))
        stats = engine.stats()
        await engine.stop()
        return stats

    stats = run(body())
    assert stats.finished == 3 and stats.generation_tokens_total == 15
    assert stats.prompt_tokens_total == sum(len(tiny_tokenizer.encode(p)) for p in PROMPTS[:3])
    assert sorted(m.finish_reason for m in metrics) == ["length"] * 3
    assert all(m.ttft_s is not None and m.ttft_s <= m.e2e_s for m in metrics)


def test_engine_restarts_on_a_new_event_loop(tiny_runtime, tiny_tokenizer):
    """A shared engine (e.g. a session fixture) survives tests that each run their own loop."""
    engine = Engine(tiny_runtime, tiny_tokenizer)
    one = run(engine.generate(PROMPTS[0], greedy(4)))
    two = run(engine.generate(PROMPTS[0], greedy(4)))
    assert one.token_ids == two.token_ids
    run(engine.stop())


def test_generate_main_streams_the_completion_to_stdout(
    tiny_model_dir, tiny_runtime, tiny_tokenizer, capsys
):
    done = generate_main(tiny_model_dir, PROMPTS[1], greedy(12), threads=1)
    out = capsys.readouterr()
    assert out.out == done.text + "\n"
    assert "12 tokens, finish=length" in out.err

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        ref = await engine.generate(PROMPTS[1], greedy(12))
        await engine.stop()
        return ref

    assert run(body()).token_ids == done.token_ids


def test_greedy_matches_hugging_face_generate(tiny_runtime, tiny_tokenizer):
    """The engine's batched greedy tokens equal HF `generate` run one prompt at a time."""
    eos = tiny_tokenizer.eos_token_id
    refs = []
    with torch.inference_mode():
        for prompt in PROMPTS[:4]:
            x = torch.tensor([tiny_tokenizer.encode(prompt)])
            out = tiny_runtime.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
                pad_token_id=eos,
            )
            refs.append(out[0, x.shape[1] :].tolist())

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=50))
        done = await asyncio.gather(*(engine.generate(p, greedy(20)) for p in PROMPTS[:4]))
        await engine.stop()
        return done

    assert [d.token_ids for d in run(body())] == refs


def test_worker_thread_uses_the_runtimes_thread_count(tiny_runtime, tiny_tokenizer):
    seen: list[int] = []

    class Spy(EosAt):
        def decode(self, tokens, state):
            seen.append(torch.get_num_threads())
            return self.runtime.decode(tokens, state)

    async def body():
        engine = Engine(Spy(tiny_runtime, tiny_tokenizer.eos_token_id, at=10**6), tiny_tokenizer)
        await engine.generate(PROMPTS[0], greedy(3))
        await engine.stop()

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process-wide value changes after the runtime was loaded
    try:
        run(body())
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {tiny_runtime.info.threads}


class CountingEosAt(EosAt):
    """EosAt that also counts the rows it decodes."""

    rows = 0

    def decode(self, tokens, state):
        self.rows += int(tokens.shape[0])
        return super().decode(tokens, state)


def every_ending(context_length: int) -> list[tuple[str | list[int], SamplingParams]]:
    """Requests that end every way, run under `CountingEosAt(..., at=40)`: EOS, max_tokens,
    seeded sampling, a stop string, the context, a single token."""
    return [
        (PROMPTS[0], SamplingParams(max_tokens=60, temperature=0)),  # ends on EOS
        (PROMPTS[1], greedy(9)),
        (PROMPTS[2], SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)),
        (PROMPTS[4], greedy(25, stop=["the"])),
        ([7] * (context_length - 6), greedy(6)),  # fills the context
        (PROMPTS[9], greedy(1)),
    ]


def test_overlap_changes_no_output(tiny_runtime, tiny_tokenizer):
    """Overlapped steps give the same completions as steps in turn, whatever ends each request."""
    eos = tiny_tokenizer.eos_token_id
    jobs = every_ending(tiny_runtime.info.context_length)

    def results(overlap: bool):
        rt = CountingEosAt(tiny_runtime, eos, at=40)

        async def body():
            engine = Engine(rt, tiny_tokenizer, EngineConfig(max_batch_size=4, overlap=overlap))
            done = await asyncio.gather(*(engine.generate(p, s) for p, s in jobs))
            await engine.stop()
            return done

        done = run(body())
        return [(c.text, c.token_ids, c.finish_reason) for c in done], rt.rows

    overlapped, _ = results(True)
    in_turn, _ = results(False)
    assert overlapped == in_turn
    assert overlapped[0][2] == "stop" and overlapped[4][2] == "length"


@pytest.mark.parametrize("ignore_eos", [False, True], ids=["eos", "length"])
def test_overlap_wastes_one_row_on_eos_and_none_on_length(tiny_runtime, tiny_tokenizer, ignore_eos):
    def decoded_rows(overlap: bool) -> tuple[int, int]:
        at = len(tiny_tokenizer.encode(PROMPTS[0])) + 3  # EOS as the 4th token
        rt = CountingEosAt(tiny_runtime, tiny_tokenizer.eos_token_id, at=at)
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=ignore_eos)

        async def body():
            config = EngineConfig(overlap=overlap, decode_burst=1)  # one token per step
            engine = Engine(rt, tiny_tokenizer, config)
            done = await engine.generate(PROMPTS[0], params)
            await engine.stop()
            return done

        tokens = run(body()).completion_tokens
        return rt.rows, tokens

    (overlapped, n), (in_turn, m) = decoded_rows(True), decoded_rows(False)
    assert n == m == (8 if ignore_eos else 3)
    assert in_turn == (7 if ignore_eos else 3)  # the first token comes from the prefill
    assert overlapped == in_turn + (0 if ignore_eos else 1)


def test_overlap_defaults_to_the_runtimes_device(tiny_runtime, tiny_tokenizer):
    import dataclasses

    assert Engine(tiny_runtime, tiny_tokenizer)._overlap is False  # CPU

    class OnGpu:
        info = dataclasses.replace(tiny_runtime.info, device="cuda:0")

    assert Engine(OnGpu(), tiny_tokenizer)._overlap is True
    assert Engine(OnGpu(), tiny_tokenizer, EngineConfig(overlap=False))._overlap is False
