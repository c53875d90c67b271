"""prune-structured: a smaller *stock* GPT-2 (fewer MLP neurons, heads + width, or layers).

GPT-2 ties attention width to `n_embd` (`head_dim = n_embd // n_head`, `c_attn` is
Conv1D(3·n_embd, n_embd)), so heads cannot be dropped on their own and still load with
`from_pretrained`. What this step can remove, and how it is ranked:

* **MLP neurons** (always; `mlp_keep` of `n_inner`, the same count in every layer because the
  config has one `n_inner`, chosen per layer): columns of `mlp.c_fc` (n_embd, n_inner) and rows
  of `mlp.c_proj` (n_inner, n_embd). Score of neuron j, what it writes into the residual stream:
  `weight`:     ||W_fc[:, j]||₂ · ||W_proj[j, :]||₂
  `activation`: mean over calibration tokens of |a_j| · ||W_proj[j, :]||₂, a = GELU(x W_fc + b).
* **Width** (`heads_keep = k`, Minitron-style): keep k heads in every layer (head_dim unchanged)
  and set `n_embd = k · head_dim`, keeping that many residual channels everywhere: columns of
  `wte` / `wpe` (and so of the tied head), entries of every LayerNorm, rows or columns of every
  Conv1D. Head h of a layer is scored by what it writes into the residual stream:
  `weight`: ||W_v[:, h]||_F · ||W_o[h, :]||_F; `activation`: mean_t ||o_{t,h} W_o[h, :]||₂.
  A residual channel c is scored over the LayerNorms of the kept layers and `ln_f`:
  `weight`: Σ |γ_c|; `activation`: Σ mean_t |LN(x)_{t,c}| (Minitron's embedding-channel score).
  LayerNorm then normalises over fewer channels: an approximation the recovery repairs.
* **Depth** (`layers_keep`): whole blocks, kept in the given order.

Activation scores use `calibration_blocks` blocks of the *train* split (never the test split).
Then recovery: KD from the teacher with the distill job, capped at `recovery_tokens`.
The result is measured where it matters: parameters, perplexity before / after recovery, and
decode tokens/s against the parent at batch 1 and 8 in one process (`decode_speed`).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from build_engines.prune import (
    check_parent,
    eval_blocks,
    load_gpt2,
    measure,
    recover,
    write_model,
)
from slimserve.artifacts import read_manifest
from slimserve.data import DataBundle
from slimserve.runner import StepContext, StepResult
from slimserve.steps import PruneStructuredParams
from training.kd import non_embedding_params
from training.trainer import export_model


@dataclass
class Importance:
    """Scores of the parent's units; higher = more important. One entry per parent layer."""

    neurons: list[torch.Tensor]  # per layer: (n_inner,)
    heads: list[torch.Tensor]  # per layer: (n_head,)
    channels_ln: list[
        torch.Tensor
    ]  # per LayerNorm (ln_1, ln_2 of each layer, then ln_f): (n_embd,)


@dataclass
class SlimPlan:
    """What is kept, as indices into the parent (sorted ascending within a layer)."""

    layers: list[int]  # parent block indices, in the new order
    channels: torch.Tensor  # (n_embd',) residual channels
    heads: list[list[int]]  # per kept layer: parent head indices (k each)
    neurons: list[torch.Tensor]  # per kept layer: (n_inner',) parent neuron indices


def n_inner(config: GPT2Config) -> int:
    return config.n_inner if config.n_inner is not None else 4 * config.n_embd


