"""Logprobs, prompt logprobs (echo) and presence / frequency penalties in the engine, on the tiny
torch runtime and on its ONNX export (CPU, fp32, no Ray)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from slimserve.engine import Engine, EngineConfig, EngineError
from slimserve.sampling import ParameterError, SamplingParams
from slimserve.sampling_logprobs import TokenLogprob

PROMPT = "the quick brown fox jumps over the lazy dog"
TOL = 1e-4  # fp32 on both sides: only summation order differs

pytestmark = pytest.mark.timeout(120)


def run(coro, timeout: float = 100):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> GPT2LMHeadModel:
    """The same weights as the runtimes, through transformers' own forward (fp32)."""
    return GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()


def ref_logprobs(model: GPT2LMHeadModel, ids: list[int]) -> torch.Tensor:
    """(T, V) log-softmax of the reference model's logits at every position of `ids`."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def check_entry(entry: TokenLogprob, row: torch.Tensor, k: int) -> None:
    """One position against the reference row (V,) of log-probabilities."""
    assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=TOL)
    assert entry.top is not None and len(entry.top) == k
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)
    for tid, value in entry.top:
        assert value == pytest.approx(float(row[tid]), abs=TOL)
    assert values[0] == pytest.approx(float(row.max()), abs=TOL)


async def collect(engine: Engine, prompt, params: SamplingParams):
    stream = engine.stream(prompt, params)
    chunks = [c async for c in stream]
    return chunks, stream.completion()


def test_greedy_logprobs_match_the_reference_model(tiny_runtime, tiny_tokenizer, reference):
    prompt = tiny_tokenizer.encode(PROMPT)

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        done = await engine.generate(prompt, greedy(12, logprobs=5))
        plain = await engine.generate(prompt, greedy(12))
        await engine.stop()
        return done, plain

    done, plain = run(body())
    assert done.token_ids == plain.token_ids  # asking for logprobs changes nothing else
    assert plain.logprobs is None and plain.prompt_logprobs is None
    assert done.logprobs is not None and len(done.logprobs) == len(done.token_ids) == 12
    ref = ref_logprobs(reference, prompt + done.token_ids)
    for i, (tok, entry) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        assert entry.token_id == tok
        row = ref[len(prompt) - 1 + i]  # the position that predicted this token
        check_entry(entry, row, 5)
        assert entry.top[0][0] == tok  # greedy: the chosen token is the argmax


def test_echo_scores_the_prompt_without_generating(tiny_runtime, tiny_tokenizer, reference):
    prompt = tiny_tokenizer.encode(PROMPT)
    steps = []

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, on_step=steps.append)
        chunks, done = await collect(
            engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=3)
        )
        stats = engine.stats()
        await engine.stop()
        return chunks, done, stats

    chunks, done, stats = run(body())
    assert done.token_ids == [] and done.text == "" and done.finish_reason == "length"
    assert done.completion_tokens == 0 and done.prompt_tokens == len(prompt)
    assert len(chunks) == 1 and chunks[0].prompt_logprobs == done.prompt_logprobs
    entries = done.prompt_logprobs
    assert [e.token_id for e in entries] == prompt
    assert entries[0].logprob is None and entries[0].top is None  # nothing predicts it
    ref = ref_logprobs(reference, prompt)
    for t, entry in enumerate(entries[1:], start=1):
        check_entry(entry, ref[t - 1], 3)
    # The log-likelihood an evaluation harness sums, against transformers' own loss.
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        nll = reference(ids, labels=ids).loss * (len(prompt) - 1)
    total = sum(e.logprob for e in entries[1:])
    assert total == pytest.approx(-float(nll), abs=TOL)
    assert stats.running == stats.waiting == 0 and stats.finished == 1
    assert steps[0].batch_size == 0  # scored only: it never joined the batch


def test_echo_with_generation_and_a_running_batch(tiny_runtime, tiny_tokenizer, reference):
    """A scored request joining a running one: both get the same tokens as alone."""
    prompt = tiny_tokenizer.encode(PROMPT)

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=0))
        long = engine.stream("a model token", greedy(30))
        first = await long.__anext__()  # it is decoding: the next requests join its batch
        both = await engine.generate(prompt, greedy(6, logprobs=2, prompt_logprobs=2))
        only = await engine.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
        ids = first.token_ids + [t async for c in long for t in c.token_ids]
        alone = await engine.generate("a model token", greedy(30))
        await engine.stop()
        return both, only, ids, alone

    both, only, ids, alone = run(body())
    assert ids == alone.token_ids
    assert len(both.logprobs) == 6 and len(both.prompt_logprobs) == len(prompt)
    for a, b in zip(both.prompt_logprobs[1:], only.prompt_logprobs[1:], strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-6)


def test_streamed_logprobs_equal_the_completions(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        out = []
        for k in (0, 4):
            params = greedy(20, logprobs=k, prompt_logprobs=k)
            chunks, streamed = await collect(engine, PROMPT, params)
            done = await engine.generate(PROMPT, params)
            out.append((chunks, streamed, done))
        await engine.stop()
        return out

    for chunks, streamed, done in run(body()):
        ids = [t for c in chunks for t in c.token_ids]
        lps = [e for c in chunks for e in c.logprobs]
        assert ids == done.token_ids and [e.token_id for e in lps] == ids
        assert lps == done.logprobs == streamed.logprobs
        assert chunks[0].prompt_logprobs == done.prompt_logprobs
        assert all(c.prompt_logprobs is None for c in chunks[1:])


def test_a_stop_string_keeps_logprobs_aligned_with_token_ids(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer)
        free = await engine.generate(PROMPT, greedy(20))
        middle = len(free.text) // 2
        stop = free.text[middle : middle + 2]
        cut = await engine.generate(PROMPT, greedy(20, logprobs=1, stop=[stop]))
        await engine.stop()
        return cut

    cut = run(body())
    assert cut.finish_reason == "stop"
    assert [e.token_id for e in cut.logprobs] == cut.token_ids


def test_frequency_penalty_repeats_fewer_tokens(tiny_runtime, tiny_tokenizer):
    def repeats(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    async def body():
        engine = Engine(tiny_runtime, tiny_tokenizer, EngineConfig(max_wait_ms=20))
        outs = await asyncio.gather(
            engine.generate(PROMPT, greedy(40)),
            engine.generate(PROMPT, greedy(40, frequency_penalty=2.0)),
            engine.generate(PROMPT, greedy(40, presence_penalty=2.0)),
            engine.generate(PROMPT, greedy(40, frequency_penalty=2.0, logprobs=1)),
        )
        await engine.stop()
        return outs

    plain, freq, pres, freq_lp = run(body())
    assert repeats(freq.token_ids) < repeats(plain.token_ids)
    assert repeats(pres.token_ids) < repeats(plain.token_ids)
    assert freq_lp.token_ids == freq.token_ids
    # Raw logprobs: a penalised pick need not be the model's own argmax.
    assert any(e.top[0][0] != e.token_id for e in freq_lp.logprobs)


@pytest.mark.parametrize(
    "change,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ],
)
def test_bad_logprob_and_penalty_values_are_named(change, param):
    with pytest.raises(ParameterError) as info:
        SamplingParams(**change)
    assert info.value.param == param


class NoScore:
    """A runtime that can prefill and decode but not score a whole sequence."""

    def __init__(self, runtime):
        self.info = runtime.info
        self.prefill, self.decode = runtime.prefill, runtime.decode


def test_a_runtime_without_score_refuses_prompt_logprobs(tiny_runtime, tiny_tokenizer):
    async def body():
        engine = Engine(NoScore(tiny_runtime), tiny_tokenizer)
        with pytest.raises(ParameterError) as info:
            engine.stream(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=1))
        done = await engine.generate(PROMPT, greedy(3, logprobs=1))  # generation still works
        await engine.stop()
        return info.value, done

    error, done = run(body())
    assert error.param == "prompt_logprobs" and len(done.logprobs) == 3


class BrokenScore(NoScore):
    """Scoring fails (an engine fault, not the client's)."""

    def score(self, input_ids):
        raise RuntimeError("score exploded")


def test_a_failed_scoring_step_fails_its_requests_and_the_engine_goes_on(
    tiny_runtime, tiny_tokenizer
):
    async def body():
        engine = Engine(BrokenScore(tiny_runtime), tiny_tokenizer)
        with pytest.raises(EngineError):
            await engine.generate(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=1))
        with pytest.raises(EngineError):
            await engine.generate(PROMPT, greedy(3, prompt_logprobs=1))
        done = await engine.generate(PROMPT, greedy(3))
        stats = engine.stats()
        await engine.stop()
        return done, stats

    done, stats = run(body())
    assert done.completion_tokens == 3 and stats.failed == 2 and stats.running == 0


