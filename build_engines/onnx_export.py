"""export-onnx: a GPT-2 folder → one ONNX graph with the KV cache, parity-checked.

One graph serves prefill and decode (`slimserve.runtimes.onnx_rt` documents its inputs and
outputs): the past may have length 0, so prefill feeds an empty past and decode feeds the cache
back. Batch, sequence and past are dynamic axes; opset 18 (the dynamo exporter's opset-17
down-conversion gave invalid models in trials).

The tied embedding is stored once. Left alone, the TorchScript exporter writes `wte` (V, E)
and a constant-folded transpose (E, V) for the LM head; the dynamo exporter stores `wte` once
but feeds the head through a Transpose node, which ONNX Runtime folds into a second copy in
memory and which its int8 quantizer skips (the weight is not an initializer). `KVCacheLM`
keeps one (E, V) matrix: the head is a plain MatMul on it, and the lookup is `Gather(axis=1)`
on the same matrix, a negligible strided read of B·T·E values. Initializer bytes must stay
within 1.05 × the parent's safetensors.

Optional ONNX Runtime GPT-2 fusion (`optimize`: SkipLayerNormalization, FastGelu, Gemm →
MatMul + Add) is kept only if the fused graph passes the same parity check and decodes at least
10% faster (`KEEP_FUSED_BELOW`); the choice, the fusion counts and both timings go into the
manifest. Attention is not fused (ORT's GPT-2 patterns predate this graph's separate key /
value cache), and ORT's session-time optimiser already fuses LayerNorm and GELU, so on the
tiny student the fused graph was no faster and the plain one is kept. A fused graph holds
com.microsoft ops that TensorRT cannot parse: build-trt refuses such a parent with a message.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from build_engines.onnx_append import APPEND_FILE, AppendKVLM
from build_engines.parity import check_parity, decode_ms, prompt_ids
from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.runner import StepContext, StepResult
from slimserve.runtimes.onnx_rt import LOGITS_TO_KEEP, SIDECAR, append_output_names, io_names
from slimserve.runtimes.spec import ONNXRUNTIME
from slimserve.steps import ExportOnnxParams
from slimserve.tokenizer import copy_tokenizer_files

MODEL_FILE = ONNXRUNTIME.files.weights[0]  # "model.onnx", the name the sidecar records
MAX_WEIGHT_RATIO = 1.05  # ONNX initializer bytes / parent safetensors bytes
# Keep ORT's fused graph only if it decodes in < 90% of the plain graph's time: ORT fuses
# LayerNorm / GELU itself at session start, so the gain is small, and on a shared machine a
# 5% "gain" is noise (measured on the tiny student: fused 0.63 ms vs plain 0.54 ms a step).
KEEP_FUSED_BELOW = 0.90
WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}


class OnnxCheckError(ValueError):
    """An ONNX file that the checker rejects (or that cannot be read)."""


class KVCacheLM(nn.Module):
    """A GPT-2 LM head model with the KV cache as flat tensors (the graph `torch.onnx` sees).

    forward(input_ids (B, T), attention_mask (B, P+T), position_ids (B, T), *past) where past is
    key_0, value_0, key_1, ... each (B, H, P, D) → (logits (B, T, V), present key_0, value_0, ...
    each (B, H, P+T, D)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.transformer = model.transformer
        self.num_layers = len(self.transformer.h)
        wte = self.transformer.wte.weight  # (V, E)
        head = model.get_output_embeddings().weight  # (V, E), the same tensor when tied
        self.tied = head.data_ptr() == wte.data_ptr()
        # One (E, V) matrix for lookup and head when tied, so it is stored once.
        self.embed_t = nn.Parameter(wte.detach().t().contiguous(), requires_grad=False)
        self.head_t = (
            self.embed_t
            if self.tied
            else nn.Parameter(head.detach().t().contiguous(), requires_grad=False)
        )

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        b, t = input_ids.shape
        embeds = self.embed_t.index_select(1, input_ids.reshape(-1)).t().reshape(b, t, -1)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        out = self.transformer(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=DynamicCache(ddp_cache_data=pairs),
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.last_hidden_state @ self.head_t, *present)


def load_parent_model(parent_dir: Path) -> nn.Module:
    """The parent's GPT-2 in float32 with eager attention (a plain graph), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            parent_dir, dtype=torch.float32, attn_implementation="eager"
        )
    except Exception as exc:  # OSError, SafetensorError, ValueError...: all mean "corrupt"
        raise ArtifactError(f"{parent_dir}: cannot load the parent's weights ({exc})") from exc
    if model.config.model_type != "gpt2":
        raise ArtifactError(
            f"{parent_dir}: export-onnx needs a GPT-2 model, got {model.config.model_type}"
        )
    return model.eval()


def _example(cfg: Any, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs (sizes > 1 so no axis is specialised to a constant)."""
    heads, dim = cfg.n_head, cfg.n_embd // cfg.n_head
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq)
    kv = [torch.zeros(batch, heads, past, dim) for _ in range(2 * cfg.n_layer)]
    return (ids, mask, positions, *kv)


