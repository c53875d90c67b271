"""The ONNX Runtime runtime: a `model.onnx` with the KV cache, on CPU or CUDA.

The graph (written by `build_engines.onnx_export`) is one graph for prefill and decode:

* inputs  `input_ids` (B, T) int64, `attention_mask` (B, P + T) int64, `position_ids` (B, T)
  int64, `past_key_values.{i}.key` / `.value` (B, H, P, D) float32, where P may be 0;
* outputs `logits` (B, T, V) float32, `present.{i}.key` / `.value` (B, H, P + T, D) float32.

That is exactly `slimserve.runtimes.base`'s layout, so prefill feeds an empty past and decode
feeds the state's tensors back.

On CPU, when the sidecar names an append graph (`"append"`, written by
`build_engines.onnx_append`), that graph is loaded instead: it takes the past as the whole
preallocated buffer of an arena (`slimserve.runtimes.arena`, (B, H, C, D), masked past the
real columns) and returns only the new columns `new.{i}.key` / `.value` (B, H, T, D), which
decode writes into the arena in place, where the standard graph copies the whole cache every
step (a batch-16 decode of the tiny student took 0.75 of the time). Select and merge then
build arenas too.

An export folder keeps both graphs' weights once, in `model.onnx.data`, which ONNX Runtime reads
next to the graph it loads (older folders carry the weights inside each graph; both load). A
runtime opens one graph, never both: each session holds its own prepacked copy of the weights,
and giving two sessions the same initializers (`SessionOptions.add_initializer` over a memmap of
the file) shares none of it, since each session still packs its own (GPT-2-124M shape: one
session +632 MB, two +1253 MB plain and +1577 MB with shared initializers; turning prepacking
off keeps the weights in the file's shared pages but doubled a batch-8 decode step's CPU time).

Both graphs from this exporter also take `logits_to_keep` (int64, shape (1,)): logits come
only for the last N positions, and N defaults to the context length (every position) when not
fed. Prefill feeds 1 on CPU (it needs one row per prompt); a graph without that input is still
served, computing every position's logits.

On CPU the numpy views of torch tensors go in and ORT's numpy outputs come back wrapped with
`torch.from_numpy` (no copies on either side). On CUDA (when `onnxruntime-gpu` provides
'CUDAExecutionProvider') inputs and outputs are torch CUDA tensors bound with I/O binding:
without it, logits and the whole cache would cross PCIe every step.

CUDA details that fail silently otherwise:
* ORT computes on a torch stream of its own (`user_compute_stream`), which waits for torch's
  current stream before each run (the inputs were written there) and which torch's stream
  waits for after it (the outputs are read there); handing ORT the default stream ("0") does
  not order it after torch's work;
* TF32 is off (`use_tf32=0`) so an fp32 graph computes in fp32, as its parity check did;
* ORT falls back to CPU without an error when the CUDA provider cannot load (missing CUDA or
  cuDNN libraries): `load` checks that CUDA is the session's first provider.

This module reads `config.json` as plain JSON and never imports transformers, so an ONNX
replica loads only onnxruntime, torch tensors and `tokenizers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from slimserve.runtimes.arena import Arena, ArenaKVState, Arenas
from slimserve.runtimes.base import (
    KVState,
    RuntimeInfo,
    inference_mode_once,
    position_ids_from_mask,
    prompt_batch,
    resolve_device,
    resolve_threads,
    scored_ids,
)
from slimserve.runtimes.spec import ONNXRUNTIME, onnxruntime_gpu_missing

SIDECAR = str(ONNXRUNTIME.files.sidecar)  # "onnx.json": the model file, precision, graph
LOGITS_TO_KEEP = "logits_to_keep"  # optional graph input: logits of the last N positions only
THREADS_ENVS = ("SLIMSERVE_ORT_THREADS", "SLIMSERVE_TORCH_THREADS")
_NP_TYPES = {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order (shared with the exporter and TensorRT)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def append_output_names(num_layers: int) -> list[str]:
    """The append graph's outputs: logits, then each layer's new key and value columns."""
    new = [f"new.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["logits", *new]


def read_model_config(folder: Path) -> dict[str, int]:
    """n_layer / n_head / n_embd / n_positions / vocab_size from a GPT-2 `config.json`."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (an ONNX artifact carries its parent's)")
    cfg = json.loads(path.read_text())
    try:
        return {
            k: int(cfg[k]) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
        }
    except KeyError as exc:
        raise ValueError(f"{path}: not a GPT-2 config (missing {exc})") from exc