# -- the ONNX runtime ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_runtime(tiny_model_dir: Path, tmp_path_factory):
    """The tiny model exported with its KV cache (as tests/slimserve/test_runtime_onnx.py does)."""
    from build_engines.onnx_export import export_kv_onnx, load_parent_model, prepare_folder
    from slimserve.runtimes.onnx_rt import SIDECAR
    from slimserve.runtimes.onnx_rt import load as load_onnx

    out = tmp_path_factory.mktemp("tiny-onnx-logprobs")
    prepare_folder(tiny_model_dir, out)
    export_kv_onnx(load_parent_model(tiny_model_dir), out / "model.onnx")
    (out / SIDECAR).write_text(json.dumps({"model": "model.onnx", "precision": "float32"}))
    return load_onnx(out, device="cpu", threads=1)


def test_onnx_logprobs_and_echo_match_torch(onnx_runtime, tiny_runtime, tiny_tokenizer):
    prompt = tiny_tokenizer.encode(PROMPT)
    params = greedy(10, logprobs=3, prompt_logprobs=3)

    async def body():
        out = []
        for rt in (tiny_runtime, onnx_runtime):
            engine = Engine(rt, tiny_tokenizer)
            out.append(await engine.generate(prompt, params))
            await engine.stop()
        return out

    torch_done, onnx_done = run(body())
    assert onnx_done.token_ids == torch_done.token_ids
    pairs = list(zip(torch_done.logprobs, onnx_done.logprobs, strict=True))
    pairs += list(zip(torch_done.prompt_logprobs[1:], onnx_done.prompt_logprobs[1:], strict=True))
    for a, b in pairs:
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=TOL)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
