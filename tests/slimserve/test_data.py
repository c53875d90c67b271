"""Corpora, splits, tokenizer round trip, blocks."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.catalogue import DataConfig, parse_profile
from slimserve.data import (
    DataError,
    corpus_sha256,
    load_splits,
    prepare,
    python_docs_documents,
    split_of,
    text_folder_documents,
    unigram_perplexity,
)
from slimserve.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ and `code()` too.\n"


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + TEXT * (1 + i % 3))
    (folder / "extra.jsonl").write_text('{"text": "a json line"}\n\n{"text": "another"}\n')
    return folder


def test_python_docs_is_deterministic():
    a, b = python_docs_documents(), python_docs_documents()
    assert len(a) > 500
    split = {s: [] for s in ("train", "validation", "test")}
    for d in a:
        split[split_of(d[0], DataConfig())].append(d)
    assert corpus_sha256(split) == corpus_sha256(load_splits(DataConfig()))
    assert [d[0] for d in a] == [d[0] for d in b]


def test_split_is_stable_and_roughly_proportional():
    cfg = DataConfig(split={"validation": 0.1, "test": 0.1})
    ids = [f"doc{i}" for i in range(5000)]
    splits = [split_of(i, cfg) for i in ids]
    assert splits == [split_of(i, cfg) for i in ids]
    assert 0.07 < splits.count("test") / 5000 < 0.13


def test_text_folder(corpus):
    docs = text_folder_documents(corpus, "text")
    assert len(docs) == 42 and docs[0][0] == "file:doc00.txt"


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        text_folder_documents(tmp_path / "nope", "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty"):
        text_folder_documents(tmp_path / "empty", "text")


def test_tokenizer_round_trip(tmp_path):
    tok = train_bpe([TEXT * 20], vocab_size=300, min_frequency=1)
    save_hf_tokenizer(tok, tmp_path, 64)
    t = load_tokenizer(tmp_path)
    for s in (TEXT, "emoji 🚀 and\ttabs\n\n", " leading space"):
        assert t.decode(t.encode(s)) == s
    assert t.eos_token_id == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TEXT) == t.encode(TEXT)
    assert hf.eos_token_id == 0


def test_prepare_caches_and_blocks(tmp_path, corpus):
    profile = parse_profile(
        {
            "name": "t",
            "artifacts_dir": str(tmp_path / "art"),
            "block_size": 16,
            "data": {"source": f"text:{corpus}", "split": {"validation": 0.2, "test": 0.2}},
            "tokenizer": {"vocab_size": 300},
            "variants": {"teacher": {"step": "finetune", "params": {"model": {}}}},
        }
    )
    logs: list[str] = []
    bundle = prepare(profile, logs.append)
    assert logs and bundle.stats["splits"]["train"]["tokens"] > 0
    again = prepare(profile, logs.append)
    assert again.sha256 == bundle.sha256 and len(logs) == 2  # second call is a cache hit
    blocks = bundle.blocks("train", 16)
    assert blocks.shape[1] == 16 and blocks.dtype.is_floating_point is False
    flat = np.asarray(bundle.tokens("train"))[: blocks.numel()]
    assert (blocks.flatten().numpy() == flat).all()


def test_unigram_perplexity_uniform():
    vocab = 4
    train = np.array([0, 1, 2, 3] * 100)
    assert unigram_perplexity(train, np.array([0, 1, 2, 3]), vocab) == pytest.approx(4.0)