def check_params(config: GPT2Config, p: PruneStructuredParams) -> None:
    """Refuse ratios that leave zero neurons, heads or layers, or remove nothing (names it)."""
    width = n_inner(config)
    if round(p.mlp_keep * width) < 1:
        raise ValueError(
            f"mlp_keep={p.mlp_keep} keeps {round(p.mlp_keep * width)} of the parent's {width} "
            f"MLP neurons (n_inner); at least one must remain"
        )
    if p.heads_keep is not None and p.heads_keep > config.n_head:
        raise ValueError(f"heads_keep={p.heads_keep}, but the parent has {config.n_head} heads")
    if p.layers_keep is not None:
        bad = [i for i in p.layers_keep if not 0 <= i < config.n_layer]
        if not p.layers_keep:
            raise ValueError("layers_keep=[] would leave zero layers")
        if bad or len(set(p.layers_keep)) != len(p.layers_keep):
            raise ValueError(
                f"layers_keep={p.layers_keep} must be distinct indices in [0, {config.n_layer})"
            )
        if config.scale_attn_by_inverse_layer_idx and p.layers_keep != list(
            range(len(p.layers_keep))
        ):
            raise ValueError("layers_keep: this parent scales attention by layer index")
    same_mlp = round(p.mlp_keep * width) == width
    same_heads = p.heads_keep in (None, config.n_head)
    same_layers = p.layers_keep in (None, list(range(config.n_layer)))
    if same_mlp and same_heads and same_layers:
        raise ValueError("mlp_keep=1 with no heads_keep / layers_keep removes nothing")


def weight_importance(model: GPT2LMHeadModel) -> Importance:
    """Scores from the weights alone (see the module docstring for the formulas)."""
    e, nh = model.config.n_embd, model.config.n_head
    neurons, heads, lns = [], [], []
    with torch.no_grad():
        for block in model.transformer.h:
            fc, proj = block.mlp.c_fc.weight, block.mlp.c_proj.weight  # (E, I), (I, E)
            neurons.append(fc.norm(dim=0) * proj.norm(dim=1))
            wv = block.attn.c_attn.weight[:, 2 * e :].reshape(e, nh, -1)  # (E, H, D)
            wo = block.attn.c_proj.weight.reshape(nh, -1, e)  # (H, D, E)
            heads.append(wv.pow(2).sum((0, 2)).sqrt() * wo.pow(2).sum((1, 2)).sqrt())
            lns += [block.ln_1.weight.abs(), block.ln_2.weight.abs()]
        lns.append(model.transformer.ln_f.weight.abs())
    return Importance(neurons, heads, [t.clone() for t in lns])


