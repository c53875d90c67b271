"""The one training loop every Ray Train job runs (finetune, distill, pruning recovery).

`train_worker(config)` runs inside each Ray Train worker. It trains a GPT-2 that starts from a
Hugging Face folder, with an optional frozen teacher (knowledge distillation) and an optional
parameter mask (pruning recovery keeps pruned weights at zero). Budgets are in tokens:
one optimiser step consumes `batch_size` blocks of `T` tokens (global, over all workers).

Data: the blocks (N, T) are shuffled once per epoch with a seed that depends only on the epoch,
and step s takes rows `[b·B, (b+1)·B)` of that epoch's order (b = s mod steps per epoch), of
which worker r takes every `world`-th row starting at r. The order is therefore a function of
the step alone, so a resumed run sees exactly the batches an uninterrupted one would.

Checkpoints (rank 0 writes, Ray Train persists): `model/` (`save_pretrained`) and
`state.pt` (optimizer, scheduler, step, tokens). Resume reads `ray.train.get_checkpoint()`;
the mask, the data order and the schedule are functions of the config and the step, so nothing
else needs saving.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimserve.steps import Budget
from training.kd import kd_loss
from training.ray_logs import quiet_report_log

MaskFn = Callable[[nn.Module], dict[str, torch.Tensor]]
MAX_LOGITS = 2**27  # logits per forward pass in training (512 MiB in fp32)


@dataclass
class LoopConfig:
    """One training run, shipped (pickled) to every worker."""

    init_dir: str  # HF folder (or hub id) the trained model starts from
    train_blocks: np.ndarray  # (N, T) token ids
    val_blocks: np.ndarray  # (M, T) token ids, first `budget.eval_blocks` used
    budget: Budget
    seed: int = 0
    label: str = "train"  # prefix of progress lines
    threads: int = 1  # torch intra-op threads per worker (CPU)
    teacher_dir: str | None = None  # frozen teacher for KD (None = plain LM loss)
    temperature: float = 2.0
    alpha_kd: float = 0.5
    alpha_lm: float = 1.0
    mask_fn: MaskFn | None = None  # {param name: 0/1 mask}, re-applied after every step
    progress_every_s: float = 15.0
    interrupt_after_steps: int | None = None  # simulate a crash after N steps (tests)


@dataclass(frozen=True)
class Schedule:
    """Steps derived from the token budget; shapes: tokens per step = batch_size · T."""

    tokens_per_step: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, budget: Budget, block_size: int) -> Schedule:
        per = budget.batch_size * block_size
        total = max(1, math.ceil(budget.tokens / per))
        every = max(1, round(budget.eval_every_tokens / per)) if budget.eval_every_tokens else 0
        every = every or max(1, math.ceil(total / 4))
        ckpt = budget.checkpoint_every_tokens
        return cls(
            tokens_per_step=per,
            total_steps=total,
            warmup_steps=min(total, round(budget.warmup_tokens / per)),
            eval_every=every,
            checkpoint_every=max(1, round(ckpt / per)) if ckpt else every,
        )


def lr_factor(step: int, sched: Schedule, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at the last step."""
    if step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    span = max(1, sched.total_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """A mask hook for pruning recovery: 1 where a 2-D weight is non-zero, for weights with zeros."""
    return {
        name: (p != 0).to(p.dtype)
        for name, p in model.named_parameters()
        if p.dim() == 2 and bool((p == 0).any())
    }


def batch_rows(
    step: int, n_blocks: int, batch: int, rank: int, world: int, seed: int
) -> torch.Tensor:
    """Row indices (batch // world,) of `step`'s global batch that worker `rank` trains on."""
    per_epoch = n_blocks // batch
    if per_epoch == 0:
        raise ValueError(f"{n_blocks} training blocks cannot fill one batch of {batch}")
    epoch, b = divmod(step, per_epoch)
    order = torch.randperm(
        n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
    )
    return order[b * batch : (b + 1) * batch][rank::world]


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only (not biases, LayerNorms, or the position table)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() == 2 and "wpe" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def say(line: str) -> None:
    """A progress line on the worker's stdout (streamed to the driver by Ray).

    Not `print`: Ray Train V2 patches `print` in workers into its logger, which echoes it twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over workers (identity for one worker)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def validate(model: nn.Module, blocks: torch.Tensor, rank: int, world: int, device, amp) -> float:
    """Mean next-token cross-entropy over `blocks` (M, T), split over the workers."""
    model.eval()
    nll, count = 0.0, 0
    mine = blocks[rank::world]
    for i in range(0, len(mine), 16):
        ids = mine[i : i + 16].to(device)
        with amp():
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += ids[:, 1:].numel()
    model.train()
    nll, count = _all_sum([nll, float(count)], device)
    return nll / max(count, 1.0)


def _load_model(path: str, dropout: float | None) -> nn.Module:
    from transformers import GPT2LMHeadModel

    drop = (
        {}
        if dropout is None
        else dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), dropout)
    )
    return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, **drop)


class Learner:
    """The model, its optimiser state, the optional teacher and masks: one `step` per batch."""

    def __init__(self, job: LoopConfig, sched: Schedule, device: torch.device) -> None:
        import ray.train
        import ray.train.torch

        b = job.budget
        self.job, self.device = job, device
        model = _load_model(job.init_dir, b.dropout)
        self.masks = {
            k: m.to(device) for k, m in (job.mask_fn(model) if job.mask_fn else {}).items()
        }
        self.saved: dict[str, Any] | None = None
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as folder:
                model.load_state_dict(_load_model(f"{folder}/model", b.dropout).state_dict())
                self.saved = torch.load(
                    f"{folder}/state.pt", map_location="cpu", weights_only=False
                )
        self.model = ray.train.torch.prepare_model(model)  # to device; DDP when world > 1
        self.named = dict(_unwrap(self.model).named_parameters())
        self.teacher = None
        if job.teacher_dir is not None and job.alpha_kd > 0:
            self.teacher = (
                _load_model(job.teacher_dir, None).to(device).eval().requires_grad_(False)
            )
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.model, b.weight_decay), lr=b.lr, betas=(0.9, 0.95), fused=cuda
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, sched, b.min_lr_ratio)
        )
        # Mixed precision on GPU only: bf16 where supported, else fp16 with loss scaling.
        self.amp_dtype = (
            torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        )
        fp16 = cuda and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        if self.saved is not None:
            self.optimizer.load_state_dict(self.saved["optimizer"])
            self.scheduler.load_state_dict(self.saved["scheduler"])
            if self.scaler is not None and self.saved.get("scaler"):
                self.scaler.load_state_dict(self.saved["scaler"])

    def amp(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return nullcontext()

    def micro_rows(self, ids: torch.Tensor) -> int:
        """Rows per forward/backward pass: the (rows, T, V) logits and the loss's copies of them
        dominate memory at GPT-2's 50,257 vocabulary (16 x 512 blocks: 1.6 GB per copy), so
        a batch runs in slices of at most `MAX_LOGITS` logits, gradients accumulated."""
        vocab = _unwrap(self.model).config.vocab_size
        return max(1, min(len(ids), MAX_LOGITS // max(1, ids.shape[1] * vocab)))

    def step(self, ids: torch.Tensor) -> dict[str, float]:
        """One optimiser step on this worker's rows `ids` (B / world, T); returns loss parts."""
        job = self.job
        rows = self.micro_rows(ids)
        slices = list(torch.split(ids, rows))
        totals: dict[str, float] = {}
        for i, part in enumerate(slices):
            weight = len(part) / len(ids)  # the loss is a mean over positions: equal T per row
            last = i == len(slices) - 1
            # DDP all-reduces the gradients once, after the batch's last slice.
            defer = not last and hasattr(self.model, "no_sync")
            with self.model.no_sync() if defer else nullcontext():
                with self.amp():
                    logits = self.model(input_ids=part).logits[:, :-1]  # (rows, T-1, V)
                    vocab = logits.shape[-1]
                    teacher_logits = None
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_logits = self.teacher(input_ids=part).logits[:, :-1]
                            teacher_logits = teacher_logits.reshape(-1, vocab)
                    loss, parts = kd_loss(
                        logits.reshape(-1, vocab),
                        teacher_logits,
                        part[:, 1:].reshape(-1),
                        job.temperature,
                        job.alpha_kd if self.teacher is not None else 0.0,
                        job.alpha_lm if self.teacher is not None else 1.0,
                    )
                    loss = loss * weight if len(slices) > 1 else loss
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            del logits, teacher_logits, loss
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v * weight
        parts = totals
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), job.budget.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.masks:
            with torch.no_grad():
                for name, mask in self.masks.items():
                    self.named[name].mul_(mask)
        return parts

    def save(self, folder: Path, state: dict[str, Any]) -> None:
        _unwrap(self.model).save_pretrained(folder / "model")
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler,
                **state,
            },
            folder / "state.pt",
        )


