"""A batch trained in slices (`training.loop.MAX_LOGITS`, for GPT-2's 50,257-token logits) gives
the gradients and loss of the whole batch at once, with and without a KD teacher."""

from __future__ import annotations

import pytest
import torch

import training.loop as loop
from slimserve.gpt2_config import gpt2_config
from slimserve.steps import Budget


def _learner(tmp_path, monkeypatch, teacher: bool) -> loop.Learner:
    import ray.train
    import ray.train.torch

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)  # no DDP, no Ray
    job = loop.LoopConfig(
        init_dir=str(tmp_path / "init"),
        train_blocks=torch.zeros(8, 16, dtype=torch.int32).numpy(),
        val_blocks=torch.zeros(2, 16, dtype=torch.int32).numpy(),
        budget=Budget(tokens=128, batch_size=8, lr=1e-3),
        teacher_dir=str(tmp_path / "teacher") if teacher else None,
        alpha_lm=0.5 if teacher else 1.0,
    )
    learner = loop.Learner(job, loop.Schedule.of(job.budget, 16), torch.device("cpu"))
    return learner


def _grads_and_parts(learner: loop.Learner, ids: torch.Tensor) -> tuple[dict, dict]:
    grads: dict[str, torch.Tensor] = {}

    def capture(*_a, **_k):
        for name, p in learner.model.named_parameters():
            grads[name] = p.grad.detach().clone()

    learner.optimizer.step = capture  # type: ignore[method-assign]
    parts = learner.step(ids)
    return grads, parts


@pytest.mark.parametrize("teacher", [False, True])
def test_slices_match_the_whole_batch(tmp_path, monkeypatch, teacher):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = gpt2_config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "init")
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "teacher")
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))

    whole = _learner(tmp_path, monkeypatch, teacher)
    assert whole.micro_rows(ids) == 8
    g_whole, p_whole = _grads_and_parts(whole, ids)

    monkeypatch.setattr(loop, "MAX_LOGITS", 3 * 16 * 64)  # slices of 3, 3 and 2 rows
    sliced = _learner(tmp_path, monkeypatch, teacher)
    assert sliced.micro_rows(ids) == 3
    g_sliced, p_sliced = _grads_and_parts(sliced, ids)

    assert p_whole.keys() == p_sliced.keys()
    for key in p_whole:
        assert p_sliced[key] == pytest.approx(p_whole[key], rel=1e-5)
    for name, g in g_whole.items():
        torch.testing.assert_close(g_sliced[name], g, rtol=1e-4, atol=1e-6)
