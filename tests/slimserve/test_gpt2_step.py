"""The torch runtime's lean decode step against transformers' own GPT-2 forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from slimserve.runtimes.base import RuntimeInfo, merge, select
from slimserve.runtimes.gpt2_step import DecodeStep
from slimserve.runtimes.torch_rt import TorchRuntime

TOL = 1e-5


def runtimes(**config) -> tuple[TorchRuntime, TorchRuntime]:
    """Two runtimes over the same random model: the lean step, and the HF module path."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=64, **config)
    model = GPT2LMHeadModel(cfg).eval()
    info = RuntimeInfo("torch", 64, 97, "cpu", "float32", 2, 4, 8, 1)
    fast, slow = TorchRuntime(model, info), TorchRuntime(model, info)
    slow._step = None
    assert fast._step is not None
    return fast, slow


def run(rt: TorchRuntime, seqs: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list]:
    """Greedy decode `steps` tokens; a row leaves and a new one joins halfway."""
    logits, state = rt.prefill(seqs)
    seen, picks = [], []
    for i in range(steps):
        tok = logits.argmax(-1)
        picks.append(tok.tolist())
        logits, state = rt.decode(tok, state)
        seen.append(logits)
        if i == steps // 2:
            state = select(state, [0, 2])
            logits = logits[[0, 2]]
            new_logits, new_state = rt.prefill([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
            state = merge(state, new_state)
            logits = torch.cat([logits, new_logits])
    return seen, picks


@pytest.mark.parametrize(
    "config",
    [{}, {"activation_function": "gelu"}, {"scale_attn_by_inverse_layer_idx": True}],
    ids=["gelu_new", "gelu", "inverse_layer_scale"],
)
def test_lean_step_matches_the_module_path(config):
    fast, slow = runtimes(**config)
    seqs = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [9, 8, 7, 6]]  # padded rows included
    got, got_picks = run(fast, seqs, 12)
    want, want_picks = run(slow, seqs, 12)
    assert got_picks == want_picks
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < TOL


def test_unpadded_batch_takes_the_maskless_attention():
    fast, slow = runtimes()
    seqs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    _, state = fast.prefill(seqs)
    assert fast._mask(state.mask) is None
    got, _ = run(fast, seqs, 6)
    want, _ = run(slow, seqs, 6)
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < TOL


def test_unsupported_models_keep_the_module_path():
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, reorder_and_upcast_attn=True)
    )
    assert DecodeStep.of(model) is None
    assert DecodeStep.of(torch.nn.Linear(2, 2)) is None


def test_arena_select_and_merge_follow_the_base_contract():
    fast, _ = runtimes()
    _, a = fast.prefill([[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [9, 8, 7, 6]])
    _, b = fast.prefill([[4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14]])
    for got, want in [
        (fast.select(a, [2, 0]), select(a, [2, 0])),
        (fast.merge(a, b), merge(a, b)),
        (fast.merge(b, a), merge(b, a)),
    ]:
        assert torch.equal(got.mask, want.mask)
        assert torch.equal(got.positions, want.positions)
        for x, y in zip(got.keys + got.values, want.keys + want.values, strict=True):
            assert torch.equal(x, y)
        assert got.arena is not None and got.arena.capacity > got.past_length
        # the next decode appends in place: the new state views the same arena
        _, grown = fast.decode(torch.zeros(got.batch_size, dtype=torch.long), got)
        assert grown.arena is got.arena