def _start_worker(job: LoopConfig) -> tuple[int, int, torch.device]:
    """Rank, world size and device of this Ray Train worker; threads, seed and logs set."""
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed + rank)
    if job.budget.batch_size % world:
        raise ValueError(
            f"batch_size {job.budget.batch_size} must be a multiple of the {world} workers"
        )
    return rank, world, device


def _initial_state(
    learner: Learner, val_loss: Callable[[], float]
) -> tuple[dict[str, Any], int | None]:
    """Step, tokens and starting val loss (from the checkpoint when resuming), and the step
    resumed from (None on a fresh run)."""
    if learner.saved is not None:
        state = {k: learner.saved[k] for k in ("step", "tokens", "initial_val_loss")}
        return state, state["step"]
    # the starting point, so a run shows (and tests check) how far training moved it
    return {"step": 0, "tokens": 0, "initial_val_loss": val_loss()}, None


def _loss_metrics(state: dict[str, Any], train_loss: float, loss: float) -> dict[str, Any]:
    """Step, tokens and the losses as reported (perplexity from the validation loss)."""
    return {
        "step": state["step"],
        "tokens": state["tokens"],
        "train_loss": round(train_loss, 4),
        "val_loss": round(loss, 4),
        "val_perplexity": round(math.exp(min(loss, 50.0)), 3),
        "initial_val_loss": round(state["initial_val_loss"], 4),
    }


