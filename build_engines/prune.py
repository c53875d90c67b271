"""prune-l1: L1 unstructured pruning of every block weight, optional masked KD recovery.

Which weights: every `Conv1D` *and* `nn.Linear` weight inside `transformer.h` (in GPT-2 these
are the Conv1Ds `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, stored (in, out)).
Pruning "every nn.Linear" alone, as the older project did, would prune only `lm_head`, which is
tied to `transformer.wte`: its zeros would land in the token embedding. So the
tied embedding / head is left alone unless `include_embeddings` asks for it; it is then pruned
once, as `transformer.wte.weight` (and `lm_head.weight` too when a config unties them).
Biases, LayerNorms and the position table `wpe` are never pruned.

How: `torch.nn.utils.prune` (`global_unstructured` ranks |w| over all the pruned weights
together, `l1_unstructured` per weight); both zero exactly `round(amount · n)` entries (top-k
on |w|), then `prune.remove` makes the masks permanent, so the saved state dict holds plain
dense tensors (no `*_orig` / `*_mask` keys) that stock `from_pretrained` loads. Dense zeros
speed nothing up; this step measures what sparsity costs in quality, not speed.

Recovery (`recovery_tokens > 0`): the distill job (`training.loop`, KD from the teacher) with
`training.loop.zero_masks`, which re-applies the zero pattern after every optimiser step, so
pruned weights stay exactly zero; the step checks that on the result.

The helpers the structured step and the sweep share (parent checks, evaluation on the test
blocks, the recovery job) live here too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.evaluate import TOP1_FILE, score_blocks
from slimserve.runner import StepContext, StepResult
from slimserve.steps import Budget, DistillParams, PruneL1Params
from slimserve.tokenizer import copy_tokenizer_files

KD_DEFAULTS = DistillParams()  # temperature 2, alpha_kd = alpha_lm = 0.5 (DistilGPT2 recipe)


# ---------------------------------------------------------------- shared by the pruning steps


def check_parent(ctx: StepContext) -> Path:
    """The parent's folder, after checking it is a built PyTorch artifact (one clear error)."""
    if ctx.parent_dir is None:
        raise ValueError(f"{ctx.variant}: pruning needs a parent variant ('from')")
    manifest = read_manifest(ctx.parent_dir)  # ArtifactError: not built / interrupted / corrupt
    if manifest.runtime != "torch":
        raise ArtifactError(
            f"{ctx.parent_dir}: pruning needs a PyTorch parent, got runtime {manifest.runtime!r}"
        )
    return ctx.parent_dir


def load_gpt2(folder: Path) -> GPT2LMHeadModel:
    """A GPT-2 folder in float32, eval mode (what every pruning computation starts from)."""
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    if model.config.model_type != "gpt2":
        raise ArtifactError(f"{folder}: pruning needs a GPT-2 model, got {model.config.model_type}")
    return model.eval()


class ModelScorer:
    """The `Runtime.score` slice `score_blocks` needs, over an in-memory model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits  # (B, T, V)


def eval_blocks(ctx: StepContext) -> torch.Tensor:
    """The evaluation blocks (N, T) the runner scores every variant on."""
    return ctx.data.blocks("test", ctx.profile.block_size, ctx.profile.eval.max_tokens)


def teacher_top1(teacher_dir: Path | None, blocks: torch.Tensor, batch: int) -> np.ndarray | None:
    """The teacher's top-1 predictions (N, T-1): its evaluation cache, else computed."""
    if teacher_dir is None or not (teacher_dir / "config.json").is_file():
        return None
    cached = teacher_dir / TOP1_FILE
    want = (blocks.shape[0], blocks.shape[1] - 1)
    if cached.is_file() and np.load(cached).shape == want:
        return np.load(cached)
    return score_blocks(ModelScorer(load_gpt2(teacher_dir)), blocks, batch)[1]


def measure(
    model: nn.Module, blocks: torch.Tensor, batch: int, ref_top1: np.ndarray | None
) -> dict[str, float | None]:
    """Test perplexity and top-1 agreement with the teacher, as `slimserve.evaluate` computes."""
    nll, top1 = score_blocks(ModelScorer(model), blocks, batch)
    agreement = None if ref_top1 is None else round(float((top1 == ref_top1).mean()), 4)
    return {"perplexity": round(math.exp(nll), 4), "agreement": agreement}


def recover(
    ctx: StepContext,
    init_dir: Path,
    tokens: int,
    budget: Budget | None,
    *,
    keep_zeros: bool,
) -> tuple[Path, dict[str, Any]]:
    """KD fine-tune of `init_dir` from the teacher with the distill job; (model folder, facts).

    `budget` is the optimiser (its `tokens` replaced by `tokens`); `keep_zeros` adds the mask
    hook so zeros stay zero. Checkpoints live in the step's checkpoint folder (resumable).
    """
    from training.loop import zero_masks
    from training.trainer import ensure_ray, job_for, plan_workers, run_job, training_details

    teacher = ctx.teacher_dir
    if teacher is None:
        raise ValueError(f"{ctx.variant}: recovery needs the profile's teacher")
    read_manifest(teacher)  # a clear error when the teacher is not built
    b = (budget or Budget()).model_copy(update={"tokens": tokens})
    ensure_ray()
    plan = plan_workers(ctx.profile.training, b.workers)
    job = job_for(
        dataclasses.replace(ctx, params=b),
        str(init_dir.resolve()),
        plan,
        f"{ctx.variant}-recovery",
        teacher_dir=str(teacher.resolve()),
        temperature=KD_DEFAULTS.temperature,
        alpha_kd=KD_DEFAULTS.alpha_kd,
        alpha_lm=KD_DEFAULTS.alpha_lm,
        mask_fn=zero_masks if keep_zeros else None,
    )
    outcome = run_job(job, ctx.checkpoint_dir, "recovery", plan, ctx.log)
    facts = training_details(outcome, plan)
    facts.update(lr=b.lr, batch_size=b.batch_size, teacher=teacher.name, masked=keep_zeros)
    return outcome.model_dir, facts


