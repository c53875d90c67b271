"""The step registry: every pipeline step's parameters (validated config) and where it lives.

The core library owns the *schema* of each step so a profile is validated without importing
training or compilation code; the implementation is found by its import path at run time
(`"training.finetune:run"`), so the layers stay one-way.
A step function has the signature `run(ctx: StepContext) -> StepResult` (`slimserve.runner`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from slimserve.strict import Strict

Requirement = Literal["none", "gpu", "tensorrt"]


class Params(Strict):
    """Base of every step's parameters."""


class Budget(Params):
    """Optimiser settings shared by the training steps; budgets are in tokens, not epochs."""

    tokens: int = Field(200_000, ge=1, description="training tokens (blocks × block_size)")
    batch_size: int = Field(16, ge=1, le=4096, description="blocks per optimiser step (global)")
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_tokens: int = Field(0, ge=0, description="linear warmup length in tokens")
    weight_decay: float = Field(0.01, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    eval_every_tokens: int = Field(0, ge=0, description="validation cadence (0 = 4 times a run)")
    checkpoint_every_tokens: int = Field(0, ge=0, description="checkpoint cadence (0 = at evals)")
    eval_blocks: int = Field(64, ge=1, description="validation blocks per evaluation")
    dropout: float | None = Field(None, ge=0, lt=1, description="override model dropout")
    workers: int | None = Field(None, ge=1, description="Ray Train workers (None = profile's)")


class ModelShape(Params):
    """A GPT-2 architecture for training from scratch."""

    n_layer: int = Field(4, ge=1, le=96)
    n_head: int = Field(4, ge=1, le=128)
    n_embd: int = Field(256, ge=8, le=16384)
    n_positions: int | None = Field(None, ge=8, description="context (None = block_size)")
    n_inner: int | None = Field(None, ge=1, description="MLP width (None = 4 × n_embd)")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class FinetuneParams(Budget):
    """Train the teacher: from a hub id / local checkpoint, or from scratch with `model`."""

    pretrained: str | None = Field(None, description="hub id or local folder to start from")
    model: ModelShape | None = Field(None, description="architecture when training from scratch")

    @model_validator(mode="after")
    def _one_init(self) -> FinetuneParams:
        if (self.pretrained is None) == (self.model is None):
            raise ValueError("give exactly one of 'pretrained' or 'model'")
        return self


class DistillParams(Budget):
    """DistilGPT2-style student: alternate teacher layers, KD + LM loss."""

    layers: list[int] | None = Field(
        None, description="teacher layers copied into the student (None = every other layer)"
    )
    temperature: float = Field(2.0, gt=0, le=100)
    alpha_kd: float = Field(0.5, ge=0, le=100)
    alpha_lm: float = Field(0.5, ge=0, le=100)
    ce_only_baseline: bool = Field(
        True, description="also train the same student with CE only (evidence KD helps)"
    )

    @field_validator("layers")
    @classmethod
    def _layers_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError("layers must be distinct non-negative indices, at least one")
        return v


class PruneL1Params(Params):
    amount: float = Field(0.3, gt=0, lt=1, description="fraction of block weights set to zero")
    scope: Literal["global", "layer"] = Field("global", description="rank globally or per layer")
    include_embeddings: bool = Field(False, description="also prune the tied wte / lm_head")
    recovery_tokens: int = Field(0, ge=0, description="masked KD fine-tune after pruning (0 = off)")
    recovery: Budget | None = Field(None, description="optimiser for recovery (tokens ignored)")


class PruneStructuredParams(Params):
    mlp_keep: float = Field(0.5, gt=0, le=1, description="fraction of MLP neurons kept")
    heads_keep: int | None = Field(None, ge=1, description="width mode: heads kept (Minitron)")
    layers_keep: list[int] | None = Field(None, description="depth mode: layer indices kept")
    importance: Literal["weight", "activation"] = Field(
        "activation", description="neuron score: weight norm, or mean |activation| on calibration"
    )
    calibration_blocks: int = Field(32, ge=1)
    recovery_tokens: int = Field(0, ge=0, description="recovery KD budget (0 = none)")
    recovery: Budget | None = None


class ExportOnnxParams(Params):
    opset: int = Field(18, ge=18, le=25, description="ONNX opset (>= 18)")
    optimize: bool = Field(True, description="ONNX Runtime GPT-2 graph fusion")
    append_graph: bool = Field(
        True,
        description="also write the CPU decode graph that appends to a preallocated KV cache "
        "(model.append.onnx; the standard graph copies the whole cache every step)",
    )
    logit_tolerance: float = Field(1e-3, gt=0, description="max |logit diff| vs PyTorch")
    parity_steps: int = Field(32, ge=1, le=1024, description="greedy steps compared")


class QuantizeInt8Params(Params):
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gather"],
        description="ONNX op types quantized (Gather = embeddings)",
    )
    per_channel: bool = False
    max_ppl_ratio: float = Field(1.05, gt=1, description="fail if ppl > ratio × fp32")
    min_agreement: float = Field(
        0.98, ge=0, le=1, description="fail if greedy agreement with fp32 (batch 1) is lower"
    )


class ProfileShape(Params):
    min: int = Field(1, ge=1)
    opt: int = Field(8, ge=1)
    max: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ProfileShape:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class BuildTrtParams(Params):
    precision: Literal["fp16", "fp32"] = "fp16"
    batch: ProfileShape = Field(default_factory=lambda: ProfileShape(min=1, opt=8, max=32))
    sequence: ProfileShape = Field(default_factory=lambda: ProfileShape(min=1, opt=64, max=256))
    past: ProfileShape = Field(default_factory=lambda: ProfileShape(min=1, opt=128, max=512))
    workspace_mb: int = Field(4096, ge=64)


@dataclass(frozen=True)
class StepSpec:
    """What the runner needs to know about a step before importing it."""

    name: str
    params: type[BaseModel]
    impl: str  # "module:function"
    runtime: str  # runtime of the artifact it writes
    requires: Requirement = "none"
    needs_parent: bool = True
    uses_teacher: bool = False
    description: str = ""


STEPS: dict[str, StepSpec] = {
    s.name: s
    for s in [
        StepSpec(
            "finetune",
            FinetuneParams,
            "training.finetune:run",
            "torch",
            needs_parent=False,
            description="fine-tune or train the teacher (Ray Train)",
        ),
        StepSpec(
            "distill",
            DistillParams,
            "training.distill:run",
            "torch",
            uses_teacher=True,
            description="distil a DistilGPT2-style student (Ray Train)",
        ),
        StepSpec(
            "prune-l1",
            PruneL1Params,
            "build_engines.prune:run_l1",
            "torch",
            uses_teacher=True,
            description="L1 unstructured pruning of every block weight",
        ),
        StepSpec(
            "prune-structured",
            PruneStructuredParams,
            "build_engines.structured:run",
            "torch",
            uses_teacher=True,
            description="remove MLP neurons / heads / layers, then recover",
        ),
        StepSpec(
            "export-onnx",
            ExportOnnxParams,
            "build_engines.onnx_export:run",
            "onnxruntime",
            description="ONNX graph with KV cache, parity-checked",
        ),
        StepSpec(
            "quantize-int8",
            QuantizeInt8Params,
            "build_engines.quantize:run",
            "onnxruntime",
            description="ONNX Runtime dynamic int8",
        ),
        StepSpec(
            "build-trt",
            BuildTrtParams,
            "build_engines.trt:run",
            "tensorrt",
            requires="tensorrt",
            description="TensorRT engine from an ONNX variant",
        ),
    ]
}
