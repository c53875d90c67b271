"""The CPU decode graph of an ONNX export: a GPT-2 that returns only its new key/value columns.

The standard graph (`build_engines.onnx_export`) takes the past cache (B, H, P, D) and returns
the grown one (B, H, P + T, D): every step concatenates, i.e. copies, the whole cache of every
layer, which was ~15-20 % of a batch-16 decode step of the tiny student on ONNX Runtime's CPU
provider. This graph takes the past as the runtime's preallocated buffer (B, H, C, D), of which
only the columns `attention_mask` marks are real (the rest are zeros), attends over the past
and the new columns apart (scores `[q·pastᵀ, q·newᵀ]`, one softmax, then
`p_past·past_v + p_new·new_v`), and returns just the new columns (B, H, T, D), which the
runtime writes into its buffer (`slimserve.runtimes.onnx_rt`). Nothing is copied per step.

Inputs, in order (the standard graph's names): `input_ids` (B, T), `attention_mask` (B, C + T),
`position_ids` (B, T), `past_key_values.{i}.key` / `.value` (B, H, C, D), and the optional
`logits_to_keep` (`onnx_graph.add_logits_to_keep`). Outputs: `logits` (B, T, V) and
`new.{i}.key` / `.value` (B, H, T, D). Query t may attend to every unmasked past column and
to new columns 0..t (causal), so prefill is the same graph with C = 0.

It is written from the model's weights with plain tensor operations (the same ones, in the
same order, as `slimserve.runtimes.gpt2_step`), not traced through transformers' modules: its
mask building (Range, Expand, GatherND, ...) was a further ~5 % of a step. Every Linear is a
2-D Gemm with its bias. The tied embedding is the standard graph's own (E, V) matrix, so the
folder's one weights file serves both graphs (`onnx_graph.share_weights`): the head is a MatMul
on it, and the lookup gathers rows of its Transpose, which ONNX Runtime folds into a (V, E)
table once at load (a gather along axis 1 of (E, V), as the standard graph does it for the
int8 quantizer's sake, was ~6 % of a step). Only plain GPT-2 blocks qualify
(`DecodeStep.of`); the exporter writes no such graph for others. TensorRT and ONNX Runtime's
CUDA path keep the standard graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from build_engines.onnx_graph import (
    OnnxCheckError,
    add_logits_to_keep,
    check_onnx,
    quiet_export,
    write_sidecar,
)
from build_engines.parity import ParityError, check_parity
from slimserve.runtimes import onnx_rt
from slimserve.runtimes.gpt2_step import DecodeStep
from slimserve.runtimes.onnx_rt import append_output_names, io_names

APPEND_FILE = "model.append.onnx"


class AppendKVLM(nn.Module):
    """GPT-2 over a preallocated past: see the module docstring for inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        step = DecodeStep.of(model)
        if step is None:
            raise ValueError("the append graph needs a plain GPT-2 LM (gpt2_step.DecodeStep.of)")
        self.eps = step.eps
        self.heads = [b.heads for b in step.blocks]
        self.head_dims = [b.head_dim for b in step.blocks]
        self.scales = [b.scale for b in step.blocks]
        # The same (E, V) matrices as the standard graph (`onnx_export.KVCacheLM`), so the two
        # graphs share their bytes in the folder's weights file: the head is a MatMul on it,
        # and the lookup gathers rows of its transpose, which ONNX Runtime folds into a (V, E)
        # table once at load (a gather along axis 1 of (E, V) was ~6 % of a step).
        self.embed_t = _frozen(step.wte.t())
        tied = step.head.data_ptr() == step.wte.data_ptr()
        self.head_t = self.embed_t if tied else _frozen(step.head.t())
        self.wpe = _frozen(step.wpe)
        self.ln_f = nn.ParameterList([_frozen(t) for t in step.ln_f])
        self.blocks = nn.ModuleList()
        for b, layer in zip(step.blocks, model.transformer.h, strict=True):
            blk = nn.Module()
            for name in ("ln1", "qkv", "proj", "ln2", "fc", "out"):
                setattr(blk, name, nn.ParameterList([_frozen(t) for t in getattr(b, name)]))
            blk.act = layer.mlp.act  # the model's own activation module, traced as written
            self.blocks.append(blk)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        b, t = input_ids.shape
        width = self.embed_t.shape[0]
        ids, positions = input_ids.reshape(-1), position_ids.reshape(-1)
        wte = self.embed_t.t()  # (V, E): a Transpose of an initializer, folded at load
        h = wte.index_select(0, ids) + self.wpe.index_select(0, positions)  # (B * T, E)
        c = past[0].shape[2]
        # (B, 1, T, C + T): a past column counts where the mask says so; new column j from
        # query t only when j <= t.
        new = torch.arange(t, device=input_ids.device)
        causal = new.view(1, t) <= new.view(t, 1)  # (T, T), query by key
        allowed = torch.cat([torch.ones(t, c, dtype=torch.bool, device=h.device), causal], 1)
        allowed = allowed.view(1, 1, t, c + t) & (attention_mask != 0).view(b, 1, 1, c + t)
        floor = torch.finfo(h.dtype).min
        present = []
        for i, blk in enumerate(self.blocks):
            heads, dim = self.heads[i], self.head_dims[i]
            x = nn.functional.layer_norm(h, (width,), blk.ln1[0], blk.ln1[1], self.eps)
            qkv = torch.addmm(blk.qkv[1], x, blk.qkv[0])
            q, k, v = qkv.view(b, t, 3, heads, dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
            pk, pv = past[2 * i], past[2 * i + 1]
            scores = torch.cat([q @ pk.transpose(2, 3), q @ k.transpose(2, 3)], 3)
            scores = torch.where(allowed, scores * self.scales[i], floor)
            probs = scores.softmax(-1)
            a = probs[..., :c] @ pv + probs[..., c:] @ v  # (B, H, T, D)
            a = a.transpose(1, 2).reshape(b * t, heads * dim)
            h = h + torch.addmm(blk.proj[1], a, blk.proj[0])
            x = nn.functional.layer_norm(h, (width,), blk.ln2[0], blk.ln2[1], self.eps)
            hidden = blk.act(torch.addmm(blk.fc[1], x, blk.fc[0]))
            h = h + torch.addmm(blk.out[1], hidden, blk.out[0])
            present += [k, v]
        h = nn.functional.layer_norm(h, (width,), self.ln_f[0], self.ln_f[1], self.eps)
        logits = h.view(b, t, width) @ self.head_t
        return (logits, *present)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous().clone(), requires_grad=False)