@torch.no_grad()
def activation_importance(model: GPT2LMHeadModel, blocks: torch.Tensor) -> Importance:
    """Scores from activations on calibration `blocks` (N, T), through forward hooks."""
    e, nh = model.config.n_embd, model.config.n_head
    layers = list(model.transformer.h)
    neurons = [torch.zeros(n_inner(model.config)) for _ in layers]
    heads = [torch.zeros(nh) for _ in layers]
    norms = [*(m for b in layers for m in (b.ln_1, b.ln_2)), model.transformer.ln_f]
    lns = [torch.zeros(e) for _ in norms]
    hooks = []

    def on_mlp(i: int):
        def hook(module, args):  # args[0]: (B, T, I), the activations entering mlp.c_proj
            neurons[i].add_(args[0].abs().sum((0, 1)))

        return hook

    def on_heads(i: int):
        def hook(module, args):  # args[0]: (B, T, H·D), head outputs entering attn.c_proj
            o = args[0].reshape(*args[0].shape[:2], nh, -1)  # (B, T, H, D)
            w = module.weight.reshape(nh, -1, e)  # (H, D, E)
            heads[i].add_(torch.einsum("bthd,hde->bthe", o, w).norm(dim=-1).sum((0, 1)))

        return hook

    def on_ln(i: int):
        def hook(module, args, out):  # out: (B, T, E)
            lns[i].add_(out.abs().sum((0, 1)))

        return hook

    for i, block in enumerate(layers):
        hooks.append(block.mlp.c_proj.register_forward_pre_hook(on_mlp(i)))
        hooks.append(block.attn.c_proj.register_forward_pre_hook(on_heads(i)))
    hooks += [ln.register_forward_hook(on_ln(i)) for i, ln in enumerate(norms)]
    try:
        model.eval()
        for start in range(0, len(blocks), 8):
            model(input_ids=blocks[start : start + 8])
    finally:
        for h in hooks:
            h.remove()
    tokens = blocks.numel()
    for i, block in enumerate(layers):
        neurons[i] = neurons[i] / tokens * block.mlp.c_proj.weight.norm(dim=1)
        heads[i] = heads[i] / tokens
    return Importance(neurons, heads, [t / tokens for t in lns])


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ascending (keeps the parent's order)."""
    return torch.topk(scores, k).indices.sort().values


def make_plan(config: GPT2Config, p: PruneStructuredParams, imp: Importance) -> SlimPlan:
    """Choose what to keep from the scores and the ratios (`check_params` first)."""
    check_params(config, p)
    layers = list(p.layers_keep) if p.layers_keep is not None else list(range(config.n_layer))
    d = config.n_embd // config.n_head
    k = p.heads_keep or config.n_head
    if k == config.n_head:
        channels = torch.arange(config.n_embd)
        heads = [list(range(config.n_head)) for _ in layers]
    else:
        used = [imp.channels_ln[2 * i + j] for i in layers for j in (0, 1)]
        channels = _top(torch.stack([*used, imp.channels_ln[-1]]).sum(0), k * d)
        heads = [_top(imp.heads[i], k).tolist() for i in layers]
    keep = round(p.mlp_keep * n_inner(config))
    neurons = [_top(imp.neurons[i], keep) for i in layers]
    return SlimPlan(layers, channels, heads, neurons)


def apply_plan(model: GPT2LMHeadModel, plan: SlimPlan) -> GPT2LMHeadModel:
    """A new stock GPT-2 holding the kept slices of `model` (which is not modified)."""
    cfg = model.config
    e, d = cfg.n_embd, cfg.n_embd // cfg.n_head
    ch = plan.channels
    if len({len(h) for h in plan.heads}) != 1 or len({len(n) for n in plan.neurons}) != 1:
        raise ValueError("a GPT-2 config has one n_head and one n_inner: keep as many per layer")
    if len(ch) != len(plan.heads[0]) * d:
        k = len(plan.heads[0])
        raise ValueError(f"n_embd must be heads × head_dim: {len(ch)} != {k} × {d}")
    src = {k: v.detach() for k, v in model.state_dict().items()}
    config = copy.deepcopy(cfg)
    config.n_layer, config.n_embd = len(plan.layers), len(ch)
    config.n_head, config.n_inner = len(plan.heads[0]), len(plan.neurons[0])
    new: dict[str, torch.Tensor] = {
        "transformer.wte.weight": src["transformer.wte.weight"][:, ch],  # (V, E')
        "transformer.wpe.weight": src["transformer.wpe.weight"][:, ch],  # (P, E')
        "transformer.ln_f.weight": src["transformer.ln_f.weight"][ch],
        "transformer.ln_f.bias": src["transformer.ln_f.bias"][ch],
    }
    tied = model.lm_head.weight is model.transformer.wte.weight
    new["lm_head.weight"] = new["transformer.wte.weight"] if tied else src["lm_head.weight"][:, ch]
    for i, layer in enumerate(plan.layers):
        s, t = f"transformer.h.{layer}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            new[t + ln + ".weight"] = src[s + ln + ".weight"][ch]
            new[t + ln + ".bias"] = src[s + ln + ".bias"][ch]
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in plan.heads[i]])  # (k·D,)
        qkv = torch.cat([cols, cols + e, cols + 2 * e])  # q, k, v blocks of c_attn's output
        new[t + "attn.c_attn.weight"] = src[s + "attn.c_attn.weight"][ch][:, qkv]  # (E', 3E')
        new[t + "attn.c_attn.bias"] = src[s + "attn.c_attn.bias"][qkv]
        new[t + "attn.c_proj.weight"] = src[s + "attn.c_proj.weight"][cols][:, ch]  # (E', E')
        new[t + "attn.c_proj.bias"] = src[s + "attn.c_proj.bias"][ch]
        nrn = plan.neurons[i]
        new[t + "mlp.c_fc.weight"] = src[s + "mlp.c_fc.weight"][ch][:, nrn]  # (E', I')
        new[t + "mlp.c_fc.bias"] = src[s + "mlp.c_fc.bias"][nrn]
        new[t + "mlp.c_proj.weight"] = src[s + "mlp.c_proj.weight"][nrn][:, ch]  # (I', E')
        new[t + "mlp.c_proj.bias"] = src[s + "mlp.c_proj.bias"][ch]
    slim = GPT2LMHeadModel(config)
    slim.load_state_dict({k: v.clone().contiguous() for k, v in new.items()}, strict=True)
    if tied:
        slim.tie_weights()
    return slim.to(model.dtype).eval()


