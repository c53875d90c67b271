"""The TensorRT runtime: a `model.plan` built by build-trt, on one NVIDIA GPU.

The engine has the ONNX graph's signature (`slimserve.runtimes.onnx_rt`), with one difference:
a TensorRT optimization profile needs every axis ≥ 1, so the past is never empty. Prefill feeds
one zero key/value column with attention mask 0, a left-padding column in the shared KV layout
(base.py), so decode, `merge` and `select` need nothing special, and position ids (which skip
padding) are unchanged.

Execution uses the name-based API of TensorRT 10/11: iterate `num_io_tensors` /
`get_tensor_name` / `get_tensor_mode`, `set_input_shape` for every input, read each output's
shape back from the context, `set_tensor_address` for every tensor, `execute_async_v3(stream)`.

Buffers: by default torch CUDA tensors (`TorchBuffers`): the state stays on the GPU and the
engine shares torch's CUDA context. The engine runs on a stream of its own (TensorRT on the
default stream adds a device-wide sync per `enqueueV3`), ordered after torch's current stream
before each run and before it again after, so stream order replaces host syncs.
`backend="pycuda"` (or $SLIMSERVE_TRT_BACKEND=pycuda, extra `[pycuda]`) allocates device
memory with PyCUDA and keeps the state on the host, for a torch build without CUDA; it pushes
the device's primary context on whichever thread runs the engine (a context made current by
`pycuda.autoinit` is current on the loading thread only).

Limits come from the engine's optimization profile, not only from `n_positions`: the context
length is min(n_positions, past.max) (prompt + generated tokens, the padding column included
in the past), prompts longer than sequence.max are prefilled in chunks (each chunk's present
is the next one's past), and batches wider than batch.max run in row groups, so no request
the runtime admits can make a whole running batch fail. One execution context serves every
thread: runs are serialized by a lock (the engine's decode loop and `/compare` scoring on a
worker thread would otherwise overwrite each other's shapes and addresses).
`tensorrt` (and pycuda) are imported only inside `load`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from slimserve.runtimes.base import (
    KVState,
    RuntimeInfo,
    position_ids_from_mask,
    prompt_batch,
    scored_ids,
)
from slimserve.runtimes.spec import TENSORRT

PLAN_FILE = TENSORRT.files.weights[0]  # "model.plan"
SIDECAR = str(TENSORRT.files.sidecar)  # "trt.json": plan, precision, profile limits, versions
BACKEND_ENV = "SLIMSERVE_TRT_BACKEND"
# TensorRT DataType enum names → torch dtypes (enum `.name`, so fakes can stand in for trt).
DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "BOOL": torch.bool,
}


class Buffers(Protocol):
    """Where one execution's tensors live; `begin` → inputs / outputs → `finish`."""

    device: torch.device

    def begin(self) -> None: ...
    def input(self, tensor: torch.Tensor, dtype: torch.dtype) -> int: ...
    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> int: ...
    def stream(self) -> int: ...
    def finish(self) -> list[torch.Tensor]: ...
    def reset(self) -> None: ...


