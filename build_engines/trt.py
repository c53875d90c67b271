"""build-trt: a TensorRT engine (`model.plan`) from an fp32 ONNX variant with the KV cache.

One engine, one optimization profile, the ONNX graph's single prefill/decode signature. A
TensorRT profile wants every dynamic axis ≥ 1, so the past is never empty: prefill feeds one
zero key/value column with attention mask 0 (`slimserve.runtimes.trt_rt`), which is exactly a
left-padding column of the shared KV layout. Hence the profile's past axis (1 + real past) may
reach the context length, and `attention_mask` spans past + sequence.

Precision per TensorRT major version (`precision_plan`):
* 10.x: weakly typed network, fp16 via `BuilderFlag.FP16` (TensorRT picks fp16 kernels);
* 11.x: networks are strongly typed and the precision flags are gone, so fp16 means converting
  the ONNX graph to fp16 first, keeping LayerNormalization, Softmax and Pow (GELU's cube) in
  fp32 and the graph's inputs / outputs fp32 (the runtime's buffers stay float32).

The step needs an NVIDIA GPU and the `tensorrt` package: the runner skips it without them
(`slimserve.hardware`), and `run` refuses clearly if called anyway. Everything except
`build_engine` is plain Python and unit-tested with fakes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.runner import StepContext, StepResult
from slimserve.runtimes.onnx_rt import io_names, read_model_config, read_sidecar
from slimserve.runtimes.trt_rt import PLAN_FILE, SIDECAR
from slimserve.steps import BuildTrtParams, ProfileShape
from slimserve.tokenizer import copy_tokenizer_files

FP32_OPS = ("LayerNormalization", "Softmax", "Pow")  # kept fp32 in a converted fp16 graph
# Max |logit diff| vs the fp32 ONNX parent on CPU. fp16 keeps ~3 significant digits: with
# logits up to ~20 and a dozen layers of accumulation, 0.25 still catches a wrong mask or
# position (errors of whole units) without failing an honest fp16 engine.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}

Shape = tuple[int, ...]


class ProfileError(ValueError):
    """An optimization profile that does not fit the model."""


@dataclass(frozen=True)
class PrecisionPlan:
    """How to get `precision` out of a given TensorRT version."""

    precision: str  # "fp16" | "fp32"
    trt_major: int
    strongly_typed: bool  # create the network with STRONGLY_TYPED (always so on 11+)
    fp16_flag: bool  # config.set_flag(BuilderFlag.FP16) (10.x only)
    convert_onnx_fp16: bool  # rewrite the ONNX graph to fp16 before parsing (11+)

    def describe(self) -> str:
        if self.precision == "fp32":
            return "fp32"
        if self.fp16_flag:
            return "fp16 via BuilderFlag.FP16 (TensorRT 10, weakly typed)"
        return f"fp16 ONNX graph ({', '.join(FP32_OPS)} in fp32), strongly typed network"


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise ValueError(f"cannot read a TensorRT version from {version!r}") from exc


def precision_plan(trt_version: str, precision: str) -> PrecisionPlan:
    """The builder settings for `precision` on TensorRT `trt_version` (e.g. "10.13.0")."""
    major = trt_major(trt_version)
    if major < 10:
        raise RuntimeError(f"TensorRT {trt_version} is too old: the runtime needs 10 or newer")
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    fp16 = precision == "fp16"
    return PrecisionPlan(
        precision=precision,
        trt_major=major,
        strongly_typed=major >= 11,
        fp16_flag=fp16 and major == 10,
        convert_onnx_fp16=fp16 and major >= 11,
    )


def profile_shapes(
    params: BuildTrtParams, cfg: dict[str, int]
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every graph input, after checking the axes fit the context.

    cfg: n_layer / n_head / n_embd / n_positions (a GPT-2 config.json). Raises ProfileError
    naming every axis that does not fit (minimums >= 1 are `ProfileShape`'s own rule).
    """
    ctx = cfg["n_positions"]
    problems = []
    for name, axis, limit in (
        ("sequence", params.sequence, ctx),
        ("past", params.past, ctx),  # 1 padding column + up to ctx - 1 real tokens
    ):
        if axis.max > limit:
            problems.append(f"{name}.max {axis.max} exceeds the model's context {limit}")
    if problems:
        raise ProfileError("build-trt profile does not fit the model: " + "; ".join(problems))
    heads, dim = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    b, t, p = params.batch, params.sequence, params.past

    def triple(fn) -> tuple[Shape, Shape, Shape]:
        return (fn("min"), fn("opt"), fn("max"))

    def get(axis: ProfileShape, which: str) -> int:
        return int(getattr(axis, which))

    inputs, _ = io_names(cfg["n_layer"])
    shapes = {
        "input_ids": triple(lambda w: (get(b, w), get(t, w))),
        "position_ids": triple(lambda w: (get(b, w), get(t, w))),
        "attention_mask": triple(lambda w: (get(b, w), get(p, w) + get(t, w))),
    }
    for name in inputs[3:]:
        shapes[name] = triple(lambda w: (get(b, w), heads, get(p, w), dim))
    return shapes


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp32 ONNX → fp16 ONNX for strongly typed TensorRT (I/O and `FP32_OPS` stay fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(src)),
        keep_io_types=True,
        op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS),
    )
    dedupe_nodes(model.graph)  # it can insert the same Cast twice (one per blocked consumer)
    toposort(model.graph)  # and appends its I/O Casts at the end of the node list
    del model.graph.value_info[:]  # stale fp32 annotations of values that are now fp16
    onnx.save(model, str(dst))
    return {"fp16_onnx": True, "fp32_ops": list(FP32_OPS), "io_types": "float32"}