def calibration_blocks(data: DataBundle, block_size: int, n: int) -> torch.Tensor:
    """`n` train blocks (n, T), evenly spaced over the split (deterministic, never test data)."""
    train = data.blocks("train", block_size)
    return train[torch.linspace(0, len(train) - 1, min(n, len(train))).long()]


def structured_prune(
    model: GPT2LMHeadModel, p: PruneStructuredParams, calibration: torch.Tensor | None
) -> tuple[GPT2LMHeadModel, SlimPlan]:
    """Score, plan and slice; `calibration` (N, T) is needed for `importance: activation`."""
    check_params(model.config, p)
    if p.importance == "activation":
        if calibration is None:
            raise ValueError("importance=activation needs calibration blocks")
        imp = activation_importance(model, calibration)
    else:
        imp = weight_importance(model)
    plan = make_plan(model.config, p, imp)
    return apply_plan(model, plan), plan


def decode_speed(
    folders: dict[str, Path],
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 5,
    steps: int = 32,
    prompt_tokens: int = 16,
    threads: int = 1,
) -> dict[str, Any]:
    """Median greedy-decode tokens/s of each folder at each batch size, in this one process.

    Each run prefills `prompt_tokens` per row (untimed) and times `steps` decode steps through
    the torch runtime (`slimserve.runtimes`): tokens/s = batch · steps / seconds. Runs are
    interleaved (every repeat times every model once) after one untimed warm-up, so load drift
    on a shared machine hits all models alike. `threads` is set for the whole measurement (one
    by default: on a few shared cores, OpenMP threads of a tiny model mostly wait for each
    other) and restored afterwards.

    Two clocks: `batch_N` is wall-clock (what a caller waits), `cpu_batch_N` divides by the
    CPU time of the decoding thread (`time.thread_time`; with one torch thread every kernel
    runs on it). On an idle core they agree; on an oversubscribed machine wall-clock mostly
    measures the scheduler, and the CPU-time figure is the model's own cost.
    Returns {name: {"batch_1", "batch_8", "cpu_batch_1", "cpu_batch_8"}, "threads", ...}.
    """
    from slimserve.runtimes import load

    before = torch.get_num_threads()
    clocks = {"": time.perf_counter, "cpu_": time.thread_time}
    rates: dict[str, dict[str, list[float]]] = {
        k: {f"{c}batch_{b}": [] for c in clocks for b in batches} for k in folders
    }
    try:
        runtimes = {
            k: load(f, device="cpu", dtype="float32", threads=threads) for k, f in folders.items()
        }
        for rep in range(repeats + 1):
            for b in batches:
                for name, rt in runtimes.items():
                    vocab = rt.info.vocab_size
                    prompt = [[(7 * i + r) % vocab for i in range(prompt_tokens)] for r in range(b)]
                    logits, state = rt.prefill(prompt)
                    start = {c: clock() for c, clock in clocks.items()}
                    for _ in range(steps):
                        logits, state = rt.decode(logits.argmax(-1), state)
                    for c, clock in clocks.items():
                        if rep:  # repeat 0 is the warm-up
                            rates[name][f"{c}batch_{b}"].append(b * steps / (clock() - start[c]))
    finally:
        torch.set_num_threads(before)
    out: dict[str, Any] = {
        name: {k: round(statistics.median(v), 1) for k, v in r.items()} for name, r in rates.items()
    }
    out.update(threads=threads, repeats=repeats, steps=steps, prompt_tokens=prompt_tokens)
    return out


