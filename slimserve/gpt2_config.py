"""GPT-2 configurations of a given shape: the one builder the training steps, the FLOP-rate
probe and the tests' tiny models share."""

from __future__ import annotations

from typing import Any


def gpt2_config(
    *,
    n_layer: int,
    n_head: int,
    n_embd: int,
    vocab_size: int,
    n_positions: int,
    eos: int = 0,
    **extra: Any,
) -> Any:
    """A `transformers.GPT2Config` of this shape whose begin- and end-of-text token is `eos`
    (the tokenizer's `<|endoftext|>`); `extra` sets any other field (n_inner, dropouts, ...)."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=eos,
        eos_token_id=eos,
        **extra,
    )
