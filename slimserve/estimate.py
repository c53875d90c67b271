"""How long a build will take on this machine, from a few seconds' measurement.

`slimserve build` prints the estimate before it starts. Training dominates a CPU build, so the
estimate counts training FLOPs per step from the catalogue's shapes and token budgets and divides
them by the training FLOP rate measured here (a few optimiser steps of a small GPT-2). Steps that
do not train (ONNX export, int8, evaluation) get a fixed cost in "reference seconds", scaled by how
much slower this machine trains than the reference (a 2-core Intel Xeon with AVX-512 training the
probe at `REFERENCE_FLOPS`). It is an estimate: another process on the machine slows the build
down and not the probe.

The probe times each optimiser step on its own and keeps the fastest (`fastest_rate`): a busy
neighbour (an install, another build) only ever makes a step slower, so one slow step among
several must not set the rate. A probe started during such a burst once put a build at 70 min
that took 15; the fastest of several steps is what the machine does when it is not disturbed.

FLOPs per token of a forward pass over a GPT-2 of L layers, width E, MLP width I, vocabulary V and
context T: 2·(L·(4E² + 2EI) + EV) for the matrix products plus 2·L·T·E for attention; a training
step costs 3× that (forward + backward), a frozen teacher's forward 1×.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from slimserve.catalogue import Profile

REFERENCE_FLOPS = 1.35e11
"""Training FLOP/s the probe reaches on the reference machine (2-core Xeon, AVX-512, idle)."""
FIXED_REFERENCE_S = {  # measured there: a step's wall time beyond its training FLOPs
    "finetune": 15.0,  # Ray Train start, evaluations, checkpoints, test-split evaluation
    "distill": 25.0,  # the same for the student and its CE-only twin
    "prune-l1": 20.0,
    "prune-structured": 20.0,
    "export-onnx": 9.0,
    "quantize-int8": 8.0,
    "build-trt": 0.0,
}


@dataclass(frozen=True)
class Shape:
    """The sizes that set a GPT-2's FLOPs per token."""

    layers: int
    width: int
    inner: int
    vocab: int
    context: int

    def forward_flops(self) -> float:
        L, E, I, V, T = self.layers, self.width, self.inner, self.vocab, self.context  # noqa: E741
        return 2.0 * (L * (4 * E * E + 2 * E * I) + E * V) + 2.0 * L * T * E


def _pretrained_shape(name: str, vocab: int, context: int) -> Shape | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not on disk (a hub id offline): GPT-2 124M is the common case
        if "gpt2" not in name:
            return None
        from transformers import GPT2Config

        cfg = GPT2Config()
    inner = cfg.n_inner or 4 * cfg.n_embd
    return Shape(cfg.n_layer, cfg.n_embd, inner, cfg.vocab_size or vocab, context)


def shape_of(profile: Profile, name: str) -> Shape | None:
    """The shape variant `name` trains at (None when it cannot be known before the build)."""
    v = profile.variants[name]
    p = profile.step_params(name)
    vocab, context = profile.tokenizer.vocab_size, profile.block_size
    if v.step == "finetune":
        if p.model is not None:
            m = p.model
            return Shape(m.n_layer, m.n_embd, m.n_inner or 4 * m.n_embd, vocab, context)
        return _pretrained_shape(p.pretrained or "", vocab, context)
    parent = shape_of(profile, v.from_) if v.from_ else None
    if parent is None:
        return None
    if v.step == "distill":
        kept = len(p.layers) if p.layers else math.ceil(parent.layers / 2)
        return replace(parent, layers=kept)
    if v.step == "prune-structured":
        heads = profile.variants[profile.teacher].params.get("model", {}).get("n_head")
        width = parent.width
        if p.heads_keep and heads:
            width = p.heads_keep * (parent.width // heads)
        layers = len(p.layers_keep) if p.layers_keep else parent.layers
        return Shape(layers, width, max(1, round(parent.inner * p.mlp_keep)), parent.vocab, context)
    return parent


def training_flops(profile: Profile, name: str) -> float | None:
    """FLOPs the step of `name` spends training (0 for steps that do not train)."""
    v = profile.variants[name]
    p = profile.step_params(name)
    s = shape_of(profile, name)
    teacher = shape_of(profile, profile.teacher)
    if v.step == "finetune":
        return None if s is None else 3 * s.forward_flops() * p.tokens
    if s is None or teacher is None:
        return None if v.step in ("distill", "prune-l1", "prune-structured") else 0.0
    kd = 3 * s.forward_flops() + teacher.forward_flops()
    if v.step == "distill":
        twin = 3 * s.forward_flops() if p.ce_only_baseline else 0.0
        return (kd + twin) * p.tokens
    if v.step in ("prune-l1", "prune-structured"):
        return kd * p.recovery_tokens
    return 0.0


@dataclass(frozen=True)
class Probe:
    """What the training probe measured: FLOP/s of its fastest step and of its slowest."""

    flops: float
    slowest: float
    steps: int

    @property
    def disturbed(self) -> bool:
        """The steps' rates differ by more than 1.5x: something else was using the machine."""
        return self.flops > 1.5 * self.slowest


def fastest_rate(
    step: Callable[[], None],
    work: float,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Probe:
    """Times `steps` calls of `step` one by one; `work` FLOPs each. The rate is the fastest
    step's, so a step slowed down by another process does not drag the estimate."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    rates = []
    for _ in range(steps):
        start = clock()
        step()
        rates.append(work / max(clock() - start, 1e-9))
    return Probe(flops=max(rates), slowest=min(rates), steps=steps)


def measure_flops(threads: int | None = None, steps: int = 5) -> Probe:
    """Training FLOP/s of this machine: AdamW steps of a 4-layer, 256-wide GPT-2 (batch 16 × 128,
    the tiny teacher's own step), the fastest of `steps` timed one by one (about 2 s on the
    reference machine)."""
    import torch
    from transformers import GPT2LMHeadModel

    from slimserve.gpt2_config import gpt2_config

    shape = Shape(4, 256, 1024, 4096, 128)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        cfg = gpt2_config(n_layer=4, n_head=4, n_embd=256, vocab_size=4096, n_positions=128)
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 4096, (16, 128))

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: allocations, kernel selection
        return fastest_rate(step, 3 * shape.forward_flops() * ids.numel(), steps)
    finally:
        torch.set_num_threads(before)


def estimate_seconds(profile: Profile, names: list[str], flops: float) -> float | None:
    """Expected wall seconds to build `names` at a training rate of `flops` (None if unknown)."""
    slower = REFERENCE_FLOPS / flops
    total = 0.0
    for name in names:
        work = training_flops(profile, name)
        if work is None:
            return None
        step = profile.variants[name].step
        total += work / flops + FIXED_REFERENCE_S.get(step, 0.0) * slower
    return total