def read_sidecar(folder: Path) -> dict[str, Any]:
    """What the build step recorded about the graph; defaults for a bare `model.onnx`."""
    path = folder / SIDECAR
    meta: dict[str, Any] = {"model": "model.onnx", "precision": "float32"}
    if path.is_file():
        meta.update(json.loads(path.read_text()))
    return meta


@dataclass
class _HostArena:
    """numpy views of the arena the append graph decodes into, and the mask it is fed.

    `buffers`: layer 0's key and value (B, H, C, D), then layer 1's, ... (the graph's input and
    output order). `fed` (B, C + 1) int64: the newest state's mask in columns [0, length),
    zeros (masked) up to C, and 1 at column C for the new token, which the graph places after
    the buffer. An arena only grows at column `length`, so setting that column of `fed` when
    it is written keeps `fed` exact without rebuilding it; `mask` is `fed` as a torch tensor.
    `feeds`: the graph's inputs that stay the same arrays from step to step (the buffers, `fed`
    and the constant ones); each step sets only `input_ids` and `position_ids`.
    """

    buffers: list[np.ndarray]
    fed: np.ndarray
    mask: torch.Tensor
    feeds: dict[str, np.ndarray]

    @staticmethod
    def of(
        arena: Arena, mask: torch.Tensor, names: list[str], constant: dict[str, np.ndarray]
    ) -> _HostArena:
        """`arena`'s views, built on its first decode (its newest state has the (B, P) `mask`;
        `names`: the past inputs, in `buffers`' order) and kept on the arena (`Arena.views`), so
        they live exactly as long as it does."""
        if isinstance(arena.views, _HostArena):
            return arena.views
        batch, past = mask.shape
        fed = torch.zeros((batch, arena.capacity + 1), dtype=torch.int64)
        fed[:, :past] = mask
        fed[:, arena.capacity] = 1
        pairs = zip(arena.keys, arena.values, strict=True)
        buffers = [t.numpy() for pair in pairs for t in pair]
        feeds = dict(zip(names, buffers, strict=True)) | constant
        feeds["attention_mask"] = fed.numpy()
        arena.views = _HostArena(buffers, feeds["attention_mask"], fed, feeds)
        return arena.views


