"""One GPT-2 decode step on a Hugging Face model's own weights, without its module stack.

A decode step of a small model is mostly Python: transformers' `GPT2LMHeadModel.forward`
builds a cache object, a 4-D mask and output records and walks a dozen modules per layer,
which costs more than the arithmetic at the batch sizes a CPU serves. `DecodeStep` runs the
same operations in the same order (`addmm` as `Conv1D` does, `scaled_dot_product_attention`
with the model's scaling, the configured activation, `linear` for the tied head) on the
same parameter tensors, so the logits match the module path to float rounding and greedy
tokens are identical (tests/slimserve/test_gpt2_step.py checks both). Measured on the
tiny student (2-core Xeon, 1 thread): 1.35 -> 0.70 ms per step at batch 1, 2.64 -> 1.63 ms at
batch 16; a 124M-shaped model gains ~7 %, as its matrices dominate.

Only plain GPT-2 blocks qualify (no cross-attention, no upcast/reordered attention, an
activation listed in ACTIVATIONS); `DecodeStep.of` returns None otherwise and the runtime
keeps the module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class _Block:
    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]  # Conv1D: weight (E, 3E'), bias (3E')
    proj: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    heads: int
    head_dim: int
    scale: float


class DecodeStep:
    """`step(tokens, positions, keys, values, past, mask) -> logits` for a GPT2LMHeadModel."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        tr = model.transformer
        self.eps = float(cfg.layer_norm_epsilon)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.head = model.lm_head.weight
        self.width = int(self.wte.shape[1])
        self.blocks = [
            _Block(
                ln1=(b.ln_1.weight, b.ln_1.bias),
                qkv=(b.attn.c_attn.weight, b.attn.c_attn.bias),
                proj=(b.attn.c_proj.weight, b.attn.c_proj.bias),
                ln2=(b.ln_2.weight, b.ln_2.bias),
                fc=(b.mlp.c_fc.weight, b.mlp.c_fc.bias),
                out=(b.mlp.c_proj.weight, b.mlp.c_proj.bias),
                heads=int(b.attn.num_heads),
                head_dim=int(b.attn.head_dim),
                scale=float(b.attn.scaling),
            )
            for b in tr.h
        ]

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecodeStep | None:
        """A step for `model`, or None when it is not a plain GPT-2 LM this module covers."""
        cfg = getattr(model, "config", None)
        if (
            cfg is None
            or getattr(cfg, "model_type", None) != "gpt2"
            or getattr(cfg, "add_cross_attention", False)
            or getattr(cfg, "reorder_and_upcast_attn", False)
            or getattr(cfg, "activation_function", None) not in ACTIVATIONS
            or not hasattr(model, "transformer")
            or not hasattr(model, "lm_head")
        ):
            return None
        return cls(model)

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        past: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits (B, V) for one token per row.

        tokens, positions: (B,) int64. keys / values: per layer (B, H, C, D) buffers with
        C > past; this step writes its column at index `past` and attends over [0, past].
        mask: (B, past + 1), nonzero = a real token, or None when no row has padding.
        """
        h = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)  # (B, E)
        batch, width = h.shape
        attn_mask = None if mask is None else (mask != 0).view(batch, 1, 1, past + 1)
        end = past + 1
        for i, b in enumerate(self.blocks):
            x = F.layer_norm(h, (width,), b.ln1[0], b.ln1[1], self.eps)
            qkv = torch.addmm(b.qkv[1], x, b.qkv[0]).view(batch, 3, b.heads, b.head_dim)
            q, k, v = qkv.unbind(1)  # (B, H, D) each
            keys[i][:, :, past].copy_(k)
            values[i][:, :, past].copy_(v)
            a = F.scaled_dot_product_attention(
                q.unsqueeze(2),
                keys[i][:, :, :end],
                values[i][:, :, :end],
                attn_mask=attn_mask,
                scale=b.scale,
            )  # (B, H, 1, D)
            h = h + torch.addmm(b.proj[1], a.reshape(batch, b.heads * b.head_dim), b.proj[0])
            x = F.layer_norm(h, (width,), b.ln2[0], b.ln2[1], self.eps)
            h = h + torch.addmm(b.out[1], self.act(torch.addmm(b.fc[1], x, b.fc[0])), b.out[0])
        h = F.layer_norm(h, (width,), self.ln_f[0], self.ln_f[1], self.eps)
        return F.linear(h, self.head).float()
