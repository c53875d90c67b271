"""SamplingParams validation and the vectorised sampler."""

from __future__ import annotations

import math

import pytest
import torch

from slimserve.sampling import ParameterError, SamplingParams, argmax_rows, sample


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and robust on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_invalid_parameter_is_named(kwargs, param):
    with pytest.raises(ValueError, match=param) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ParameterError) and info.value.param == param


def test_every_problem_is_reported():
    with pytest.raises(ParameterError) as info:
        SamplingParams(max_tokens=0, top_p=2.0, top_k=-3)
    assert [name for name, _ in info.value.problems] == ["max_tokens", "top_p", "top_k"]


def test_defaults_and_stop_normalisation():
    p = SamplingParams(stop="\n")
    assert p.stop == ["\n"] and p.max_tokens == 16 and p.temperature == 1.0 and not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(temperature=5.0, top_k=1)] * 3
    out = sample(logits, params, _gens(6))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)] * 2
    out = sample(logits, params, _gens(4))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_only_picks_the_k_best():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3))
    best = set(logits[0].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, [SamplingParams(top_k=3)], [gen])[0]) for _ in range(300)}
    assert picks <= best and len(picks) > 1


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    only_top = {int(sample(logits, [SamplingParams(top_p=0.5)], [gen])[0]) for _ in range(200)}
    assert only_top == {0}  # token 0 alone already reaches 0.5
    two = {int(sample(logits, [SamplingParams(top_p=0.7)], [gen])[0]) for _ in range(400)}
    assert two == {0, 1}


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    rows = logits.expand(n, 4).contiguous()
    out = sample(rows, [SamplingParams(temperature=1.0)] * n, [gen] * n)
    freq = torch.bincount(out, minlength=4).float() / n
    expected = logits.softmax(-1)[0]
    assert (freq - expected).abs().max().item() < 0.03
    hot = sample(rows, [SamplingParams(temperature=0.25)] * n, [gen] * n)
    assert (hot == 0).float().mean().item() > 0.95  # low temperature sharpens


def test_seed_reproduces_and_is_independent_of_batch_mates():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(seed=7), SamplingParams(temperature=0.7, top_p=0.9, seed=8)]
    params.append(SamplingParams(temperature=1.3, top_k=10, seed=9))

    def run(rows: list[int], steps: int = 20) -> list[list[int]]:
        gens = [params[r].make_generator() for r in rows]
        sub = logits[rows]
        return [sample(sub, [params[r] for r in rows], gens).tolist() for _ in range(steps)]

    together = run([0, 1, 2])
    assert together == run([0, 1, 2])
    alone = run([1])
    assert [step[1] for step in together] == [step[0] for step in alone]
    assert len({tuple(step) for step in together}) > 1  # it does sample


def test_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2]])
    gen = [torch.Generator()]
    greedy = SamplingParams(temperature=0)
    assert int(sample(logits, [greedy], gen, [[0]])[0]) == 0
    penalised = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert int(sample(logits, [penalised], gen, [[0, 0]])[0]) == 1  # 2.0 / 2 < 1.9
    assert logits[0, 0] == 2.0  # the caller's logits are untouched
    # Negative logits are multiplied, so a seen token becomes less likely, not more.
    neg = torch.tensor([[-1.0, -1.1, -5.0]])
    assert int(sample(neg, [penalised], gen, [[0]])[0]) == 1
    with pytest.raises(ValueError, match="previous"):
        sample(logits, [penalised], gen)


def test_half_precision_logits():
    logits = torch.randn(2, 10).half()
    out = sample(logits, [SamplingParams(temperature=0), SamplingParams(seed=1)], _gens(2))
    assert out.dtype == torch.long and out.shape == (2,)
    assert out[0] == logits[0].float().argmax()


def test_rows_with_different_filters_in_one_batch():
    """top_k, top_p and plain rows share one call, each keeping its own constraint."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]]).expand(3, 5).contiguous()
    # probabilities 0.43, 0.26, 0.16, 0.10, 0.06: top_p 0.4 keeps token 0 alone
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.4), SamplingParams()]
    gens = _gens(3)
    picks: list[set[int]] = [set(), set(), set()]
    for _ in range(200):
        for row, tok in enumerate(sample(logits, params, gens).tolist()):
            picks[row].add(tok)
    assert picks[0] == {0, 1} and picks[1] == {0} and picks[2] == {0, 1, 2, 3, 4}
    only_k = [SamplingParams(top_k=2, top_p=0.9), SamplingParams(top_k=4)]  # topk path
    for _ in range(100):
        a, b = sample(logits[:2], only_k, gens[:2]).tolist()
        assert a in (0, 1) and b in (0, 1, 2, 3)


def test_protocol_and_engine_share_the_sampling_bounds():
    """The HTTP schema rejects what the engine rejects, from one table of ranges."""
    from pydantic import ValidationError

    from slimserve.protocol import CompletionRequest
    from slimserve.sampling import ParameterError, SamplingParams

    for name, bad in [
        ("max_tokens", -1),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("logprobs", 21),
    ]:
        with pytest.raises(ParameterError, match=name):
            SamplingParams(**{name: bad})
        with pytest.raises(ValidationError, match=name):
            CompletionRequest(model="m", prompt="p", **{name: bad})


def test_argmax_rows_matches_torch_first_maximum_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1, 300, generator=gen)[:, -1]  # a strided view, as decode returns
    logits[3, [7, 200]] = 50.0  # a tie: the first index wins, as with torch
    logits[5, :] = 0.0
    got = argmax_rows(logits)
    assert got.dtype == torch.int64 and got.shape == (16,)
    assert torch.equal(got, logits.argmax(dim=-1)) and got[3] == 7 and got[5] == 0
    half = logits.half()  # other dtypes go to torch unchanged
    assert torch.equal(argmax_rows(half), half.argmax(dim=-1))


def test_count_penalties_follow_openais_formula():
    """logits[j] -= c[j] * frequency + (c[j] > 0) * presence, per row, outputs only."""
    from slimserve.sampling import apply_count_penalties

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 10, generator=gen)
    outputs = [[2, 2, 5], [], [7, 2, 7, 7]]
    expected = logits.clone()
    for row, (pres, freq) in zip((0, 2), ((0.5, 1.5), (-1.0, 2.0)), strict=True):
        for tok in set(outputs[row]):
            expected[row, tok] -= outputs[row].count(tok) * freq + pres
    got = logits.clone()
    apply_count_penalties(got, [0, 1, 2], [0.5, 2.0, -1.0], [1.5, 2.0, 2.0], outputs)
    assert torch.allclose(got, expected)  # row 1 has no output yet: untouched


def test_sample_applies_count_penalties_without_touching_the_callers_logits():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    before = logits.clone()
    pick = sample(
        logits, [SamplingParams(temperature=0, frequency_penalty=2.0)], [None], None, [[0]]
    )
    assert pick.tolist() == [1] and torch.equal(logits, before)
    with pytest.raises(ValueError, match="output"):
        sample(logits, [SamplingParams(temperature=0, presence_penalty=1.0)], [None])
