"""quantize-int8: ONNX Runtime dynamic int8 of an fp32 ONNX variant (or of a torch one, via export).

`quantize_dynamic` stores int8 weights and quantizes activations at run time, per tensor over
the whole batch. The op types quantized are explicit (`op_types`, default MatMul and Gather, so
the embedding table is int8 too): ORT's default list changes between releases. Two graph facts
make "embeddings included" pay off:

* the exporter's Conv1D projections are `Gemm` nodes, which ORT's IntegerOps mode does not
  quantize: they are rewritten as MatMul + Add first (same arithmetic);
* the tied embedding is one (E, V) initializer read by both the lookup Gather and the head
  MatMul (see `onnx_export.KVCacheLM`), so the quantizer writes one int8 copy for both.

Quality gates, measured at batch 1 against the fp32 graph (`build_engines.parity.quality_vs`):
perplexity on the profile's test blocks ≤ `max_ppl_ratio` × fp32's, and greedy agreement
(int8's greedy pick equals fp32's at each of 32 decode steps from 32 prompts, the 3 parity
prompts and the openings of test blocks, both fed fp32's greedy tokens) ≥ `min_agreement`.
Recorded beside it: teacher-forced top-1 agreement on every test position, and the free-running
agreement (each model on its own tokens), which compounds: on the tiny student (ppl 171) int8
kept perplexity ×1.000 and top-1 0.983, yet free-running agreement was 0.92-0.94, because one
flip at a near-tie of a flat distribution changes every later token of that prompt.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper

from build_engines.onnx_export import (
    MODEL_FILE,
    OnnxCheckError,
    check_onnx,
    export_folder,
    initializer_stats,
    write_sidecar,
)
from build_engines.onnx_graph import graph_bytes
from build_engines.parity import prompt_ids, quality_vs
from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.runner import StepContext, StepResult
from slimserve.runtimes.onnx_rt import read_sidecar
from slimserve.runtimes.spec import ONNXRUNTIME, TORCH, runtime_spec
from slimserve.steps import ExportOnnxParams, QuantizeInt8Params
from slimserve.tokenizer import copy_tokenizer_files

GREEDY_STEPS, GREEDY_PROMPTS = 32, 32  # greedy agreement: 32 prompts x 32 tokens at batch 1


class QualityError(RuntimeError):
    """The int8 model lost more quality than the step allows."""


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite plain `Gemm(A, B[, C])` (no transposes, alpha = beta = 1) as MatMul (+ Add).

    Returns how many were rewritten. A Gemm with other attributes is left alone.
    """
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("transA", 0) == 0
            and attrs.get("transB", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not plain:
            nodes.append(node)
            continue
        a, b, *rest = node.input
        out = node.output[0]
        if rest and rest[0]:
            mm = f"{out}_matmul"
            nodes.append(helper.make_node("MatMul", [a, b], [mm], name=f"{node.name}_MatMul"))
            nodes.append(helper.make_node("Add", [mm, rest[0]], [out], name=f"{node.name}_Add"))
        else:
            nodes.append(helper.make_node("MatMul", [a, b], [out], name=f"{node.name}_MatMul"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def quantize_file(src: Path, dst: Path, params: QuantizeInt8Params) -> dict[str, Any]:
    """fp32 graph `src` → int8 graph `dst`; returns what was done (op counts, seconds)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.time()
    model = onnx.load(str(src))
    rewritten = gemm_to_matmul(model)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prep = Path(tmp) / "prep.onnx"
        onnx.save(model, str(prep))
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "please run pre-processing" warnings
        try:
            quantize_dynamic(
                prep,
                dst,
                op_types_to_quantize=list(params.op_types),
                per_channel=params.per_channel,
                weight_type=QuantType.QInt8,
                # fused graphs: shape inference cannot type com.microsoft outputs
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            logging.getLogger().setLevel(level)
    ops: dict[str, int] = {}
    for node in onnx.load(str(dst)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    quantized = {
        k: ops[k]
        for k in ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear")
        if k in ops
    }
    if not quantized.get("MatMulInteger") and "MatMul" in params.op_types:
        raise OnnxCheckError(f"{src}: no MatMul was quantized (ops after: {sorted(ops)})")
    return {
        "op_types_to_quantize": list(params.op_types),
        "per_channel": params.per_channel,
        "weight_type": "int8",
        "gemm_rewritten_as_matmul": rewritten,
        "quantized_ops": quantized,
        "fp32_ops_left": {k: ops[k] for k in ("MatMul", "Gemm", "Gather") if k in ops},
        "quantize_seconds": round(time.time() - start, 2),
    }


def _fp32_source(
    parent_dir: Path, scratch: Path, tokenizer_dir: Path | None, blocks, log
) -> tuple[Path, dict[str, Any]]:
    """The fp32 ONNX folder to quantize: the parent itself, or an export of a torch parent."""
    manifest = read_manifest(parent_dir)  # ArtifactError names a missing / corrupt parent
    spec = runtime_spec(manifest.runtime)
    if spec is ONNXRUNTIME:
        meta = read_sidecar(parent_dir)
        if meta.get("precision") != "float32":
            raise ArtifactError(
                f"{parent_dir}: parent is already {meta.get('precision')}, not fp32"
            )
        check_onnx(parent_dir / meta["model"], full=meta.get("graph", "standard") == "standard")
        return parent_dir, {"source": "parent ONNX", "graph": meta.get("graph", "standard")}
    if spec is TORCH:
        log(f"exporting {parent_dir.name} to fp32 ONNX before quantizing")
        export = export_folder(
            parent_dir,
            scratch,
            ExportOnnxParams(optimize=False, append_graph=False),
            tokenizer_dir,
            blocks,
            log,
        )
        for key in ("params_total", "params_nonzero"):  # counted on the int8 graph instead
            export.pop(key)
        return scratch, {"source": "exported from torch parent", "export": export}
    raise ArtifactError(f"{parent_dir}: cannot quantize a {manifest.runtime!r} artifact")


def quantize_folder(
    parent_dir: Path,
    out_dir: Path,
    params: QuantizeInt8Params,
    blocks: torch.Tensor,
    tokenizer_dir: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Quantize the parent (ONNX fp32, or torch via export) into `out_dir`; check quality.

    blocks: (N, T) test token ids for perplexity and agreement. Raises ArtifactError,
    OnnxCheckError, ParityError (export of a torch parent) or QualityError.
    """
    from slimserve.runtimes import onnx_rt

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        src_dir, details = _fp32_source(parent_dir, Path(tmp), tokenizer_dir, blocks, log)
        src = src_dir / read_sidecar(src_dir)["model"]
        shutil.copyfile(src_dir / "config.json", out_dir / "config.json")
        copy_tokenizer_files(src_dir, out_dir)
        dst = out_dir / MODEL_FILE
        details.update(quantize_file(src, dst, params))
        graph = read_sidecar(src_dir).get("graph", "standard")
        check_onnx(dst, full=graph == "standard")
        write_sidecar(out_dir, {"model": MODEL_FILE, "precision": "int8", "graph": graph})
        fp32_bytes, int8_bytes = graph_bytes(src), graph_bytes(dst)  # with external data
        details.update(
            fp32_bytes=fp32_bytes,
            int8_bytes=int8_bytes,
            size_ratio=round(int8_bytes / fp32_bytes, 4),
        )
        ref = onnx_rt.load(src_dir, device="cpu")
        cand = onnx_rt.load(out_dir, device="cpu")
        cfg = json.loads((out_dir / "config.json").read_text())
        tok_dir = out_dir if (out_dir / "tokenizer.json").is_file() else tokenizer_dir
        if tok_dir is None:
            raise ArtifactError(f"{parent_dir}: no tokenizer.json for the greedy prompts")
        ctx_len = int(cfg["n_positions"])
        prompts = prompt_ids(tok_dir, GREEDY_STEPS, ctx_len)
        stride = max(1, len(blocks) // (GREEDY_PROMPTS - len(prompts)))
        opening = min(16, ctx_len - GREEDY_STEPS)
        prompts += [b[:opening].tolist() for b in blocks[::stride]][: GREEDY_PROMPTS - len(prompts)]
        quality = quality_vs(ref, cand, blocks[:, :ctx_len], prompts, GREEDY_STEPS)
    details["quality_vs_fp32"] = quality
    problems = []
    if quality["perplexity_ratio"] > params.max_ppl_ratio:
        problems.append(
            f"perplexity {quality['perplexity']:.3f} is {quality['perplexity_ratio']:.3f} x fp32's "
            f"{quality['reference_perplexity']:.3f} (max_ppl_ratio {params.max_ppl_ratio})"
        )
    if quality["greedy_agreement"] < params.min_agreement:
        problems.append(
            f"greedy agreement with fp32 {quality['greedy_agreement']:.4f} < min_agreement "
            f"{params.min_agreement}"
        )
    if problems:
        raise QualityError("int8 quality check failed: " + "; ".join(problems))
    log(
        f"int8: {int8_bytes / 1e6:.2f} MB ({details['size_ratio']:.0%} of fp32), perplexity x"
        f"{quality['perplexity_ratio']:.3f}, greedy agreement {quality['greedy_agreement']:.3f} "
        f"(free-running {quality['free_running_agreement']:.3f}), "
        f"top-1 agreement {quality['top1_agreement']:.3f}"
    )
    return details


def run(ctx: StepContext) -> StepResult:
    """The quantize-int8 step: fp32 ONNX (or torch) parent → out_dir/{model.onnx (int8), ...}."""
    if ctx.parent_dir is None:
        raise ArtifactError(f"{ctx.variant}: quantize-int8 needs a parent ('from')")
    params = ctx.params
    assert isinstance(params, QuantizeInt8Params)
    read_manifest(ctx.parent_dir)
    block = ctx.profile.block_size
    blocks = ctx.data.blocks("test", block, ctx.profile.eval.max_tokens)
    details = quantize_folder(
        ctx.parent_dir, ctx.out_dir, params, blocks, ctx.data.tokenizer_dir, ctx.log
    )
    stats = initializer_stats(ctx.out_dir / MODEL_FILE)
    return StepResult(
        details=details, params_total=stats["params_total"], params_nonzero=stats["params_nonzero"]
    )