def _tidy(path: Path, names: dict[str, str]) -> None:
    """Name the derived axis `total` (= past + sequence) and drop the exporter's per-node debug
    metadata (stack traces with local paths: half the file of a tiny model)."""
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def add_logits_to_keep(path: Path, context_length: int) -> bool:
    """Let a run ask for the logits of the last N positions only (`LOGITS_TO_KEEP`).

    Prefill needs one row of logits per prompt, yet the LM head over every prompt position was
    about 40% of a tiny student's prefill. The head's input goes through
    `Slice(hidden, -N, end, axis 1)`; N is a graph input backed by an initializer equal to the
    context length, so a run that does not feed it (scoring, decode, TensorRT's parser, which
    reads such an input as a constant) gets every position, as before. Returns False, leaving
    the graph alone, when `logits` does not come from a MatMul on the hidden states.
    """
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    at, head = next(((i, n) for i, n in enumerate(graph.node) if "logits" in n.output), (0, None))
    if head is None or head.op_type != "MatMul" or LOGITS_TO_KEEP in {i.name for i in graph.input}:
        return False
    consts = {
        LOGITS_TO_KEEP: [context_length],
        f"{LOGITS_TO_KEEP}.end": [np.iinfo(np.int64).max],
        f"{LOGITS_TO_KEEP}.axis": [1],
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    start, kept = f"{LOGITS_TO_KEEP}.start", f"{LOGITS_TO_KEEP}.hidden"
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [start], name=f"{LOGITS_TO_KEEP}/neg"),
        helper.make_node(
            "Slice",
            [head.input[0], start, f"{LOGITS_TO_KEEP}.end", f"{LOGITS_TO_KEEP}.axis"],
            [kept],
            name=f"{LOGITS_TO_KEEP}/slice",
        ),
    ]
    head.input[0] = kept
    for node in reversed(nodes):
        graph.node.insert(at, node)
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "kept"  # min(sequence, logits_to_keep)
    onnx.save(model, str(path))
    return True


def export_kv_onnx(
    model: nn.Module, path: Path, opset: int = 18, exporter: str = "dynamo"
) -> dict[str, Any]:
    """Export `model` (a GPT-2 LM head model) with the KV cache to `path`; return facts."""
    wrapper = KVCacheLM(model).eval()
    cfg = model.config
    inputs, outputs = io_names(cfg.n_layer)
    start = time.time()
    _quiet_export(wrapper, cfg, path, inputs, outputs, opset, exporter)
    sliced = add_logits_to_keep(path, cfg.n_positions)
    return {
        "exporter": exporter,
        "opset": opset,
        "logits_to_keep": sliced,
        "export_seconds": round(time.time() - start, 2),
        "tied_embedding": "stored once, (E, V)" if wrapper.tied else "untied: lookup and head",
    }