def run(ctx: StepContext) -> StepResult:
    """The `prune-structured` step: slice the parent, recover with KD, measure size and speed."""
    p = ctx.params
    assert isinstance(p, PruneStructuredParams)
    parent_dir = check_parent(ctx)
    parent = load_gpt2(parent_dir)
    check_params(parent.config, p)  # before any work: one clear error naming the param
    calib = None
    if p.importance == "activation":
        calib = calibration_blocks(ctx.data, ctx.profile.block_size, p.calibration_blocks)
    slim, plan = structured_prune(parent, p, calib)
    c = slim.config
    ctx.log(
        f"{ctx.variant}: layers {plan.layers}, n_head {parent.config.n_head}->{c.n_head}, "
        f"n_embd {parent.config.n_embd}->{c.n_embd}, n_inner {n_inner(parent.config)}->{c.n_inner} "
        f"({non_embedding_params(slim):,} vs {non_embedding_params(parent):,} non-embedding params)"
    )
    metrics: dict[str, Any] = {"parent_perplexity": read_manifest(parent_dir).metrics.perplexity}
    details: dict[str, Any] = {
        "importance": p.importance,
        "layers": plan.layers,
        "heads": plan.heads if c.n_head != parent.config.n_head else "all",
        "shape": {k: getattr(c, k) for k in ("n_layer", "n_head", "n_embd", "n_inner")},
        "parent_shape": {
            "n_layer": parent.config.n_layer,
            "n_head": parent.config.n_head,
            "n_embd": parent.config.n_embd,
            "n_inner": n_inner(parent.config),
        },
        "params": sum(t.numel() for t in slim.parameters()),
        "parent_params": sum(t.numel() for t in parent.parameters()),
        "non_embedding_params": non_embedding_params(slim),
        "parent_non_embedding_params": non_embedding_params(parent),
    }
    if p.recovery_tokens > 0:
        before = measure(slim, eval_blocks(ctx), ctx.profile.eval.batch_size, None)
        metrics["pruned_perplexity"] = before["perplexity"]  # sliced, before recovery
        ctx.log(f"{ctx.variant}: perplexity before recovery {before['perplexity']:.2f}")
        init = ctx.checkpoint_dir / "sliced"
        if not (init / "config.json").is_file():
            slim.save_pretrained(init)
        final_dir, details["recovery"] = recover(
            ctx, init, p.recovery_tokens, p.recovery, keep_zeros=False
        )
        export_model(final_dir, ctx)
    else:
        write_model(slim, ctx.out_dir, ctx.data.tokenizer_dir)
    speed = decode_speed({"parent": parent_dir, "slim": ctx.out_dir})
    for b in ("batch_1", "batch_8", "cpu_batch_1", "cpu_batch_8"):
        metrics[f"decode_speedup_{b}"] = round(speed["slim"][b] / speed["parent"][b], 3)
    details["decode_tokens_per_s"] = speed
    for clock in ("", "cpu_"):
        ctx.log(
            f"{ctx.variant}: decode tokens/s ({clock or 'wall_'}clock) batch 1 "
            f"{speed['parent'][clock + 'batch_1']} -> {speed['slim'][clock + 'batch_1']}, batch 8 "
            f"{speed['parent'][clock + 'batch_8']} -> {speed['slim'][clock + 'batch_8']} "
            f"(median of {speed['repeats']}, {speed['threads']} thread)"
        )
    return StepResult(details=details, metrics=metrics)
