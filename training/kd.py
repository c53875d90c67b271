"""Knowledge distillation pieces as pure functions: the KD loss and the student initialisation.

The loss is DistilGPT2's: `alpha_kd · T² · KL(softmax(t/T) ‖ softmax(s/T)) +
alpha_lm · CE(s, labels)`. The T² factor keeps the soft-target gradients on the same scale as
the hard-target ones when T changes (Hinton et al., 2015).

The student is the teacher with every other block removed: block i of the student is a copy of
teacher block `layers[i]`; token and position embeddings, the final LayerNorm and the (tied)
head are copied as they are, so the student starts close to the teacher's function.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel

EMBEDDING_PREFIXES = ("transformer.wte.", "transformer.wpe.", "lm_head.")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 2.0,
    alpha_kd: float = 0.5,
    alpha_lm: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The combined loss over N predicted positions, and its parts (as floats, for logging).

    student_logits, teacher_logits: (N, V); targets: (N,) token ids. Both terms are means over
    the N positions (KL summed over the vocabulary, then averaged over positions). With
    `teacher_logits=None` (or `alpha_kd == 0`) the loss is `alpha_lm · CE`.
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, targets)
    parts = {"ce": float(ce.detach())}
    loss = alpha_lm * ce
    if teacher_logits is not None and alpha_kd > 0:
        t = temperature
        log_p_s = F.log_softmax(s / t, dim=-1)  # (N, V)
        log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)  # (N, V)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        parts["kl"] = float(kl.detach())
        loss = loss + alpha_kd * t * t * kl
    parts["loss"] = float(loss.detach())
    return loss, parts


def default_layers(n_layer: int) -> list[int]:
    """Every other teacher block, starting with the first: [0, 2, 4, ...]."""
    return list(range(0, n_layer, 2))


def init_student(teacher: GPT2LMHeadModel, layers: list[int]) -> GPT2LMHeadModel:
    """A GPT-2 with `len(layers)` blocks; block i is a copy of teacher block `layers[i]`.

    Embeddings (wte, wpe), the final LayerNorm and the tied head are copied too. The teacher is
    not modified; the student shares no tensor with it and is in the teacher's train/eval mode.
    """
    n = teacher.config.n_layer
    bad = [i for i in layers if not 0 <= i < n]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} must be distinct indices in [0, {n}) (teacher has {n})")
    config = copy.deepcopy(teacher.config)
    config.n_layer = len(layers)
    student = GPT2LMHeadModel(config)
    src = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            state[key] = src[f"transformer.h.{layers[int(i)]}.{rest}"].clone()
        else:
            state[key] = src[key].clone()
    student.load_state_dict(state)
    student.tie_weights()
    return student.to(dtype=teacher.dtype).train(teacher.training)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token / position embeddings and the head (tied ones counted once).

    The figure the "fewer parameters" claims use: embeddings are a lookup, not compute per token.
    """
    return sum(
        p.numel()
        for name, p in model.named_parameters()  # tied tensors once, under their first name
        if not name.startswith(EMBEDDING_PREFIXES)
    )