def export_append_onnx(model: nn.Module, path: Path, opset: int = 18) -> None:
    """Export `model`'s append graph (build_engines.onnx_append) to `path`, with the
    `logits_to_keep` input; ValueError when the model is not a plain GPT-2."""
    wrapper = AppendKVLM(model).eval()
    cfg = model.config
    inputs, _ = io_names(cfg.n_layer)
    outputs = append_output_names(cfg.n_layer)
    quiet_export(wrapper, cfg, path, inputs, outputs, opset, "dynamo")
    add_logits_to_keep(path, cfg.n_positions)


def try_append(out_dir: Path, ref, args: tuple, opset: int, log) -> dict[str, Any]:
    """Write the append graph next to the standard one and name it in the sidecar, if it
    passes the checker and the same parity check; otherwise leave the folder as it was."""
    path = out_dir / APPEND_FILE
    meta = onnx_rt.read_sidecar(out_dir)
    try:
        export_append_onnx(ref.model, path, opset)
        check_onnx(path)
        write_sidecar(out_dir, {**meta, "append": APPEND_FILE})
        parity = check_parity(ref, onnx_rt.load(out_dir, device="cpu"), *args)
    except (ParityError, OnnxCheckError, RuntimeError, ValueError) as exc:
        write_sidecar(out_dir, meta)
        path.unlink(missing_ok=True)
        log(f"append graph not kept: {exc}")
        return {"reason": str(exc)}
    log(f"append graph kept: max |logit diff| {parity['max_abs_logit_diff']:.2e}")
    return {"kept": True, "file": APPEND_FILE, "parity": parity}