def export_append_onnx(model: nn.Module, path: Path, opset: int = 18) -> None:
    """Export `model`'s append graph (build_engines.onnx_append) to `path`, with the
    `logits_to_keep` input; ValueError when the model is not a plain GPT-2."""
    wrapper = AppendKVLM(model).eval()
    cfg = model.config
    inputs, _ = io_names(cfg.n_layer)
    outputs = append_output_names(cfg.n_layer)
    _quiet_export(wrapper, cfg, path, inputs, outputs, opset, "dynamo")
    add_logits_to_keep(path, cfg.n_positions)


def _quiet_export(wrapper: nn.Module, cfg: Any, path: Path, inputs, outputs, opset, exporter):
    """`_export` without the exporter's noise (torchvision notes, axis renames, deprecations)."""
    assert not any(m.training for m in wrapper.modules()), "export needs eval mode (dropout off)"
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping ..."
    with warnings.catch_warnings():
        # axis-renaming notes and pytree deprecations from torch.export: noise, not problems
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            _export(wrapper, cfg, _example(cfg), path, inputs, outputs, opset, exporter)
        finally:
            registration.setLevel(level)


def _export(wrapper, cfg, args, path: Path, inputs, outputs, opset: int, exporter: str) -> None:
    """torch.export-based exporter (default), or the deprecated TorchScript one (kept because it
    still works in torch 2.13, matched PyTorch within 1e-6 in trials and exports in a second)."""
    if exporter == "dynamo":
        from torch.export import Dim

        batch, seq = Dim("batch", min=1), Dim("sequence", min=1, max=cfg.n_positions)
        past = Dim("past", min=0, max=cfg.n_positions)
        kv_shape = {0: batch, 2: past}
        shapes = (
            {0: batch, 1: seq},
            {0: batch, 1: Dim.AUTO},
            {0: batch, 1: seq},
            tuple(kv_shape for _ in range(2 * cfg.n_layer)),
        )
        torch.onnx.export(
            wrapper, args, str(path), input_names=inputs, output_names=outputs,
            opset_version=opset, dynamo=True, dynamic_shapes=shapes, external_data=False,
            verbose=False,
        )  # fmt: skip
        m = onnx.load(str(path), load_external_data=False)
        total = m.graph.input[1].type.tensor_type.shape.dim[1].dim_param
        _tidy(path, {total: "total", "past + sequence": "total"})
    elif exporter == "torchscript":
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
        }
        axes["attention_mask"] = {0: "batch", 1: "total"}
        axes["logits"] = {0: "batch", 1: "sequence"}
        axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
        axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
        torch.onnx.export(
            wrapper, args, str(path), input_names=inputs, output_names=outputs,
            opset_version=opset, dynamo=False, dynamic_axes=axes,
        )  # fmt: skip
        _tidy(path, {})
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")


def check_onnx(path: Path, full: bool = True) -> None:
    """Run `onnx.checker` (with strict shape inference when `full`); OnnxCheckError if it fails."""
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxCheckError(f"{path}: fails the ONNX checker: {first}") from exc
    except Exception as exc:  # protobuf DecodeError, truncated files, ...
        raise OnnxCheckError(f"{path}: not a readable ONNX model ({exc})") from exc


def initializer_stats(path: Path) -> dict[str, int]:
    """Weights of a graph: elements, non-zero elements and bytes of its non-scalar float and
    8-bit initializers (the exporter's int64 shape constants and scalar scales are not weights).
    """
    from onnx import numpy_helper

    total = nonzero = nbytes = 0
    for init in onnx.load(str(path)).graph.initializer:
        if init.data_type not in WEIGHT_TYPES or not init.dims:
            continue
        arr = numpy_helper.to_array(init)
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
        nbytes += arr.nbytes
    return {"params_total": total, "params_nonzero": nonzero, "weight_bytes": nbytes}