class TorchBuffers:
    """Buffers are torch tensors on `device`; on CUDA the engine runs on a stream of its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self._keep: list[torch.Tensor] = []
        self._outs: list[torch.Tensor] = []
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def begin(self) -> None:
        self._keep, self._outs = [], []

    def reset(self) -> None:
        self._keep, self._outs = [], []

    def input(self, tensor: torch.Tensor, dtype: torch.dtype) -> int:
        t = tensor.to(self.device, dtype).contiguous()
        self._keep.append(t)  # alive until the engine has read it (stream-ordered after that)
        return t.data_ptr()

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self._outs.append(t)
        return t.data_ptr()

    def stream(self) -> int:
        """The engine's stream, after the work that wrote this run's inputs (torch's stream)."""
        if self._stream is None:
            return 0
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._stream.cuda_stream

    def finish(self) -> list[torch.Tensor]:
        if self._stream is not None:  # whoever reads the outputs waits for the engine
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        outs, self._keep, self._outs = self._outs, [], []
        return outs


class PyCudaBuffers:
    """Device memory from PyCUDA (reused per slot), host torch tensors in and out.

    The device's primary context (the one torch's runtime uses too) is pushed by `begin` and
    popped by `reset` on the thread that runs the engine, whichever thread that is.
    """

    def __init__(self, index: int = 0) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.device = torch.device("cpu")
        self._context = cuda.Device(index).retain_primary_context()
        self._pushed = False
        self._context.push()
        try:
            self._stream = cuda.Stream()  # non-default: no extra syncs per enqueue
        finally:
            self._context.pop()
        self._slots: dict[int, tuple[Any, int]] = {}  # slot → (DeviceAllocation, bytes)
        self._next, self._hold, self._outs = 0, [], []

    def begin(self) -> None:
        self.reset()
        self._context.push()
        self._pushed = True

    def reset(self) -> None:
        if self._pushed:
            self._context.pop()
            self._pushed = False
        self._next, self._hold, self._outs = 0, [], []

    def _slot(self, nbytes: int) -> Any:
        slot, self._next = self._next, self._next + 1
        alloc, size = self._slots.get(slot, (None, 0))
        if size < nbytes:
            alloc = self.cuda.mem_alloc(max(nbytes, 1))
            self._slots[slot] = (alloc, nbytes)
        return alloc

    def input(self, tensor: torch.Tensor, dtype: torch.dtype) -> int:
        host = tensor.to("cpu", dtype).contiguous().numpy()
        dev = self._slot(host.nbytes)
        self.cuda.memcpy_htod_async(dev, host, self._stream)
        self._hold.append(host)
        return int(dev)

    def output(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        host = torch.empty(shape, dtype=dtype)
        dev = self._slot(host.numel() * host.element_size())
        self._outs.append((host, dev))
        return int(dev)

    def stream(self) -> int:
        return self._stream.handle

    def finish(self) -> list[torch.Tensor]:
        for host, dev in self._outs:
            self.cuda.memcpy_dtoh_async(host.numpy(), dev, self._stream)
        self._stream.synchronize()
        return [host for host, _ in self._outs]


class TrtRuntime:
    """A TensorRT engine behind the `Runtime` protocol (see base.py for shapes)."""

    def __init__(self, engine: Any, buffers: Buffers, info: RuntimeInfo, limits: dict, trt: Any):
        self.engine, self.buffers, self.info, self.limits = engine, buffers, info, limits
        self.device = buffers.device
        self.context = engine.create_execution_context()
        self._lock = threading.Lock()  # one context and one set of buffers: one run at a time
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: DTYPES[engine.get_tensor_dtype(n).name] for n in names}
        expected_out = ["logits"] + [
            f"present.{i}.{kv}" for i in range(info.num_layers) for kv in ("key", "value")
        ]
        if sorted(self.outputs) != sorted(expected_out):
            raise ValueError(f"engine outputs {self.outputs} are not GPT-2 KV-cache outputs")

    def _check(self, batch: int, seq: int, past: int) -> None:
        for axis, value in (("batch", batch), ("sequence", seq), ("past", past)):
            lo, hi = self.limits[axis]["min"], self.limits[axis]["max"]
            if not lo <= value <= hi:
                raise ValueError(
                    f"{axis} {value} is outside the engine's profile [{lo}, {hi}] "
                    "(rebuild build-trt with a larger profile)"
                )

    def _execute(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One run: ids / pos (B, T), mask (B, P + T), past [k0, v0, ...] (B, H, P, D)."""
        self._check(ids.shape[0], ids.shape[1], past[0].shape[2])
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.info.num_layers):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        with self._lock:
            self.buffers.begin()
            try:
                for name in self.inputs:
                    tensor = feeds[name]
                    self.context.set_input_shape(name, tuple(tensor.shape))
                    ptr = self.buffers.input(tensor, self.dtypes[name])
                    self.context.set_tensor_address(name, ptr)
                for name in self.outputs:
                    shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                    ptr = self.buffers.output(shape, self.dtypes[name])
                    self.context.set_tensor_address(name, ptr)
                if not self.context.execute_async_v3(self.buffers.stream()):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                return dict(zip(self.outputs, self.buffers.finish(), strict=True))
            finally:
                self.buffers.reset()

    def _run(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, past: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`_execute` within the profile: rows in groups of at most batch.max, tokens in chunks
        of at most sequence.max (each chunk's present is the next chunk's past)."""
        rows = int(self.limits["batch"]["max"])
        if ids.shape[0] > rows:
            parts = [
                self._run(
                    ids[i : i + rows],
                    mask[i : i + rows],
                    pos[i : i + rows],
                    [p[i : i + rows] for p in past],
                )
                for i in range(0, ids.shape[0], rows)
            ]  # every group has the same past length: outputs concatenate along the batch
            return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        step, length, p0 = int(self.limits["sequence"]["max"]), ids.shape[1], past[0].shape[2]
        logits, out = [], {}
        for start in range(0, length, step):
            end = min(length, start + step)
            out = self._execute(ids[:, start:end], mask[:, : p0 + end], pos[:, start:end], past)
            logits.append(out["logits"])
            past = [
                out[f"present.{i}.{kv}"]
                for i in range(self.info.num_layers)
                for kv in ("key", "value")
            ]
        out["logits"] = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
        return out

    def _state(self, out: dict[str, torch.Tensor], mask: torch.Tensor, positions: torch.Tensor):
        n = self.info.num_layers
        keys = [out[f"present.{i}.key"].float() for i in range(n)]
        values = [out[f"present.{i}.value"].float() for i in range(n)]
        return KVState(keys, values, mask, positions)

    def _pad_column(self, batch: int) -> list[torch.Tensor]:
        h, d = self.info.num_heads, self.info.head_dim
        return [torch.zeros((batch, h, 1, d), device=self.device)] * (2 * self.info.num_layers)

    # -- the protocol ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[list[int]]) -> tuple[torch.Tensor, KVState]:
        ids, mask = prompt_batch(seqs, self.info.context_length, self.device)  # (B, T) each
        batch = ids.shape[0]
        zero = torch.zeros((batch, 1), dtype=mask.dtype, device=self.device)
        full = torch.cat([zero, mask], dim=1)  # (B, 1 + T): the padding column first
        out = self._run(ids, full, position_ids_from_mask(mask), self._pad_column(batch))
        return out["logits"][:, -1].float(), self._state(out, full, mask.sum(dim=1))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        if int(state.positions.max()) >= self.info.context_length:
            raise ValueError(f"decode past the context length {self.info.context_length}")
        batch = state.batch_size
        ones = torch.ones((batch, 1), dtype=state.mask.dtype, device=state.mask.device)
        mask = torch.cat([state.mask, ones], dim=1)  # (B, P + 1)
        ids = tokens.to(self.device, torch.long).view(batch, 1)
        past = []
        for k, v in zip(state.keys, state.values, strict=True):
            past += [k, v]
        out = self._run(ids, mask, state.positions.view(batch, 1), past)
        return out["logits"][:, -1].float(), self._state(out, mask, state.positions + 1)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = scored_ids(input_ids, self.info.context_length, self.device)
        batch, length = ids.shape
        mask = torch.ones((batch, 1 + length), dtype=torch.long, device=self.device)
        mask[:, 0] = 0
        pos = torch.arange(length, device=self.device).expand(batch, length)
        return self._run(ids, mask, pos, self._pad_column(batch))["logits"].float()


def _model_config(folder: Path) -> dict[str, int]:
    cfg = json.loads((folder / "config.json").read_text())
    return {k: int(cfg[k]) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}


def profile_context(n_positions: int, limits: dict) -> int:
    """Prompt + generated tokens the engine can hold: the model's context, capped by the
    profile's past axis (the last decode step feeds a past of 1 padding column + all tokens
    but the newest one)."""
    return min(int(n_positions), int(limits["past"]["max"]))


def make_buffers(backend: str, device: str | None) -> Buffers:
    """Buffers for `backend`: "torch" (torch CUDA tensors) or "pycuda" (host state)."""
    if backend == "pycuda":
        index = torch.device(device).index if device else None
        return PyCudaBuffers(index or 0)
    if backend != "torch":
        raise ValueError(f"TensorRT buffer backend must be 'torch' or 'pycuda', got {backend!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("the TensorRT runtime needs a CUDA GPU visible to torch (or pycuda)")
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        raise ValueError(f"TensorRT runs on CUDA devices only, got {device!r}")
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    torch.cuda.init()  # the primary context exists before TensorRT deserializes into it
    return TorchBuffers(dev)


def load(
    folder: str | Path,
    *,
    device: str | None = None,
    backend: str | None = None,
) -> TrtRuntime:
    """Load a build-trt artifact (`model.plan`, `trt.json`, `config.json`) onto a GPU.

    device: "cuda" / "cuda:N" / None. backend: "torch" (default) or "pycuda" (or
    $SLIMSERVE_TRT_BACKEND). No threads or dtype: the engine fixed its precision and runs on
    the GPU.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(
            "the tensorrt package is not installed (pip install 'slimserve[tensorrt]')"
        ) from exc
    folder = Path(folder)
    meta = json.loads((folder / SIDECAR).read_text())
    cfg = _model_config(folder)
    buffers = make_buffers(backend or os.environ.get(BACKEND_ENV, "torch"), device)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        (folder / meta.get("plan", PLAN_FILE)).read_bytes()
    )
    if engine is None:
        raise RuntimeError(
            f"{folder}: cannot deserialize the engine (built with TensorRT "
            f"{meta.get('tensorrt_version')} on {meta.get('gpu')}; this is TensorRT "
            f"{trt.__version__}): rebuild it with build-trt on this machine"
        )
    limits = meta["limits"]
    info = RuntimeInfo(
        runtime="tensorrt",
        context_length=profile_context(cfg["n_positions"], limits),
        vocab_size=cfg["vocab_size"],
        device=str(buffers.device) if buffers.device.type == "cuda" else "cuda (pycuda)",
        dtype="float16" if meta.get("precision") == "fp16" else "float32",
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        head_dim=cfg["n_embd"] // cfg["n_head"],
        threads=1,
        extra={
            "tensorrt": trt.__version__,
            "backend": type(buffers).__name__,
            "profile": ", ".join(f"{k} <= {v['max']}" for k, v in limits.items()),
        },
    )
    return TrtRuntime(engine, buffers, info, limits, trt)
