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
on the same matrix, a negligible strided read of B·T·E values.

The folder holds its weights once. Both graphs are exported with their weights inline, checked,
and then `onnx_graph.share_weights` moves every initializer into one external-data file,
`model.onnx.data`, each distinct tensor written once: the append graph reads the standard
graph's own matrices (the same bytes at the same offsets), so the folder is the size of one set
of weights plus two small graph files. Initializer bytes, and the weights file, must stay within
1.05 × the parent's safetensors. ONNX Runtime reads the file next to the graph it loads;
folders written before (two graphs, each with every weight inline) still load as they are.

Optional ONNX Runtime GPT-2 fusion (`optimize`: SkipLayerNormalization, FastGelu, Gemm →
MatMul + Add) is kept only if the fused graph passes the same parity check and decodes at least
10% faster (`KEEP_FUSED_BELOW`); the choice, the fusion counts and both timings go into the
manifest. Attention is not fused (ORT's GPT-2 patterns predate this graph's separate key /
value cache), and ORT's session-time optimiser already fuses LayerNorm and GELU, so on the
tiny student the fused graph was no faster and the plain one is kept. A fused graph holds
com.microsoft ops that TensorRT cannot parse: build-trt refuses such a parent with a message.

Beside the standard graph the step writes the append graph (`append_graph`, on by default;
build_engines.onnx_append), which the CPU runtime decodes with; the standard graph stays the
one that TensorRT, int8 quantization and ONNX Runtime's CUDA path use.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from build_engines.onnx_append import try_append
from build_engines.onnx_graph import (
    WEIGHTS_FILE,
    OnnxCheckError,
    add_logits_to_keep,
    check_onnx,
    initializer_stats,
    quiet_export,
    share_weights,
    write_sidecar,
)
from build_engines.parity import check_parity, decode_ms, prompt_ids
from slimserve.artifacts import ArtifactError, read_manifest
from slimserve.runner import StepContext, StepResult
from slimserve.runtimes.onnx_rt import SIDECAR, io_names
from slimserve.runtimes.spec import ONNXRUNTIME
from slimserve.steps import ExportOnnxParams
from slimserve.tokenizer import copy_tokenizer_files

MODEL_FILE = ONNXRUNTIME.files.weights[0]  # "model.onnx", the name the sidecar records
MAX_WEIGHT_RATIO = 1.05  # ONNX initializer bytes / parent safetensors bytes
# Keep ORT's fused graph only if it decodes in < 90% of the plain graph's time: ORT fuses
# LayerNorm / GELU itself at session start, so the gain is small, and on a shared machine a
# 5% "gain" is noise (measured on the tiny student: fused 0.63 ms vs plain 0.54 ms a step).
KEEP_FUSED_BELOW = 0.90


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


def export_kv_onnx(
    model: nn.Module, path: Path, opset: int = 18, exporter: str = "dynamo"
) -> dict[str, Any]:
    """Export `model` (a GPT-2 LM head model) with the KV cache to `path`; return facts."""
    wrapper = KVCacheLM(model).eval()
    cfg = model.config
    inputs, outputs = io_names(cfg.n_layer)
    start = time.time()
    quiet_export(wrapper, cfg, path, inputs, outputs, opset, exporter)
    sliced = add_logits_to_keep(path, cfg.n_positions)
    return {
        "exporter": exporter,
        "opset": opset,
        "logits_to_keep": sliced,
        "export_seconds": round(time.time() - start, 2),
        "tied_embedding": "stored once, (E, V)" if wrapper.tied else "untied: lookup and head",
    }


def prepare_folder(parent_dir: Path, out_dir: Path) -> None:
    """Copy what an ONNX folder needs besides the graph: config.json and the tokenizer."""
    shutil.copyfile(parent_dir / "config.json", out_dir / "config.json")
    copy_tokenizer_files(parent_dir, out_dir)


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
    details.update(safetensors_bytes=st_bytes, weight_bytes=weights["weight_bytes"])
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
    details["append"] = {"requested": params.append_graph, "kept": False}
    if params.append_graph:
        details["append"].update(try_append(out_dir, ref, args, params.opset, log))
    details.update(store_weights_once(out_dir, st_bytes))
    details.update(params_total=weights["params_total"], params_nonzero=weights["params_nonzero"])
    return details


def store_weights_once(out_dir: Path, st_bytes: int) -> dict[str, Any]:
    """Move the weights of the folder's graphs into one shared file (`onnx_graph.share_weights`),
    check the graphs again and name the file in the sidecar; returns the sizes for the details.

    Raises OnnxCheckError when the weights file is larger than `MAX_WEIGHT_RATIO` × the
    parent's safetensors (a matrix stored twice)."""
    from slimserve.runtimes import onnx_rt

    meta = onnx_rt.read_sidecar(out_dir)
    graphs = [meta["model"], *([meta["append"]] if meta.get("append") else [])]
    data_bytes = share_weights(out_dir, graphs)
    for name in graphs:
        check_onnx(out_dir / name, full=name != meta["model"] or meta.get("graph") == "standard")
    write_sidecar(out_dir, {**meta, "weights": WEIGHTS_FILE})
    if st_bytes and data_bytes > MAX_WEIGHT_RATIO * st_bytes:
        raise OnnxCheckError(
            f"{out_dir / WEIGHTS_FILE}: {data_bytes} bytes, more than {MAX_WEIGHT_RATIO} x the "
            f"parent's {st_bytes} (the graphs do not share their weights)"
        )
    onnx_bytes = data_bytes + sum((out_dir / g).stat().st_size for g in graphs)
    return {
        "weights_file": {"file": WEIGHTS_FILE, "bytes": data_bytes, "graphs": graphs},
        "onnx_bytes": onnx_bytes,
        "file_ratio": round(onnx_bytes / st_bytes, 4) if st_bytes else None,
    }


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


def run(ctx: StepContext) -> StepResult:
    """The export-onnx step: parent torch folder → out_dir/{model.onnx, model.append.onnx,
    model.onnx.data (their one set of weights), onnx.json, config...}."""
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