def engine_source(src: Path, work: Path, plan: PrecisionPlan) -> tuple[Path, dict[str, Any]]:
    """The graph TensorRT parses, written under `work`, and what was done to it: `src` with its
    initializer-backed inputs frozen, then converted to fp16 when the precision plan says so."""
    path = work / "model.trt.onnx"
    facts = freeze_initializer_inputs(src, path)
    if plan.convert_onnx_fp16:
        fp16 = work / "model.fp16.onnx"
        facts.update(convert_fp16(path, fp16))
        path = fp16
    return path, facts


def freeze_initializer_inputs(src: Path, dst: Path) -> dict[str, Any]:
    """Copy the graph with every input that an initializer backs (export-onnx's optional
    `logits_to_keep`) turned into a plain constant: the engine has one fixed signature, and
    the default (every position's logits) is what the TensorRT runtime expects."""
    import onnx

    model = onnx.load(str(src))
    backed = {i.name for i in model.graph.initializer}
    frozen = [i.name for i in model.graph.input if i.name in backed]
    kept = [i for i in model.graph.input if i.name not in backed]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save(model, str(dst))
    return {"frozen_inputs": frozen}


def dedupe_nodes(graph: Any) -> None:
    """Drop exact duplicates of a node (same op, inputs, outputs, attributes): SSA again."""
    seen, kept = set(), []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def toposort(graph: Any) -> None:
    """Reorder `graph.node` so every node follows the producers of its inputs (ONNX requires it,
    and TensorRT's parser reads nodes in order)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    shapes: dict[str, tuple[Shape, Shape, Shape]],
    plan: PrecisionPlan,
    workspace_mb: int,
) -> dict[str, Any]:
    """Parse, build and serialize one engine (TensorRT 10 / 11 Python API). Needs a GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT enables TF32 (10-bit mantissa) matmuls by default on Ampere and newer:
        # an "fp32" engine would then miss fp32 parity (1e-3) on its first real GPU.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    start = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    plan_path.write_bytes(bytes(serialized))
    return {"build_seconds": round(time.time() - start, 1), "plan_bytes": plan_path.stat().st_size}


