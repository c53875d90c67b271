"""Corpora, deterministic splits, the tokenizer, and token blocks.

Sources (`data.source` in a profile):

* `python-docs` (default, offline): the English documentation inside the Python interpreter:
  `pydoc_data.topics` plus the docstrings of the standard library's `.py` files, parsed with
  `ast` (never imported: importing some modules has side effects), files in sorted order.
* `text:<folder>`: a user's `.txt` / `.md` files (one document each) and `.jsonl` files (one
  document per line, field `data.text_field`).
* `hf:<dataset>/<config>` (e.g. `hf:Salesforce/wikitext/wikitext-2-raw-v1`) or `hf:<local dir>`
  via `datasets.load_dataset`; its own train / validation / test splits are kept.

Documents are assigned to train / validation / test by a hash of their id (stable across runs
and machines). `prepare(profile)` tokenizes once and caches the token arrays and the tokenizer
under `artifacts/<profile>/_data/<key>/`, keyed by the data and tokenizer config.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimserve.tokenizer import TextTokenizer, load_tokenizer, save_hf_tokenizer, train_bpe

if TYPE_CHECKING:
    import torch

    from slimserve.catalogue import DataConfig, Profile, TokenizerConfig

SPLITS = ("train", "validation", "test")
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class DataError(ValueError):
    """A corpus that cannot be read or is empty; the message names the source."""


Document = tuple[str, str]  # (stable id, text)


def python_docs_documents() -> list[Document]:
    """pydoc topics and stdlib docstrings, one document per topic / per source file."""
    from pydoc_data.topics import topics

    docs: list[Document] = [(f"pydoc:{k}", topics[k].strip()) for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_STDLIB_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately invalid (test data)
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    parts.append(doc.strip())
        if parts:
            docs.append((f"stdlib:{rel.as_posix()}", "\n\n".join(parts)))
    return docs


def text_folder_documents(folder: Path, text_field: str) -> list[Document]:
    if not folder.is_dir():
        raise DataError(f"text:{folder}: no such folder")
    docs: list[Document] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix in (".txt", ".md"):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append((f"file:{rel}", text))
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    text = str(json.loads(line)[text_field]).strip()
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"{path}:{n + 1}: no {text_field!r} field ({exc})") from exc
                if text:
                    docs.append((f"file:{rel}:{n}", text))
    if not docs:
        raise DataError(f"text:{folder}: no non-empty .txt, .md or .jsonl documents")
    return docs


def hf_documents(spec: str, text_field: str) -> dict[str, list[Document]]:
    """Documents per split from `datasets` (its own splits). WikiText lines are grouped into
    articles at ` = Title = ` headings so a document is an article, not a line."""
    import datasets

    if Path(spec).is_dir():
        ds = datasets.load_dataset(spec)
    else:
        name, _, config = spec.rpartition("/")
        ds = datasets.load_dataset(name, config) if name else datasets.load_dataset(config)
    out: dict[str, list[Document]] = {}
    for split in SPLITS:
        if split not in ds:
            continue
        docs: list[Document] = []
        current: list[str] = []
        for row in ds[split]:
            line = str(row[text_field])
            heading = line.startswith(" = ") and not line.startswith(" = = ")
            if heading and current:
                docs.append((f"{split}:{len(docs)}", "".join(current).strip()))
                current = []
            current.append(line)
        if current:
            docs.append((f"{split}:{len(docs)}", "".join(current).strip()))
        out[split] = [d for d in docs if d[1]]
    if not out.get("train"):
        raise DataError(f"hf:{spec}: no non-empty train split")
    return out


def split_of(doc_id: str, data: DataConfig) -> str:
    """Deterministic split from a hash of the document id."""
    x = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if x < data.split.test:
        return "test"
    if x < data.split.test + data.split.validation:
        return "validation"
    return "train"


def load_splits(data: DataConfig) -> dict[str, list[Document]]:
    """The corpus as documents per split (capped at `max_chars` in document order)."""
    if data.source.startswith("hf:"):
        splits = hf_documents(data.source[3:], data.text_field)
    else:
        if data.source == "python-docs":
            docs = python_docs_documents()
        else:
            docs = text_folder_documents(Path(data.source[5:]).expanduser(), data.text_field)
        if data.max_chars:
            kept, total = [], 0
            for d in docs:
                if total >= data.max_chars:
                    break
                kept.append(d)
                total += len(d[1])
            docs = kept
        splits = {s: [] for s in SPLITS}
        for doc in docs:
            splits[split_of(doc[0], data)].append(doc)
    for split in SPLITS:
        if not splits.get(split):
            raise DataError(f"{data.source}: the {split} split is empty (corpus too small?)")
    return splits


def corpus_sha256(splits: dict[str, list[Document]]) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for doc_id, text in splits[split]:
            h.update(f"{split}\0{doc_id}\0{text}\0".encode())
    return h.hexdigest()


def build_tokenizer(cfg: TokenizerConfig, train_texts: list[str], folder: Path, ctx: int) -> None:
    if cfg.kind == "bpe":
        save_hf_tokenizer(train_bpe(train_texts, cfg.vocab_size), folder, ctx)
        return
    from transformers import AutoTokenizer

    if not cfg.pretrained:
        raise DataError("tokenizer.pretrained: needed when tokenizer.kind is 'pretrained'")
    AutoTokenizer.from_pretrained(cfg.pretrained).save_pretrained(folder)


def tokenize_documents(tok: TextTokenizer, docs: list[Document]) -> np.ndarray:
    """Token ids of documents joined by EOS, as int32 (vocabularies stay well below 2**31)."""
    ids: list[int] = []
    for enc in tok.encode_batch([text for _, text in docs]):
        ids.extend(enc)
        ids.append(tok.eos_token_id)
    return np.asarray(ids, dtype=np.int32)


@dataclass
class DataBundle:
    """A prepared corpus: tokenizer folder, token arrays per split, and their provenance."""

    folder: Path
    sha256: str
    stats: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(self.tokenizer_dir)

    def tokens(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"{split}.npy", mmap_mode="r")

    def blocks(self, split: str, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
        """Non-overlapping blocks `(N, block_size)` int64 of a split (dropping the tail)."""
        import torch

        toks = self.tokens(split)
        if max_tokens is not None:
            toks = toks[: max(max_tokens, block_size)]
        n = len(toks) // block_size
        if n == 0:
            raise DataError(f"{split} split has {len(toks)} tokens, fewer than one block")
        return torch.from_numpy(np.array(toks[: n * block_size], dtype=np.int64)).view(n, -1)


def data_key(profile: Profile) -> str:
    payload = {
        "data": profile.data.model_dump(mode="json"),
        "tokenizer": profile.tokenizer.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def prepare(profile: Profile, log: Callable[[str], None] = print) -> DataBundle:
    """Build (or reuse) the tokenizer and token arrays for `profile`; atomic like artifacts."""
    root = profile.artifacts_root() / profile.name / "_data"
    folder = root / data_key(profile)
    stats_path = folder / "corpus.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        return DataBundle(folder, stats["sha256"], stats)
    log(f"data: reading {profile.data.source}")
    splits = load_splits(profile.data)
    sha = corpus_sha256(splits)
    tmp = root / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train_texts = [t for _, t in splits["train"]]
        build_tokenizer(profile.tokenizer, train_texts, tmp / "tokenizer", profile.block_size)
        tok = load_tokenizer(tmp / "tokenizer")
        stats: dict = {"sha256": sha, "source": profile.data.source, "splits": {}}
        for split in SPLITS:
            arr = tokenize_documents(tok, splits[split])
            np.save(tmp / f"{split}.npy", arr)
            stats["splits"][split] = {
                "documents": len(splits[split]),
                "chars": sum(len(t) for _, t in splits[split]),
                "tokens": int(len(arr)),
            }
        stats["vocab_size"] = tok.vocab_size
        (tmp / "corpus.json").write_text(json.dumps(stats, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s = stats["splits"]
    log(
        f"data: sha256 {sha[:16]}…, {sum(v['chars'] for v in s.values()):,} chars, "
        + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in s.items())
    )
    return DataBundle(folder, sha, stats)


def unigram_perplexity(train: np.ndarray, test: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `test` of add-one-smoothed unigram frequencies counted on `train`.

    The floor any language model with this tokenizer must beat; reported beside perplexity.
    """
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(test, dtype=np.int64)].mean()))