def prepare_folder(parent_dir: Path, out_dir: Path) -> None:
    """Copy what an ONNX folder needs besides the graph: config.json and the tokenizer."""
    shutil.copyfile(parent_dir / "config.json", out_dir / "config.json")
    copy_tokenizer_files(parent_dir, out_dir)


def write_sidecar(out_dir: Path, meta: dict[str, Any]) -> None:
    (out_dir / SIDECAR).write_text(json.dumps(meta, indent=2))


def _optimize(src: Path, dst: Path, cfg: Any) -> dict[str, int]:
    """ONNX Runtime's Python GPT-2 fusions (opt_level 0: portable, no EP-specific nodes)."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(
        str(src), model_type="gpt2", num_heads=cfg.n_head, hidden_size=cfg.n_embd, opt_level=0
    )
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def _speed(folders: list[Path], rounds: int = 5) -> list[float]:
    """Interleaved median decode ms (batch 1 and 8 summed) per folder, on a shared machine.
    One thread each: multi-threaded timings on a busy machine measure the neighbours."""
    from slimserve.runtimes.onnx_rt import load

    runtimes = [load(f, device="cpu", threads=1) for f in folders]
    times: list[list[float]] = [[] for _ in folders]
    for _ in range(rounds):
        for i, rt in enumerate(runtimes):
            times[i].append(decode_ms(rt, 1) + decode_ms(rt, 8))
    return [round(statistics.median(t), 4) for t in times]


def export_folder(
    parent_dir: Path,
    out_dir: Path,
    params: ExportOnnxParams,
    tokenizer_dir: Path | None = None,
    blocks: torch.Tensor | None = None,
    log=print,
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Export the torch artifact in `parent_dir` into `out_dir`, check it, return the details.

    Raises ArtifactError (parent missing / corrupt / not torch), OnnxCheckError or ParityError.
    """
    from slimserve.runtimes import onnx_rt, torch_rt

    manifest = read_manifest(parent_dir)  # ArtifactError names a missing / corrupt parent
    if manifest.runtime != "torch":
        raise ArtifactError(
            f"{parent_dir}: export-onnx needs a PyTorch parent, got runtime {manifest.runtime!r}"
        )
    model = load_parent_model(parent_dir)
    cfg = model.config
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_folder(parent_dir, out_dir)
    path = out_dir / MODEL_FILE
    details = export_kv_onnx(model, path, params.opset, exporter)
    del model
    check_onnx(path)
    details["checker"] = "passed (full_check)"
    weights = initializer_stats(path)
    st_bytes = sum(p.stat().st_size for p in parent_dir.glob("*.safetensors"))
    details.update(
        onnx_bytes=path.stat().st_size,
        safetensors_bytes=st_bytes,
        weight_bytes=weights["weight_bytes"],
        file_ratio=round(path.stat().st_size / st_bytes, 4) if st_bytes else None,
    )
    if st_bytes and weights["weight_bytes"] > MAX_WEIGHT_RATIO * st_bytes:
        raise OnnxCheckError(
            f"{path}: weights take {weights['weight_bytes']} bytes, more than "
            f"{MAX_WEIGHT_RATIO} x the parent's {st_bytes} (a tied matrix stored twice?)"
        )
    write_sidecar(out_dir, {"model": MODEL_FILE, "precision": "float32", "graph": "standard"})
    ref = torch_rt.load(parent_dir, device="cpu", dtype="float32")
    assert not ref.model.training, "reference logits need eval mode"
    tok_dir = parent_dir if (parent_dir / "tokenizer.json").is_file() else tokenizer_dir
    if tok_dir is None:
        raise ArtifactError(f"{parent_dir}: no tokenizer.json for the parity prompts")
    prompts = prompt_ids(tok_dir, params.parity_steps, cfg.n_positions)
    if blocks is None:
        gen = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, cfg.vocab_size, (2, cfg.n_positions), generator=gen)
    blocks = blocks[:, : cfg.n_positions]
    cand = onnx_rt.load(out_dir, device="cpu")
    args = (prompts, params.parity_steps, params.logit_tolerance, blocks)
    details["parity"] = check_parity(ref, cand, *args)
    log(f"parity ok: max |logit diff| {details['parity']['max_abs_logit_diff']:.2e}")
    details["optimize"] = {"requested": params.optimize, "kept": False}
    if params.optimize:
        details["optimize"].update(_try_optimize(out_dir, cfg, ref, args, log))
        details["onnx_bytes"] = path.stat().st_size  # the graph kept
        details["file_ratio"] = round(path.stat().st_size / st_bytes, 4) if st_bytes else None
    details["append"] = {"requested": params.append_graph, "kept": False}
    if params.append_graph:
        details["append"].update(_try_append(out_dir, ref, args, params.opset, log))
    details.update(params_total=weights["params_total"], params_nonzero=weights["params_nonzero"])
    return details