def _check_parent(parent_dir: Path) -> Path:
    """The parent's fp32, standard-op ONNX graph; ArtifactError naming what is wrong."""
    manifest = read_manifest(parent_dir)
    if manifest.runtime != "onnxruntime":
        raise ArtifactError(
            f"{parent_dir}: build-trt needs an ONNX parent, got {manifest.runtime!r}"
        )
    meta = read_sidecar(parent_dir)
    if meta.get("precision") != "float32":
        raise ArtifactError(
            f"{parent_dir}: build-trt needs an fp32 graph, got {meta.get('precision')}"
        )
    if meta.get("graph", "standard") != "standard":
        raise ArtifactError(
            f"{parent_dir}: its graph holds ONNX Runtime fused ops TensorRT cannot parse; "
            "build TensorRT from an export-onnx variant with optimize: false"
        )
    path = parent_dir / meta["model"]
    if not path.is_file():
        raise ArtifactError(f"{parent_dir}: no {meta['model']}")
    return path


def run(ctx: StepContext) -> StepResult:
    """The build-trt step: ONNX parent → out_dir/{model.plan, trt.json, config.json, tokenizer}."""
    from slimserve import hardware

    reason = hardware.missing("tensorrt")
    if reason:
        raise RuntimeError(f"build-trt cannot run here: {reason}")
    import tensorrt as trt
    import torch

    from build_engines.onnx_export import check_onnx, initializer_stats
    from build_engines.parity import check_parity, prompt_ids
    from slimserve.runtimes import onnx_rt, trt_rt

    if ctx.parent_dir is None:
        raise ArtifactError(f"{ctx.variant}: build-trt needs a parent ('from')")
    params = ctx.params
    assert isinstance(params, BuildTrtParams)
    src = _check_parent(ctx.parent_dir)
    check_onnx(src)
    cfg = read_model_config(ctx.parent_dir)
    shapes = profile_shapes(params, cfg)
    plan = precision_plan(trt.__version__, params.precision)
    details: dict[str, Any] = {"tensorrt_version": trt.__version__, "precision": plan.describe()}
    details["gpu"] = torch.cuda.get_device_name(0)
    details["profile"] = {k: [list(s) for s in v] for k, v in shapes.items()}
    shutil.copyfile(ctx.parent_dir / "config.json", ctx.out_dir / "config.json")
    copy_tokenizer_files(ctx.parent_dir, ctx.out_dir)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir.parent) as tmp:
        onnx_path, facts = engine_source(src, Path(tmp), plan)
        details.update(facts)
        details.update(
            build_engine(onnx_path, ctx.out_dir / PLAN_FILE, shapes, plan, params.workspace_mb)
        )
    limits = {k: getattr(params, k).model_dump() for k in ("batch", "sequence", "past")}
    sidecar = {"plan": PLAN_FILE, "precision": params.precision, "limits": limits, **details}
    (ctx.out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    ref = onnx_rt.load(ctx.parent_dir, device="cpu")
    cand = trt_rt.load(ctx.out_dir)
    # Prefill runs at past 1 (the padding column), so a prompt plus its steps must fit `past`.
    steps = min(32, params.past.max // 2)
    prompts = prompt_ids(ctx.out_dir, steps, min(cfg["n_positions"], params.past.max))
    prompts = [p[: params.sequence.max] for p in prompts]
    block = min(ctx.profile.block_size, params.sequence.max)
    blocks = ctx.data.blocks("test", block, max_tokens=2 * block)[:2]
    details["parity_vs_onnx"] = check_parity(
        ref,
        cand,
        prompts,
        steps,
        TOLERANCE[params.precision],
        blocks,
        require_identical=params.precision == "fp32",  # fp16 may flip near-ties: recorded
    )
    weights = initializer_stats(src)  # the engine holds the parent graph's weights
    return StepResult(
        details=details,
        params_total=weights["params_total"],
        params_nonzero=weights["params_nonzero"],
    )