def _report(
    metrics: dict[str, Any], learner: Learner, state: dict[str, Any], rank: int, ckpt: bool
) -> None:
    """`ray.train.report` the metrics; with a checkpoint (written by rank 0) when `ckpt`."""
    import ray.train

    if not ckpt:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            learner.save(Path(tmp), state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: `config["job"]` is a `LoopConfig`."""
    job: LoopConfig = config["job"]
    b = job.budget
    rank, world, device = _start_worker(job)
    train = torch.from_numpy(np.asarray(job.train_blocks, dtype=np.int64))  # (N, T)
    val = torch.from_numpy(np.asarray(job.val_blocks[: b.eval_blocks], dtype=np.int64))
    sched = Schedule.of(b, train.shape[1])
    learner = Learner(job, sched, device)

    def val_loss() -> float:
        return validate(learner.model, val, rank, world, device, learner.amp)

    state, resumed_from = _initial_state(learner, val_loss)
    if rank == 0:
        say(
            f"[{job.label}] {sched.total_steps} steps × {sched.tokens_per_step:,} tokens "
            f"({b.tokens:,} budget), {world} worker(s) on {device}, starting at step "
            f"{state['step']}, val loss {state['initial_val_loss']:.3f}"
        )
    start, session_steps, train_time, last_print = time.time(), 0, 0.0, time.time()
    window: list[float] = []
    loss = float("nan")
    learner.model.train()
    while state["step"] < sched.total_steps:
        t0 = time.time()
        rows = batch_rows(state["step"], len(train), b.batch_size, rank, world, job.seed)
        parts = learner.step(train[rows].to(device))
        train_time += time.time() - t0
        state["step"] += 1
        state["tokens"] += sched.tokens_per_step
        session_steps += 1
        window.append(parts["ce"])
        step = state["step"]
        if job.interrupt_after_steps and session_steps == job.interrupt_after_steps:
            raise RuntimeError(f"interrupted after step {step} (interrupt_after_steps)")
        tps = session_steps * sched.tokens_per_step / max(train_time, 1e-9)
        eta = _fmt_eta((sched.total_steps - step) * sched.tokens_per_step / max(tps, 1e-9))
        if rank == 0 and time.time() - last_print >= job.progress_every_s:
            last_print = time.time()
            say(
                f"[{job.label}] step {step}/{sched.total_steps} | tokens {state['tokens']:,} | "
                f"loss {parts['loss']:.3f} (ce {parts['ce']:.3f}) | {tps:,.0f} tok/s | ETA {eta}"
            )
        final = step == sched.total_steps
        do_eval = final or step % sched.eval_every == 0
        do_ckpt = final or step % sched.checkpoint_every == 0
        if not (do_eval or do_ckpt):
            continue
        if do_eval:
            loss = val_loss()
        train_loss = _all_sum([sum(window) / max(len(window), 1)], device)[0] / world
        window = []
        metrics = {
            **_loss_metrics(state, train_loss, loss),
            "lr": learner.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tps, 1),
            "seconds": round(time.time() - start, 1),
            "resumed_from_step": resumed_from,
            "final": final,
            **({"kl": round(parts["kl"], 4)} if "kl" in parts else {}),
        }
        if rank == 0 and do_eval:
            say(
                f"[{job.label}] step {step}/{sched.total_steps} | train {train_loss:.3f} | "
                f"val {loss:.3f} (ppl {metrics['val_perplexity']:.1f}) | {tps:,.0f} tok/s | "
                f"ETA {eta}"
            )
        _report(metrics, learner, state, rank, do_ckpt)