class OnnxRuntime:
    """An ORT session behind the `Runtime` protocol (see base.py for shapes)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        info: RuntimeInfo,
        stream: Any = None,
        append: bool = False,
    ):
        self.session = session
        self.info = info
        self.device = torch.device(info.device)
        self.stream = stream  # ORT's CUDA compute stream (a torch.cuda.Stream), None on CPU
        self.input_names, self.output_names = io_names(info.num_layers)
        self.append = append  # the append graph (CPU): the cache lives in arenas
        if append:
            self.output_names = append_output_names(info.num_layers)
            self._arenas = Arenas(info.context_length, zeroed=True)  # the graph reads every column
            self.select, self.merge = self._arenas.select, self._arenas.merge
        self.io_binding = self.device.type == "cuda"  # CPU: plain `run` on numpy views
        self._dummy = torch.zeros(1, device=self.device)  # an address for empty inputs
        overridable = {i.name for i in session.get_overridable_initializers()}
        # Fed on the CPU `run` path only; with I/O binding every position's logits come back.
        self.keeps_logits = LOGITS_TO_KEEP in overridable and not self.io_binding
        self._keep_last = {LOGITS_TO_KEEP: np.array([1], dtype=np.int64)}
        self._past_names = self.input_names[3:]  # past_key_values.{i}.key / .value, in order
        missing = set(self.input_names) - {i.name for i in session.get_inputs()}
        if missing:
            raise ValueError(f"ONNX graph lacks the KV-cache inputs {sorted(missing)}")

    # -- one forward pass -----------------------------------------------------------------------

    def _forward(
        self,
        ids: torch.Tensor,  # (B, T) int64
        mask: torch.Tensor,  # (B, P + T) int64
        positions: torch.Tensor,  # (B, T) int64
        keys: list[torch.Tensor],  # per layer (B, H, P, D)
        values: list[torch.Tensor],
        last_only: bool = False,
    ) -> list[torch.Tensor]:
        """[logits (B, T, V), present.0.key, present.0.value, ...] as torch tensors.

        `last_only`: the graph may return logits (B, 1, V) for the last position only."""
        past: list[torch.Tensor] = []
        for k, v in zip(keys, values, strict=True):
            past += [k, v]
        inputs = [ids, mask, positions, *past]
        if self.io_binding:
            return self._forward_bound(inputs)
        feeds = {
            name: t.contiguous().numpy() for name, t in zip(self.input_names, inputs, strict=True)
        }
        if last_only and self.keeps_logits:
            feeds.update(self._keep_last)
        return [torch.from_numpy(a) for a in self.session.run(self.output_names, feeds)]

    def _forward_bound(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """I/O binding: inputs and preallocated outputs stay torch tensors on the device (on CUDA:
        no host round trip per step). Also usable on CPU, where it is no faster than `run`."""
        b, t = inputs[0].shape
        total = inputs[1].shape[1]
        h, d = self.info.num_heads, self.info.head_dim
        kind, index = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        keep = []  # every bound tensor must outlive the run
        for name, tensor in zip(self.input_names, inputs, strict=True):
            tensor = tensor.to(self.device).contiguous()
            # An empty past (prefill) may have no storage: bind a real, unused address, not 0.
            storage = tensor if tensor.numel() else self._dummy
            keep.append(tensor)
            binding.bind_input(
                name,
                kind,
                index,
                _NP_TYPES[tensor.dtype],
                tuple(tensor.shape),
                storage.data_ptr(),
            )
        shapes = [(b, t, self.info.vocab_size)] + [(b, h, total, d)] * (2 * self.info.num_layers)
        outputs = [torch.empty(s, dtype=torch.float32, device=self.device) for s in shapes]
        for name, tensor in zip(self.output_names, outputs, strict=True):
            binding.bind_output(
                name, kind, index, np.float32, tuple(tensor.shape), tensor.data_ptr()
            )
        if self.stream is not None:  # ORT's stream reads what torch's stream wrote
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.session.run_with_iobinding(binding)
        if self.stream is not None:  # and torch reads the outputs only once ORT has written them
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        del keep
        return outputs

    def _empty_past(self, batch: int) -> list[torch.Tensor]:
        h, d = self.info.num_heads, self.info.head_dim
        return [
            torch.zeros((batch, h, 0, d), dtype=torch.float32, device=self.device)
            for _ in range(self.info.num_layers)
        ]

    # -- the protocol ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[list[int]]) -> tuple[torch.Tensor, KVState]:
        ids, mask = prompt_batch(seqs, self.info.context_length, self.device)  # (B, T) each
        empty = self._empty_past(len(seqs))
        out = self._forward(ids, mask, position_ids_from_mask(mask), empty, empty, last_only=True)
        state = KVState(list(out[1::2]), list(out[2::2]), mask, mask.sum(dim=1))
        return out[0][:, -1], state  # left padding: every row's last real token is column -1

    @inference_mode_once
    def decode(self, tokens: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        if state.past_length + 1 > self.info.context_length:
            raise ValueError(
                f"decode past the context length {self.info.context_length} "
                f"(past {state.past_length})"
            )
        batch = state.batch_size
        ids = tokens.to(self.device, torch.long).view(batch, 1)
        if self.append:
            return self._decode_append(ids, state)
        ones = torch.ones((batch, 1), dtype=state.mask.dtype, device=state.mask.device)
        mask = torch.cat([state.mask, ones], dim=1)  # (B, P + 1)
        out = self._forward(ids, mask, state.positions.view(batch, 1), state.keys, state.values)
        new_state = KVState(list(out[1::2]), list(out[2::2]), mask, state.positions + 1)
        return out[0][:, -1], new_state

    def _decode_append(self, ids: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        """Decode on the append graph: the arena's whole buffers go in, the new column is
        written at index P.

        This runs once per token, so it stays in numpy (a torch op costs a few microseconds
        more each, and there were about twenty): the arena's buffers and its fed mask are
        numpy views (`_HostArena`), built once per arena."""
        past = state.past_length
        arena = self._arenas.writable(state)
        constant = self._keep_last if self.keeps_logits else {}
        host = _HostArena.of(arena, state.mask, self._past_names, constant)
        feeds = host.feeds
        feeds["input_ids"] = ids.numpy()
        feeds["position_ids"] = state.positions.view(-1, 1).numpy()
        out = self.session.run(self.output_names, feeds)
        for buf, new in zip(host.buffers, out[1:], strict=True):
            buf[:, :, past] = new[:, :, 0]
        host.fed[:, past] = 1  # the written column is real from now on
        arena.length = past + 1
        # The grown mask is a view of `fed`: later steps write only columns past it.
        mask = host.mask[:, : past + 1]
        keys = [k[:, :, : past + 1] for k in arena.keys]
        values = [v[:, :, : past + 1] for v in arena.values]
        new_state = ArenaKVState(keys, values, mask, state.positions + 1, arena)
        return torch.from_numpy(out[0][:, -1]), new_state

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = scored_ids(input_ids, self.info.context_length, self.device)
        batch, length = ids.shape
        mask = torch.ones_like(ids)
        positions = torch.arange(length, device=self.device).expand(batch, length)
        empty = self._empty_past(batch)
        return self._forward(ids, mask, positions, empty, empty)[0]  # (B, T, V)


def session_options(threads: int) -> ort.SessionOptions:
    """Sequential execution, `threads` intra-op threads, every graph optimisation on.

    Idle intra-op threads sleep instead of spinning: a serving replica shares its cores with
    the proxy, the ingress and other replicas, and a spinning pool burns the CPU they need
    between two of its ops."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    return so