def _try_optimize(out_dir: Path, cfg: Any, ref, args: tuple, log) -> dict[str, Any]:
    """Fuse into a scratch folder; replace model.onnx only if parity holds and it is faster."""
    from build_engines.parity import ParityError
    from slimserve.runtimes import onnx_rt

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        scratch = Path(tmp)
        for name in ("config.json", SIDECAR):
            shutil.copyfile(out_dir / name, scratch / name)
        fused = scratch / MODEL_FILE
        try:
            stats = _optimize(out_dir / MODEL_FILE, fused, cfg)
            check_onnx(fused, full=False)
            parity = check_parity(ref, onnx_rt.load(scratch, device="cpu"), *args)
        except (ParityError, OnnxCheckError, RuntimeError, ValueError, IndexError) as exc:
            log(f"ORT GPT-2 fusion not kept: {exc}")
            return {"reason": f"fusion failed: {exc}"}
        plain_ms, fused_ms = _speed([out_dir, scratch])
        result = {"fused": stats, "decode_ms_b1_plus_b8": {"plain": plain_ms, "fused": fused_ms}}
        if fused_ms >= KEEP_FUSED_BELOW * plain_ms:
            log(f"ORT GPT-2 fusion not kept: {fused_ms:.3f} ms vs {plain_ms:.3f} ms plain")
            return {**result, "reason": "not faster than ORT's own session-time fusions"}
        shutil.copyfile(fused, out_dir / MODEL_FILE)
    write_sidecar(out_dir, {"model": MODEL_FILE, "precision": "float32", "graph": "ort-gpt2-fused"})
    log(f"ORT GPT-2 fusion kept: {fused_ms:.3f} ms vs {plain_ms:.3f} ms plain")
    return {**result, "kept": True, "parity": parity}


def _try_append(out_dir: Path, ref, args: tuple, opset: int, log) -> dict[str, Any]:
    """Write the append graph next to the standard one and name it in the sidecar, if it
    passes the checker and the same parity check; otherwise leave the folder as it was."""
    from build_engines.parity import ParityError
    from slimserve.runtimes import onnx_rt

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
    return {"kept": True, "file": APPEND_FILE, "onnx_bytes": path.stat().st_size, "parity": parity}


def run(ctx: StepContext) -> StepResult:
    """The export-onnx step: parent torch folder → out_dir/{model.onnx, onnx.json, config...}."""
    if ctx.parent_dir is None:
        raise ArtifactError(f"{ctx.variant}: export-onnx needs a parent ('from')")
    params = ctx.params
    assert isinstance(params, ExportOnnxParams)
    block = ctx.profile.block_size
    blocks = ctx.data.blocks("test", block, max_tokens=2 * block)[:2]  # cut to the context later
    details = export_folder(
        ctx.parent_dir, ctx.out_dir, params, ctx.data.tokenizer_dir, blocks, ctx.log
    )
    total, nonzero = details.pop("params_total"), details.pop("params_nonzero")
    return StepResult(details=details, params_total=total, params_nonzero=nonzero)
