"""The `finetune` step: train the teacher with Ray Train.

Two starts, one code path: `params.pretrained` (a hub id or a local folder, e.g. GPT-2 124M)
or `params.model` (an architecture trained from scratch, as the tiny profile does on the
`python-docs` corpus). Either way the workers load a Hugging Face folder and run
`training.loop.train_worker`; the final model lands in the step's output folder.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from slimserve.gpt2_config import gpt2_config
from slimserve.runner import StepContext, StepResult
from slimserve.steps import FinetuneParams
from training.kd import non_embedding_params
from training.trainer import (
    ensure_ray,
    export_model,
    job_for,
    plan_workers,
    run_job,
    training_details,
)


def scratch_model(params: FinetuneParams, ctx: StepContext) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of `params.model`'s shape over the corpus's vocabulary."""
    import torch

    shape = params.model
    assert shape is not None
    eos = ctx.data.tokenizer().eos_token_id
    config = gpt2_config(
        vocab_size=int(ctx.data.stats["vocab_size"]),
        n_positions=shape.n_positions or ctx.profile.block_size,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        eos=eos,
        n_inner=shape.n_inner,
        resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout,
        attn_pdrop=shape.dropout,
    )
    torch.manual_seed(ctx.profile.seed)
    return GPT2LMHeadModel(config)


def check_pretrained(name: str, ctx: StepContext) -> None:
    """Fail early (before Ray starts) when the checkpoint cannot read this corpus's blocks."""
    config = AutoConfig.from_pretrained(name)
    vocab = int(ctx.data.stats["vocab_size"])
    problems = []
    if config.model_type != "gpt2":
        problems.append(f"model_type is {config.model_type!r}, not 'gpt2'")
    if config.vocab_size < vocab:
        problems.append(f"vocab_size {config.vocab_size} < the tokenizer's {vocab}")
    if config.n_positions < ctx.profile.block_size:
        problems.append(f"n_positions {config.n_positions} < block_size {ctx.profile.block_size}")
    if problems:
        raise ValueError(f"pretrained {name!r}: " + "; ".join(problems))


def run(ctx: StepContext) -> StepResult:
    params = ctx.params
    hf_logging.disable_progress_bar()  # one bar per load/save drowns the progress lines
    assert isinstance(params, FinetuneParams)
    if params.pretrained is not None:
        check_pretrained(params.pretrained, ctx)
        init, start = params.pretrained, f"pretrained {params.pretrained}"
        if Path(init).is_dir():  # Ray Train workers do not run in this directory
            init = str(Path(init).resolve())
    else:
        folder = ctx.checkpoint_dir / "init"
        if not (folder / "config.json").is_file():
            scratch_model(params, ctx).save_pretrained(folder)
        init, start = str(folder.resolve()), "from scratch"
    ensure_ray()
    plan = plan_workers(ctx.profile.training, params.workers)
    ctx.log(f"{ctx.variant}: training {start} on {params.tokens:,} tokens")
    job = job_for(ctx, init, plan, ctx.variant)
    outcome = run_job(job, ctx.checkpoint_dir, "finetune", plan, ctx.log)
    export_model(outcome.model_dir, ctx)
    model = GPT2LMHeadModel.from_pretrained(outcome.model_dir)
    details = {
        "start": start,
        "non_embedding_params": non_embedding_params(model),
        **training_details(outcome, plan),
    }
    return StepResult(details=details)
