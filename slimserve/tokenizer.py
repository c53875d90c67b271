"""Tokenizers: train a byte-level BPE for the tiny profile, load any saved one without torch.

Every artifact folder carries Hugging Face tokenizer files (`tokenizer.json`,
`tokenizer_config.json`), so `AutoTokenizer.from_pretrained(folder)` works; serving loads the
same `tokenizer.json` through the `tokenizers` library alone (fast, no model import).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE whose only special token is `<|endoftext|>` (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write `tok` in the Hugging Face layout so `AutoTokenizer.from_pretrained` loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of one artifact folder into another (each folder self-contained)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + ("vocab.json", "merges.txt"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


@dataclass
class TextTokenizer:
    """The few operations serving and evaluation need, over a `tokenizers.Tokenizer`."""

    tokenizer: Tokenizer
    eos_token_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """Load the tokenizer saved in an artifact (or tokenizer) folder, without importing torch.

    Raises FileNotFoundError naming the folder when it holds no `tokenizer.json`.
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    tok = Tokenizer.from_file(str(path))
    eos = EOS_TOKEN
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        eos = json.loads(config_path.read_text()).get("eos_token", EOS_TOKEN)
        if isinstance(eos, dict):  # older configs store AddedToken dicts
            eos = eos.get("content", EOS_TOKEN)
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"tokenizer in {folder} has no eos token {eos!r}")
    return TextTokenizer(tok, eos_id)
