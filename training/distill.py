"""The `distill` step: a DistilGPT2-style student trained with KD from the teacher (Ray Train).

The student is the parent model with only the blocks `params.layers` kept (default every other
one), then trained on `alpha_kd · T² · KL + alpha_lm · CE` against the frozen teacher, which
runs forward-only inside each worker. The same job serves pruning recovery later (the parent
is then the pruned model; `training.loop.LoopConfig.mask_fn` keeps its zeros).

With `params.ce_only_baseline` the step also trains the *same* student (same initialisation,
data order, budget and optimiser) with cross-entropy only, and records its test perplexity as
`metrics.ce_only_perplexity`: the one difference between the two runs is the teacher's soft
targets, so comparing the two perplexities measures what distillation adds.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from slimserve.evaluate import score_blocks
from slimserve.runner import StepContext, StepResult
from slimserve.steps import DistillParams
from training.kd import default_layers, init_student, non_embedding_params
from training.trainer import (
    ensure_ray,
    export_model,
    job_for,
    plan_workers,
    run_job,
    training_details,
)


class _TorchScorer:
    """The `Runtime.score` slice `score_blocks` needs, over a plain transformers model."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.model = model.eval()

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits  # (B, T, V)


def heldout_perplexity(model_dir: Path, ctx: StepContext) -> float:
    """Test perplexity measured as `slimserve.evaluate` does (same blocks, same batching)."""
    blocks = ctx.data.blocks("test", ctx.profile.block_size, ctx.profile.eval.max_tokens)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    nll, _ = score_blocks(_TorchScorer(model), blocks, ctx.profile.eval.batch_size)
    return round(math.exp(nll), 4)


def run(ctx: StepContext) -> StepResult:
    params = ctx.params
    hf_logging.disable_progress_bar()  # one bar per load/save drowns the progress lines
    assert isinstance(params, DistillParams)
    if ctx.parent_dir is None:
        raise ValueError(f"{ctx.variant}: distill needs a parent (the model to shrink)")
    teacher_dir = ctx.teacher_dir or ctx.parent_dir
    parent = GPT2LMHeadModel.from_pretrained(ctx.parent_dir)
    layers = params.layers if params.layers is not None else default_layers(parent.config.n_layer)
    init = ctx.checkpoint_dir / "init"
    student = init_student(parent, layers)
    if not (init / "config.json").is_file():
        student.save_pretrained(init)
    teacher_ne, student_ne = non_embedding_params(parent), non_embedding_params(student)
    ctx.log(
        f"{ctx.variant}: student = parent blocks {layers} "
        f"({student_ne:,} vs {teacher_ne:,} non-embedding parameters, "
        f"{teacher_ne / student_ne:.2f}x fewer), teacher {teacher_dir.name}"
    )
    ensure_ray()
    plan = plan_workers(ctx.profile.training, params.workers)
    kd_job = job_for(
        ctx,
        str(init.resolve()),
        plan,
        ctx.variant,
        teacher_dir=str(teacher_dir.resolve()),
        temperature=params.temperature,
        alpha_kd=params.alpha_kd,
        alpha_lm=params.alpha_lm,
    )
    outcome = run_job(kd_job, ctx.checkpoint_dir, "distill", plan, ctx.log)
    details = {
        "layers": layers,
        "teacher": teacher_dir.name,
        "temperature": params.temperature,
        "alpha_kd": params.alpha_kd,
        "alpha_lm": params.alpha_lm,
        "non_embedding_params": student_ne,
        "parent_non_embedding_params": teacher_ne,
        "non_embedding_reduction": round(teacher_ne / student_ne, 3),
        **training_details(outcome, plan),
    }
    metrics = {}
    if params.ce_only_baseline:
        ce_job = job_for(ctx, str(init.resolve()), plan, f"{ctx.variant}-ce-only")
        ce = run_job(ce_job, ctx.checkpoint_dir, "ce-only", plan, ctx.log)
        metrics["ce_only_perplexity"] = heldout_perplexity(ce.model_dir, ctx)
        details["ce_only"] = {
            "init": "same as the student (parent blocks)",
            **training_details(ce, plan),
        }
        ctx.log(f"{ctx.variant}: CE-only baseline test perplexity {metrics['ce_only_perplexity']}")
    export_model(outcome.model_dir, ctx)
    return StepResult(details=details, metrics=metrics)
