"""KV caches that grow in place: per-layer buffers with spare columns, shared by the states
viewing them.

A decode step appends one column per layer. Concatenating copies the whole cache every step;
instead a batch's keys and values live in an `Arena`: buffers (B, H, C, D) with C > P, of which
the state's (B, H, P, D) tensors are views (`ArenaKVState`, a `base.KVState` with the same
contract). A step writes its column in place when its state is the arena's newest one;
otherwise (a fresh prefill, a full arena, or a second decode from an older state, which stays
correct) `Arenas.writable` copies once into a roomier arena (+25 %, at least GROW_MIN columns,
capped at the context length). `Arenas.select` and `merge` (requests leaving and joining the
batch) write their result straight into such an arena, so a batch change costs one copy, not
two.

`zeroed` arenas start as zeros: a runtime whose graph reads the whole buffer (ONNX Runtime's
append graph, columns past P masked out) must not meet NaN bit patterns there, since a masked
column still enters `probabilities @ values` with weight 0. The torch runtime reads only the
first P + 1 columns and takes uninitialised memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from slimserve.runtimes.base import KVState, pad_left

GROW_MIN = 32
"""Spare columns (at least) added when an arena is (re)allocated."""


@dataclass
class Arena:
    """Per-layer key/value buffers (B, H, C, D); `length` is how many columns the newest state
    covers: only that state may append in place."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    views: Any = None  # a runtime's own views of these buffers, made on first use (onnx_rt)

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])


@dataclass
class ArenaKVState(KVState):
    """A KVState whose tensors are views of `arena` (plain KVState fields, same contract).

    Build new states with `Arenas.merge` / `select`, not `dataclasses.replace`, which would
    keep the arena while changing the tensors.
    """

    arena: Arena | None = None


class Arenas:
    """Arena allocation and the batch-membership operations of base.py, written into arenas."""

    def __init__(self, context_length: int, zeroed: bool = False):
        self.context_length = context_length
        self.zeroed = zeroed

    def capacity(self, past: int) -> int:
        """Columns for a `past`-column cache plus room to decode into (never past the context)."""
        return max(past, min(self.context_length, past + max(GROW_MIN, past // 4)))

    def empty(self, like: KVState, batch: int, past: int) -> Arena:
        """An arena for `batch` rows of `like`'s heads and dtype, `past` columns in use."""
        make = torch.zeros if self.zeroed else torch.empty
        capacity = self.capacity(past)

        def buf(t: torch.Tensor) -> torch.Tensor:
            shape = (batch, t.shape[1], capacity, t.shape[3])
            return make(shape, dtype=t.dtype, device=t.device)

        return Arena([buf(t) for t in like.keys], [buf(t) for t in like.values], past)

    def writable(self, state: KVState) -> Arena:
        """`state`'s arena when the next column can be written into it in place, else a new
        one holding a copy of `state` (the caller sets `length` after writing)."""
        past = state.past_length
        arena = state.arena if isinstance(state, ArenaKVState) else None
        if arena is not None and arena.length == past and arena.capacity > past:
            return arena
        arena = self.empty(state, state.batch_size, past)
        for src, buf in zip(
            [*state.keys, *state.values], [*arena.keys, *arena.values], strict=True
        ):
            buf[:, :, :past].copy_(src)
        return arena

    @torch.inference_mode()
    def select(self, state: KVState, rows: list[int]) -> ArenaKVState:
        """`base.select`, written by one `index_select` per tensor into a new arena."""
        index = torch.tensor(rows, dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, index)
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else mask.shape[1]
        mask = mask[:, start:]
        p = mask.shape[1]
        arena = self.empty(state, len(rows), p)

        def take(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
            view = buf[:, :, :p]
            torch.index_select(src[:, :, start:], 0, index, out=view)
            return view

        keys = [take(k, b) for k, b in zip(state.keys, arena.keys, strict=True)]
        values = [take(v, b) for v, b in zip(state.values, arena.values, strict=True)]
        return ArenaKVState(keys, values, mask, state.positions.index_select(0, index), arena)

    @torch.inference_mode()
    def merge(self, a: KVState, b: KVState) -> ArenaKVState:
        """`base.merge` (left-pad the shorter past, stack the batches), written once into a
        new arena; padding columns are zeroed, as `base.merge` pads."""
        width = max(a.past_length, b.past_length)
        rows = (a.batch_size, a.batch_size + b.batch_size)
        arena = self.empty(a, rows[1], width)

        def place(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
            for src, lo, hi in ((x, 0, rows[0]), (y, rows[0], rows[1])):
                pad = width - src.shape[2]
                buf[lo:hi, :, :pad].zero_()
                buf[lo:hi, :, pad:width].copy_(src)
            return buf[:, :, :width]

        keys = [place(x, y, t) for x, y, t in zip(a.keys, b.keys, arena.keys, strict=True)]
        values = [place(x, y, t) for x, y, t in zip(a.values, b.values, arena.values, strict=True)]
        pa, pb = width - a.past_length, width - b.past_length
        mask = torch.cat([pad_left(a.mask, pa, 1), pad_left(b.mask, pb, 1)])
        return ArenaKVState(keys, values, mask, torch.cat([a.positions, b.positions]), arena)
