"""Local stand-ins for what `configs/gpt2.yaml` takes from the model hub, made in seconds.

`configs/gpt2-smoke.yaml` runs the real GPT-2 profile's steps with these in place of the hub:

* `checkpoint/`: GPT-2 124M's shape (`GPT2Config()`: 12 layers, 768 wide, 12 heads, 50,257
  tokens, 1,024 positions) with seeded random weights, from `bench.bench_model.build_torch`
  (the serving race's 124M-shaped model), so `pretrained:` loads what `gpt2` would give.
* `tokenizer/`: a byte-level BPE trained on the `python-docs` corpus, saved in the Hugging Face
  layout (`AutoTokenizer.from_pretrained` loads it). That corpus (about 2.3 M characters) yields
  only ~27 k merges even at frequency 1, so the vocabulary is filled up to exactly 50,257 with
  merges of two byte symbols (as `bench.bench_model.synthetic_tokenizer` does), appended after
  the trained ones: they never fire before a trained merge and keep every id a real token.
* `wikitext/`: the python-docs text in WikiText-2's layout (`datasets.DatasetDict` with
  train / validation / test, one `text` row per line, an article opening with ` = Title = `),
  written with `save_to_disk`; the profile reads it as `hf:<folder>`, as it would the hub's.

Each part is rebuilt only when its folder is missing; `ensure_standins(root)` returns the paths.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

VOCAB = 50_257
SPLIT_FRACTIONS = {"validation": 0.05, "test": 0.05}  # of articles, by a hash of the title


def _fill_merges(tok_json: dict, vocab_size: int) -> dict:
    """Append byte-pair merges to a trained BPE's JSON until its vocabulary has `vocab_size`
    entries (added special tokens included)."""
    from tokenizers import pre_tokenizers

    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    merges: list = model["merges"]
    specials = [t["content"] for t in tok_json.get("added_tokens", []) if t["content"] not in vocab]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    missing = vocab_size - len(vocab) - len(specials)
    for a in alphabet:
        for b in alphabet:
            if missing <= 0:
                break
            if a + b in vocab:
                continue
            merges.append([a, b])
            vocab[a + b] = len(vocab)
            missing -= 1
    if missing > 0:
        raise ValueError(f"cannot fill the vocabulary to {vocab_size} with byte pairs")
    return tok_json


def build_tokenizer(folder: Path, documents: list[tuple[str, str]]) -> int:
    """Train the BPE on `documents`, fill it to `VOCAB`, save it HF-style; returns merges trained."""
    from tokenizers import Tokenizer

    from slimserve.tokenizer import save_hf_tokenizer, train_bpe

    trained = train_bpe([text for _, text in documents], VOCAB, min_frequency=1)
    tok_json = json.loads(trained.to_str())
    n_trained = len(tok_json["model"]["merges"])
    tok = Tokenizer.from_str(json.dumps(_fill_merges(tok_json, VOCAB)))
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} entries, not {VOCAB}")
    save_hf_tokenizer(tok, folder, model_max_length=1024)
    return n_trained


def _split(title: str) -> str:
    x = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if x < SPLIT_FRACTIONS["test"]:
        return "test"
    if x < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "train"


def wikitext_rows(documents: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Lines per split in WikiText-2 raw's layout: `" = Title = \\n"`, an empty line, then one
    row per paragraph (`" text \\n"`) followed by an empty row."""
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for doc_id, text in documents:
        lines = rows[_split(doc_id)]
        lines += ["", f" = {doc_id} = \n", ""]
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if para:
                lines += [f" {para} \n", ""]
    return rows


def build_dataset(folder: Path, documents: list[tuple[str, str]]) -> dict[str, int]:
    """`DatasetDict(train, validation, test)` of `text` rows, `save_to_disk(folder)`."""
    import datasets

    rows = wikitext_rows(documents)
    dd = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"text": lines}) for split, lines in rows.items()}
    )
    dd.save_to_disk(str(folder))
    return {split: len(lines) for split, lines in rows.items()}


def build_checkpoint(root: Path, log=print) -> Path:
    """The serving race's 124M-shaped random model (`bench.bench_model`), built under `root`."""
    from bench.bench_model import TORCH_VARIANT, ensure_bench_model

    return ensure_bench_model(root, onnx=False, log=log)[TORCH_VARIANT]


def ensure_standins(root: str | Path = "artifacts/gpt2-hub", log=print) -> dict[str, Path]:
    """Build what is missing under `root`; return {"checkpoint", "tokenizer", "wikitext"}."""
    from slimserve.data import python_docs_documents

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"tokenizer": root / "tokenizer", "wikitext": root / "wikitext"}
    documents = None
    for name, builder in (("tokenizer", build_tokenizer), ("wikitext", build_dataset)):
        folder = paths[name]
        if (folder / ".complete").is_file():
            continue
        t0 = time.monotonic()
        documents = documents or python_docs_documents()
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        info = builder(tmp, documents)
        (tmp / ".complete").write_text(json.dumps({"built": info}))
        tmp.rename(folder)
        log(f"stand-in {name}: {folder} ({info}) in {time.monotonic() - t0:.1f}s")
    checkpoint = build_checkpoint(root / "checkpoint", log)
    return {"checkpoint": checkpoint, **paths}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="artifacts/gpt2-hub", help="where the stand-ins go")
    print(ensure_standins(parser.parse_args().root))
