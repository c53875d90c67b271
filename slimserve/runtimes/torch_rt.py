"""The PyTorch runtime: any Hugging Face GPT-2 folder, on CPU or CUDA, in fp32 / fp16 / bf16.

Prefill and decode follow `slimserve.runtimes.base` (left padding, attention mask, position ids
that skip padding). The KV cache crosses the seam as plain per-layer (B, H, P, D) tensors.

A GPT-2 model decodes through `gpt2_step.DecodeStep`: the same operations on the same weights
without transformers' module stack, which is most of a small model's step on a CPU. Other
models (and prefill) go through the HF forward. There, the cache is handed to the model
through a transformers `DynamicCache` whose layers are set by
assignment (building one with `DynamicCache(pairs)` would `update`, i.e. concatenate onto an
empty tensor: a full copy), and HF's own `DynamicLayer.update` would `torch.cat` the whole
cache again at every step. Instead each layer's keys and values live in an arena
(`slimserve.runtimes.arena`: buffers with spare columns, of which the state's tensors are
views), and a decode writes its one new column in place; the runtime's `select` and `merge`
(requests leaving and joining the batch; the engine uses them instead of base.py's) write
their result straight into a new arena.
So per step the cache costs one column, not a copy; measured on CPU with a GPT-2-124M-sized
model at batch 8, past 400: ~90 ms/step against ~135-165 ms with per-step concatenation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer

from slimserve.runtimes.arena import ArenaKVState, Arenas
from slimserve.runtimes.base import (
    KVState,
    RuntimeInfo,
    inference_mode_once,
    position_ids_from_mask,
    prompt_batch,
    resolve_device,
    resolve_threads,
)
from slimserve.runtimes.gpt2_step import DecodeStep

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """None is float32 on CPU and float16 on CUDA."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class _ArenaLayer(DynamicLayer):
    """A DynamicLayer that writes new columns into its arena's buffers instead of concatenating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.buf_keys, self.buf_values, self.past = keys, values, past  # (B, H, C, D)
        self.keys, self.values = keys[:, :, :past], values[:, :, :past]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.past + key_states.shape[2]
        self.buf_keys[:, :, self.past : end].copy_(key_states)
        self.buf_values[:, :, self.past : end].copy_(value_states)
        self.keys, self.values = self.buf_keys[:, :, :end], self.buf_values[:, :, :end]
        return self.keys, self.values


class TorchRuntime:
    """A GPT-2 `*LMHeadModel` behind the `Runtime` protocol (see base.py for shapes)."""

    def __init__(self, model: torch.nn.Module, info: RuntimeInfo):
        self.model = model.eval()
        self.info = info
        self.device = next(model.parameters()).device
        self._step = DecodeStep.of(self.model)  # None: decode through the HF modules
        self._arenas = Arenas(info.context_length)
        self.select = self._arenas.select  # base.py's contract, built into a roomy arena
        self.merge = self._arenas.merge

    # -- the protocol ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[list[int]]) -> tuple[torch.Tensor, KVState]:
        ids, mask = prompt_batch(seqs, self.info.context_length, self.device)  # (B, T) each
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # left padding puts every row's last real token in the last column
        )
        keys = [layer.keys for layer in cache.layers]  # (B, H, T, D) each
        values = [layer.values for layer in cache.layers]
        state = KVState(keys, values, mask, mask.sum(dim=1))
        return out.logits[:, -1].float(), state  # (B, V)

    @inference_mode_once
    def decode(self, tokens: torch.Tensor, state: KVState) -> tuple[torch.Tensor, KVState]:
        # Under base.py's invariants the longest row has no padding, so P is its position.
        if state.past_length + 1 > self.info.context_length:
            raise ValueError(
                f"decode past the context length {self.info.context_length} (past {state.past_length})"
            )
        batch, past = state.batch_size, state.past_length
        arena = self._arenas.writable(state)
        arena.length = past + 1
        cache = DynamicCache()
        cache.layers = [
            _ArenaLayer(k, v, past) for k, v in zip(arena.keys, arena.values, strict=True)
        ]
        ones = torch.ones((batch, 1), dtype=state.mask.dtype, device=state.mask.device)
        mask = torch.cat([state.mask, ones], dim=1)  # (B, P + 1)
        if self._step is not None:
            ids = tokens.to(self.device, torch.long).view(batch)
            logits = self._step(
                ids, state.positions.view(batch), arena.keys, arena.values, past, self._mask(mask)
            )
            keys = [k[:, :, : past + 1] for k in arena.keys]
            values = [v[:, :, : past + 1] for v in arena.values]
            return logits, ArenaKVState(keys, values, mask, state.positions + 1, arena)
        out = self.model(
            input_ids=tokens.to(self.device, torch.long).view(batch, 1),
            attention_mask=mask,
            position_ids=state.positions.view(batch, 1),
            past_key_values=cache,
            use_cache=True,
        )
        keys = [layer.keys for layer in cache.layers]  # (B, H, P + 1, D) views of the arena
        values = [layer.values for layer in cache.layers]
        new_state = ArenaKVState(keys, values, mask, state.positions + 1, arena)
        return out.logits[:, -1].float(), new_state

    def _mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The decode step's mask, or None when no row is padded (cheaper attention). Padding
        is on the left, so column 0 is real in every row exactly when nothing is padded; on
        CUDA the mask is always passed (the check would synchronise the device)."""
        if self.device.type == "cpu" and bool(mask[:, 0].all()):
            return None
        return mask

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device, torch.long), use_cache=False)
        return out.logits.float()  # (B, T, V)


def load(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
) -> TorchRuntime:
    """Load a Hugging Face GPT-2 folder (`config.json` + weights) as a `TorchRuntime`.

    device: "cpu", "cuda", "cuda:N" or None (CUDA when present). dtype: float32 / float16 /
    bfloat16 (or fp32 / fp16 / bf16), None = float32 on CPU, float16 on CUDA. threads: torch
    intra-op threads, set process-wide with `torch.set_num_threads` (None: $SLIMSERVE_TORCH_THREADS,
    else os.cpu_count()).
    """
    folder = Path(folder)
    n_threads = resolve_threads(threads)
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    torch.set_num_threads(n_threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=tdtype)
    model.to(dev).eval()
    cfg = model.config
    n_embd, n_head = int(cfg.n_embd), int(cfg.n_head)
    info = RuntimeInfo(
        runtime="torch",
        context_length=int(cfg.n_positions),
        vocab_size=int(cfg.vocab_size),
        device=str(dev),
        dtype=str(tdtype).removeprefix("torch."),
        num_layers=int(cfg.n_layer),
        num_heads=n_head,
        head_dim=n_embd // n_head,
        threads=torch.get_num_threads(),
        extra={
            "model_type": str(cfg.model_type),
            "attn_implementation": str(cfg._attn_implementation),
            "folder": str(folder),
        },
    )
    return TorchRuntime(model, info)
