"""The runtime seam: one interface over torch, ONNX Runtime and TensorRT.

KV cache layout (one decision, shared by every runtime)
-------------------------------------------------------
A running batch of B sequences carries a `KVState`:

* `keys[i]`, `values[i]` for layer i: `[B, H, P, D]` (batch, heads, past length, head_dim).
  P is the *common* past length: shorter rows are **left-padded** with zeros.
* `mask`: `[B, P]` int64, 1 where the cache column holds a real token, 0 for padding.
* `positions`: `[B]` int64, the position id of each row's *next* token
  (= number of real tokens so far), so position ids never count padding.

Operations:

* `prefill(seqs)` left-pads a batch of token lists to their longest length, runs them, and
  returns the logits of each row's last real token `[B, V]` and a fresh `KVState`.
* `decode(tokens, state)` feeds one token per row `[B]`, appends one column to the cache
  (mask 1), and returns `[B, V]` logits and the grown state.
* `merge(a, b)` (a request joining a running batch): left-pads the state with the shorter past
  to the longer one's P and concatenates along the batch axis.
* `select(state, rows)` (requests leaving): index-selects rows, then drops leading columns
  that are padding for every remaining row, so P never grows past the longest live row.

Tensors are torch tensors on the runtime's device (ONNX Runtime's numpy buffers are wrapped
with `torch.from_numpy`, zero-copy), so the engine samples on them without knowing the runtime.
Logits are always float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar, runtime_checkable

import torch

P = ParamSpec("P")
R = TypeVar("R")


def inference_mode_once(method: Callable[P, R]) -> Callable[P, R]:
    """`torch.inference_mode()` around a per-token method, entered only when the caller has not
    entered it already: the engine's worker runs every step in it, and entering it again costs
    about 15 us, once per decoded token."""

    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode():
            return method(*args, **kwargs)

    return run


@dataclass
class KVState:
    """A padded KV cache for a batch; see the module docstring for shapes."""

    keys: list[torch.Tensor]  # per layer: (B, H, P, D)
    values: list[torch.Tensor]  # per layer: (B, H, P, D)
    mask: torch.Tensor  # (B, P) int64, 1 = real token
    positions: torch.Tensor  # (B,) int64, next position id per row

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def past_length(self) -> int:
        return int(self.mask.shape[1])


@dataclass(frozen=True)
class RuntimeInfo:
    """What a loaded runtime is and can do."""

    runtime: str  # "torch" | "onnxruntime" | "tensorrt"
    context_length: int  # n_positions: prompt + generated tokens must fit
    vocab_size: int
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "float16", "bfloat16", "int8"
    num_layers: int
    num_heads: int
    head_dim: int
    threads: int  # intra-op threads this runtime uses (reported, set explicitly)
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """Anything that can prefill and decode a batch with a KV cache."""

    info: RuntimeInfo

    def prefill(self, seqs: list[list[int]]) -> tuple[torch.Tensor, KVState]:
        """Run prompts (left-padded together); return last-token logits (B, V) and the cache."""
        ...

    def decode(self, tokens: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        """Feed one token per row (B,); return logits (B, V) and the cache grown by one column."""
        ...

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, T, V) for unpadded blocks (B, T): evaluation and parity."""
        ...


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `input_ids` (B, T) and `attention_mask` (B, T) int64."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("prefill needs at least one non-empty sequence per row")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def prompt_batch(
    seqs: list[list[int]], context_length: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`left_pad` on `device`; ValueError when the longest prompt exceeds `context_length`."""
    ids, mask = left_pad(seqs)
    if ids.shape[1] > context_length:
        raise ValueError(f"prompt of {ids.shape[1]} tokens exceeds context length {context_length}")
    return ids.to(device), mask.to(device)


def scored_ids(
    input_ids: torch.Tensor, context_length: int, device: torch.device | str
) -> torch.Tensor:
    """`score`'s (B, T) ids as int64 on `device`; ValueError past `context_length`."""
    length = input_ids.shape[1]
    if length > context_length:
        raise ValueError(f"{length} tokens exceed context length {context_length}")
    return input_ids.to(device, torch.long)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that skip left padding: 0 for the first real token of each row."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def pad_left(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    """`t` with `extra` zero columns in front along `dim` (a batch's past grows to the left)."""
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def merge(a: KVState, b: KVState) -> KVState:
    """Concatenate two batches, left-padding the shorter past to the longer one's length."""
    width = max(a.past_length, b.past_length)
    pa, pb = width - a.past_length, width - b.past_length
    keys = [
        torch.cat([pad_left(x, pa, 2), pad_left(y, pb, 2)])
        for x, y in zip(a.keys, b.keys, strict=True)
    ]
    values = [
        torch.cat([pad_left(x, pa, 2), pad_left(y, pb, 2)])
        for x, y in zip(a.values, b.values, strict=True)
    ]
    mask = torch.cat([pad_left(a.mask, pa, 1), pad_left(b.mask, pb, 1)])
    return KVState(keys, values, mask, torch.cat([a.positions, b.positions]))


def select(state: KVState, rows: list[int]) -> KVState:
    """Keep `rows` (in that order) and trim columns that are padding for every kept row."""
    index = torch.tensor(rows, dtype=torch.long, device=state.mask.device)
    mask = state.mask.index_select(0, index)
    live = mask.any(dim=0).nonzero()
    start = int(live[0]) if len(live) else mask.shape[1]
    keys = [k.index_select(0, index)[:, :, start:] for k in state.keys]
    values = [v.index_select(0, index)[:, :, start:] for v in state.values]
    return KVState(keys, values, mask[:, start:], state.positions.index_select(0, index))


TORCH_THREADS_ENV = "SLIMSERVE_TORCH_THREADS"


def resolve_threads(threads: int | None, envs: Sequence[str] = (TORCH_THREADS_ENV,)) -> int:
    """Explicit value, else the first of `envs` that is set, else every CPU (Ray would give
    a fractional-CPU replica one thread by accident)."""
    if threads is None:
        for env in envs:
            raw = os.environ.get(env)
            if raw:
                try:
                    threads = int(raw)
                except ValueError as exc:
                    raise ValueError(f"{env} must be an integer, got {raw!r}") from exc
                break
        else:
            threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def resolve_device(device: str | None, gpu_missing: str | None = None) -> torch.device:
    """The device a runtime loads onto: "cpu" or "cuda:N" (an index always, so it can be
    reported). None picks CUDA when torch sees a GPU and the backend can use it (`gpu_missing`
    is None: why the backend's package cannot run on a GPU); "cuda" is the current CUDA device.
    """
    if device is None:
        device = "cuda" if gpu_missing is None and torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if gpu_missing is not None:
        raise ValueError(f"device {device!r} requested but {gpu_missing}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