def cuda_options(dev: str, stream: Any) -> dict[str, str]:
    """CUDAExecutionProvider options: the device, ORT's own compute stream, no TF32."""
    return {
        "device_id": str(torch.device(dev).index or 0),
        "user_compute_stream": str(stream.cuda_stream),
        "use_tf32": "0",
    }


def check_cuda_session(session: Any, dev: str) -> None:
    """Raise unless CUDA is the session's first provider (ORT falls back to CPU silently)."""
    active = session.get_providers()
    if not active or active[0] != "CUDAExecutionProvider":
        raise RuntimeError(
            f"device {dev!r}: ONNX Runtime did not load its CUDA provider (session providers: "
            f"{', '.join(active) or 'none'}); check the CUDA and cuDNN libraries that "
            "onnxruntime-gpu needs, or load with device='cpu'"
        )


def load(
    folder: str | Path,
    *,
    device: str | None = None,
    threads: int | None = None,
) -> OnnxRuntime:
    """Load an ONNX artifact folder (`model.onnx` or the sidecar's file, plus `config.json`).

    device: "cpu", "cuda", "cuda:N" or None (CUDA when onnxruntime-gpu and a GPU are present).
    threads: ORT intra-op threads (None: $SLIMSERVE_ORT_THREADS, $SLIMSERVE_TORCH_THREADS, else
    os.cpu_count()). There is no dtype: the precision is the graph's.
    """
    folder = Path(folder)
    cfg = read_model_config(folder)
    meta = read_sidecar(folder)
    n_threads = resolve_threads(threads, THREADS_ENVS)
    dev = str(resolve_device(device, onnxruntime_gpu_missing(ort)))
    # The append graph serves CPU only: the CUDA path binds the standard graph's outputs.
    append = dev == "cpu" and bool(meta.get("append"))
    name = meta["append"] if append else meta["model"]
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {name}")
    stream = None
    if dev == "cpu":
        providers: list[Any] = ["CPUExecutionProvider"]
    else:
        stream = torch.cuda.Stream(torch.device(dev))
        providers = [("CUDAExecutionProvider", cuda_options(dev, stream)), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), session_options(n_threads), providers=providers)
    if dev != "cpu":
        check_cuda_session(session, dev)
    info = RuntimeInfo(
        runtime="onnxruntime",
        context_length=cfg["n_positions"],
        vocab_size=cfg["vocab_size"],
        device=dev,
        dtype=str(meta["precision"]),
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        head_dim=cfg["n_embd"] // cfg["n_head"],
        threads=n_threads,
        extra={
            "file": name,
            "providers": ",".join(session.get_providers()),
            "graph": "append" if append else str(meta.get("graph", "standard")),
            "folder": str(folder),
        },
    )
    return OnnxRuntime(session, info, stream, append)