def write_model(model: GPT2LMHeadModel, folder: Path, tokenizer_src: Path) -> None:
    """`save_pretrained` plus the tokenizer files: a self-contained, loadable folder."""
    model.save_pretrained(folder)
    copy_tokenizer_files(tokenizer_src, folder)


# ---------------------------------------------------------------- L1 unstructured pruning


def prunable_weights(model: GPT2LMHeadModel, include_embeddings: bool) -> dict[str, nn.Module]:
    """{parameter name: module owning `.weight`} of what L1 pruning touches (see module doc)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.transformer.h.named_modules(prefix="transformer.h"):
        if isinstance(module, Conv1D | nn.Linear):
            out[f"{name}.weight"] = module
    if include_embeddings:
        out["transformer.wte.weight"] = model.transformer.wte
        if model.lm_head.weight is not model.transformer.wte.weight:  # untied: prune both
            out["lm_head.weight"] = model.lm_head
    return out


def weight_sparsity(model: nn.Module, names: list[str]) -> tuple[dict[str, float], float]:
    """Measured fraction of exact zeros per named weight, and over all of them together."""
    params = dict(model.named_parameters(remove_duplicate=False))
    per, zeros, total = {}, 0, 0
    for name in names:
        w = params[name].detach()
        z = int((w == 0).sum())
        per[name] = round(z / w.numel(), 6)
        zeros, total = zeros + z, total + w.numel()
    return per, round(zeros / max(total, 1), 6)


def l1_prune(
    model: GPT2LMHeadModel, amount: float, scope: str = "global", include_embeddings: bool = False
) -> list[str]:
    """Zero the `amount` smallest-|w| entries, globally or per weight; returns the names pruned.

    Masks are made permanent in place (plain tensors afterwards). The tied head shares the
    embedding's Parameter object, and `prune.remove` writes the pruned values into that same
    object, so a pruned embedding and its head stay one tensor.
    """
    if not 0 < amount < 1:
        raise ValueError(f"amount must be in (0, 1), got {amount}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    targets = prunable_weights(model, include_embeddings)
    pairs = [(module, "weight") for module in targets.values()]
    if scope == "global":
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, attr in pairs:
            prune.l1_unstructured(module, attr, amount=amount)
    for module, attr in pairs:
        prune.remove(module, attr)
    return list(targets)


def run_l1(ctx: StepContext) -> StepResult:
    """The `prune-l1` step: prune the parent, optionally recover, record measured sparsity."""
    params = ctx.params
    assert isinstance(params, PruneL1Params)
    parent_dir = check_parent(ctx)
    model = load_gpt2(parent_dir)
    wte_before = model.transformer.wte.weight.detach().clone()
    names = l1_prune(model, params.amount, params.scope, params.include_embeddings)
    if not params.include_embeddings and not torch.equal(model.transformer.wte.weight, wte_before):
        raise RuntimeError(f"{ctx.variant}: the tied embedding changed")  # checked, not assumed
    _, total = weight_sparsity(model, names)
    ctx.log(
        f"{ctx.variant}: L1 {params.scope} pruning of {len(names)} weights, "
        f"target {params.amount:.3f}, measured {total:.4f}"
    )
    metrics: dict[str, Any] = {"parent_perplexity": read_manifest(parent_dir).metrics.perplexity}
    details: dict[str, Any] = {
        "amount": params.amount,
        "scope": params.scope,
        "include_embeddings": params.include_embeddings,
        "pruned_weights": len(names),
    }
    if params.recovery_tokens > 0:
        blocks = eval_blocks(ctx)
        before = measure(model, blocks, ctx.profile.eval.batch_size, None)
        metrics["pruned_perplexity"] = before["perplexity"]  # after pruning, before recovery
        ctx.log(f"{ctx.variant}: perplexity before recovery {before['perplexity']:.2f}")
        init = ctx.checkpoint_dir / "pruned"
        if not (init / "config.json").is_file():
            model.save_pretrained(init)
        final_dir, details["recovery"] = recover(
            ctx, init, params.recovery_tokens, params.recovery, keep_zeros=True
        )
        model = load_gpt2(final_dir)
        pruned = dict(load_gpt2(init).named_parameters(remove_duplicate=False))
        after = dict(model.named_parameters(remove_duplicate=False))
        moved = [n for n in names if bool((after[n][pruned[n] == 0] != 0).any())]
        if moved:
            raise RuntimeError(f"{ctx.variant}: recovery made pruned weights non-zero: {moved}")
    write_model(model, ctx.out_dir, ctx.data.tokenizer_dir)
    # Measured on what was written (reloaded with stock from_pretrained), not on the plan.
    per, total = weight_sparsity(load_gpt2(ctx.out_dir), names)
    details["sparsity_per_layer"] = per
    details["sparsity"] = total
    metrics["sparsity"] = total
    return StepResult(details=details, metrics=metrics)
