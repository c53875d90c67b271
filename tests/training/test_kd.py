"""The KD loss against a hand computation, and the DistilGPT2-style student initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from slimserve.gpt2_config import gpt2_config
from training.kd import default_layers, init_student, kd_loss, non_embedding_params


def tiny_gpt2(n_layer: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = gpt2_config(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(config).eval()


def test_kd_loss_matches_hand_computation():
    # Two positions, vocabulary of three, T = 2.
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([2, 1])
    # Row 1: softmax(s/2) = (1, e^.5, e) / z and softmax(t/2) is its reverse, so
    # KL = (p_hi - p_lo) * ln(p_hi / p_lo) = (e - 1) / z * 1, with z = 1 + e^.5 + e.
    z = 1 + math.exp(0.5) + math.e
    kl1 = (math.e - 1) / z
    # Row 2: the student is uniform (1/3 each); the teacher is (1, e^.5, 1) / z2.
    z2 = 2 + math.exp(0.5)
    kl2 = 2 * (1 / z2) * math.log(3 / z2) + (math.exp(0.5) / z2) * math.log(3 * math.exp(0.5) / z2)
    # CE: -log softmax(s)[y]; row 1 = log(1 + e^-1 + e^-2), row 2 = log 3.
    ce = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    kl = (kl1 + kl2) / 2
    expected = 0.5 * 2.0**2 * kl + 0.5 * ce
    assert expected == pytest.approx(0.7268781312971987, abs=1e-12)  # the numbers above, once

    loss, parts = kd_loss(student, teacher, targets, temperature=2.0, alpha_kd=0.5, alpha_lm=0.5)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert parts["kl"] == pytest.approx(kl, abs=1e-6)
    assert parts["ce"] == pytest.approx(ce, abs=1e-6)


def test_kd_loss_weights_and_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    ce_only, _ = kd_loss(s, None, y, alpha_kd=0.5, alpha_lm=1.0)
    assert float(ce_only) == pytest.approx(float(torch.nn.functional.cross_entropy(s, y)))
    _, p1 = kd_loss(s, t, y, temperature=1.0, alpha_kd=1.0, alpha_lm=0.0)
    l4, p4 = kd_loss(s, t, y, temperature=4.0, alpha_kd=1.0, alpha_lm=0.0)
    assert float(l4) == pytest.approx(16 * p4["kl"], rel=1e-6)  # T² scaling
    assert p4["kl"] < p1["kl"]  # softer distributions are closer
    same, parts = kd_loss(s, s.clone(), y, alpha_kd=1.0, alpha_lm=0.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6) and float(same) == pytest.approx(0, abs=1e-5)


def test_kd_loss_gradient_flows_to_student_only():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    loss, _ = kd_loss(s, t, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("layers", [[0, 2], [1, 3], [0, 1, 3], [3]])
def test_student_layers_are_copies_of_teacher_layers(layers):
    teacher = tiny_gpt2()
    student = init_student(teacher, layers)
    assert student.config.n_layer == len(layers)
    ts, ss = teacher.state_dict(), student.state_dict()
    for i, k in enumerate(layers):
        block = {n: p for n, p in ss.items() if n.startswith(f"transformer.h.{i}.")}
        assert block
        for name, value in block.items():
            src = name.replace(f"transformer.h.{i}.", f"transformer.h.{k}.", 1)
            assert torch.equal(value, ts[src]), name
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert torch.equal(ss[name], ts[name])
    assert torch.equal(ss["transformer.ln_f.bias"], ts["transformer.ln_f.bias"])
    # The head stays tied to the student's own embedding, and nothing is shared with the teacher.
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()
    assert student.transformer.wte.weight.data_ptr() != teacher.transformer.wte.weight.data_ptr()


def test_student_computes_the_teacher_with_blocks_removed():
    teacher = tiny_gpt2()
    student = init_student(teacher, [0, 2])
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        got = student(input_ids=ids, use_cache=False).logits
        teacher.transformer.h = torch.nn.ModuleList(
            [teacher.transformer.h[0], teacher.transformer.h[2]]
        )
        teacher.config.n_layer = 2
        want = teacher(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want)


def test_student_is_independent_of_teacher():
    teacher = tiny_gpt2()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = init_student(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_default_layers_and_parameter_ratio():
    assert default_layers(4) == [0, 2]
    assert default_layers(12) == [0, 2, 4, 6, 8, 10]
    assert default_layers(5) == [0, 2, 4]
    teacher = tiny_gpt2(n_layer=4)
    student = init_student(teacher, default_layers(4))
    per_block = sum(p.numel() for p in teacher.transformer.h[0].parameters())
    ln_f = sum(p.numel() for p in teacher.transformer.ln_f.parameters())
    assert non_embedding_params(teacher) == 4 * per_block + ln_f
    assert non_embedding_params(student) == 2 * per_block + ln_f
    assert non_embedding_params(teacher) / non_embedding_params(student) >= 1.8


@pytest.mark.parametrize("layers", [[], [4], [-1], [1, 1]])
def test_bad_layers_are_rejected(layers):
    with pytest.raises(ValueError, match="layers"):
        init_student(tiny_gpt2(), layers)
