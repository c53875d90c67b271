"""Streaming text: incremental detokenization and stop-string handling for the engine.

Byte-level BPE can split one character over several tokens; these helpers make sure streamed
deltas never show a half character and never run past a stop string, and give each token's own
text and bytes for logprob entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from slimserve.tokenizer import TextTokenizer

_FFFD = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing id list, re-decoding only the tail after the last clean boundary.

    For byte-level BPE, decode(a + b) == decode(a) + decode(b) when a's bytes end on a complete
    character, i.e. when decode(a) does not end in U+FFFD; that is where `_prefix` stops.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # ids[:start] are decoded into _prefix
        self._prefix = ""
        self._tail = ""

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        tail = self._tok.decode(self._ids[self._start :])
        if tail.endswith(_FFFD):
            self._tail = tail
        else:
            self._prefix += tail
            self._start = len(self._ids)
            self._tail = ""

    @property
    def stable(self) -> str:
        """Text that later ids cannot change (trailing U+FFFD held back)."""
        return self._prefix + self._tail.rstrip(_FFFD)

    @property
    def text(self) -> str:
        """All text so far, trailing U+FFFD included (for the final flush)."""
        return self._prefix + self._tail


def find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest stop string in text[start:] (relative to text), or -1."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else -1


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


class TokenTexts:
    """Each token's text (`decode([id])`: U+FFFD where it holds part of a character) and its
    own bytes (exact, from the byte-level alphabet), cached per id."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tok.decode([token_id])
            piece = self._tok.tokenizer.id_to_token(token_id) or ""
            table = _byte_decoder()
            if piece and all(ch in table for ch in piece):
                raw = [table[ch] for ch in piece]
            else:  # a special token (or a tokenizer that is not byte-level): its text
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit
