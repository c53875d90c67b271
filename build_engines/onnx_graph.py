"""Writing and checking ONNX graphs: the quiet exporter, example inputs, the optional
`logits_to_keep` input, the checker, the shared weights file and the sidecar. Shared by the
standard KV-cache graph (build_engines.onnx_export) and the append graph
(build_engines.onnx_append).

An export folder holds its weights once: `share_weights` moves every initializer of its graphs
into one external-data file (`WEIGHTS_FILE`), each distinct tensor written once, so the standard
and the append graph (which hold the same matrices) and any tied copies inside one graph point
at the same bytes. Only small initializers (shape constants, scalars) stay inside the graphs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from slimserve.runtimes.onnx_rt import LOGITS_TO_KEEP, SIDECAR

WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}
WEIGHTS_FILE = "model.onnx.data"  # the external-data file every graph of a folder reads
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inline (onnx's own default threshold)
# Large tensors start on a 64 KiB boundary (onnx's alignment for memory-mapping, the Windows
# allocation granularity and a multiple of the page size); small ones are packed back to back.
ALIGN_FROM_BYTES, ALIGNMENT = 1 << 20, 1 << 16


class OnnxCheckError(ValueError):
    """An ONNX file that the checker rejects (or that cannot be read)."""


def example_inputs(
    cfg: Any, batch: int = 2, seq: int = 3, past: int = 4
) -> tuple[torch.Tensor, ...]:
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


def quiet_export(wrapper: nn.Module, cfg: Any, path: Path, inputs, outputs, opset, exporter):
    """`export_graph` without the exporter's noise (torchvision notes, axis renames, deprecations)."""
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
            export_graph(wrapper, cfg, example_inputs(cfg), path, inputs, outputs, opset, exporter)
        finally:
            registration.setLevel(level)


def export_graph(
    wrapper, cfg, args, path: Path, inputs, outputs, opset: int, exporter: str
) -> None:
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


def share_weights(out_dir: Path, graphs: list[str], data_file: str = WEIGHTS_FILE) -> int:
    """Move the initializers of `graphs` (file names in `out_dir`) into `out_dir/data_file`.

    Each distinct tensor (by its bytes) is written once and every initializer holding those
    bytes points at the same offset, across graphs and within one. Initializers under
    `EXTERNAL_MIN_BYTES` stay inline. The graphs are rewritten in place; returns the data
    file's size in bytes. Graphs that already use external data are read through it.
    """
    from onnx import external_data_helper, numpy_helper

    models = [onnx.load(str(out_dir / g)) for g in graphs]  # external data read in, if any
    placed: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length)
    tmp = out_dir / f"{data_file}.partial"
    with tmp.open("wb") as f:
        for model in models:
            for init in model.graph.initializer:
                if init.data_type == onnx.TensorProto.STRING:
                    continue
                if not init.HasField("raw_data"):  # typed fields (float_data, ...) → raw bytes
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
                raw = init.raw_data
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in placed:
                    offset = f.tell()
                    if len(raw) >= ALIGN_FROM_BYTES and offset % ALIGNMENT:
                        f.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
                        offset = f.tell()
                    f.write(raw)
                    placed[key] = (offset, len(raw))
                offset, length = placed[key]
                external_data_helper.set_external_data(init, data_file, offset, length)
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
        size = f.tell()
    tmp.replace(out_dir / data_file)
    for name, model in zip(graphs, models, strict=True):
        (out_dir / name).write_bytes(model.SerializeToString())  # the graph alone, no weights
    return size


def graph_bytes(path: Path) -> int:
    """Bytes on disk of the graph at `path` plus the external-data files it reads (each once)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def write_sidecar(out_dir: Path, meta: dict[str, Any]) -> None:
    (out_dir / SIDECAR).write_text(json.dumps(meta, indent=2))
