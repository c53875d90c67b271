"""The `hf:` and `text:` data sources end to end: a tiny local corpus of each kind through
`load_splits` and `prepare`, its splits, and the SHA-256 the prepared corpus records."""

from __future__ import annotations

import json

import pytest

from bench.gpt2_standins import wikitext_rows
from slimserve.catalogue import DataConfig, parse_profile
from slimserve.data import DataError, corpus_sha256, load_splits, prepare

ARTICLES = {
    split: [(f"{split} article {i}", f"Paragraph {i} of the {split} split. " * 6) for i in range(3)]
    for split in ("train", "validation", "test")
}


def save_wikitext(folder, articles=ARTICLES) -> None:
    """A `datasets.DatasetDict` in WikiText-2 raw's layout, written with `save_to_disk`."""
    import datasets

    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": _rows(docs)})
            for split, docs in articles.items()
        }
    )
    dd.save_to_disk(str(folder))


def _rows(docs) -> list[str]:
    rows = []
    for title, text in docs:
        rows += ["", f" = {title} = \n", "", " = = Section = = \n", f" {text} \n", ""]
    return rows


def profile_for(tmp_path, source: str, **data):
    return parse_profile(
        {
            "name": "src",
            "artifacts_dir": str(tmp_path / "art"),
            "block_size": 16,
            "data": {"source": source, **data},
            "tokenizer": {"vocab_size": 300},
            "variants": {"teacher": {"step": "finetune", "params": {"model": {}}}},
        }
    )


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "wikitext"
    save_wikitext(folder)
    return folder


def test_hf_local_folder_keeps_its_own_splits(hf_folder):
    splits = load_splits(DataConfig(source=f"hf:{hf_folder}"))
    for split, docs in ARTICLES.items():
        got = splits[split]
        assert len(got) == len(docs)  # one document per article; `= = Section = =` stays inside
        for (_, text), (title, body) in zip(got, docs, strict=True):
            assert text.startswith(f"= {title} =") and body.strip()[:20] in text


def test_hf_prepare_records_sha256_and_tokens(tmp_path, hf_folder):
    profile = profile_for(tmp_path, f"hf:{hf_folder}")
    bundle = prepare(profile, lambda _: None)
    expected = corpus_sha256(load_splits(profile.data))
    assert bundle.sha256 == expected
    stats = json.loads((bundle.folder / "corpus.json").read_text())
    assert stats["sha256"] == expected and stats["source"] == f"hf:{hf_folder}"
    for split in ("train", "validation", "test"):
        assert stats["splits"][split]["documents"] == 3
        assert stats["splits"][split]["tokens"] == len(bundle.tokens(split)) > 0


def test_hf_sha256_follows_the_text(tmp_path, hf_folder):
    changed = {**ARTICLES, "test": [("test article 0", "Different words entirely. " * 6)]}
    other = tmp_path / "other"
    save_wikitext(other, changed)
    a = corpus_sha256(load_splits(DataConfig(source=f"hf:{hf_folder}")))
    b = corpus_sha256(load_splits(DataConfig(source=f"hf:{other}")))
    assert a != b


def test_hf_without_train_split_is_an_error(tmp_path):
    folder = tmp_path / "no-train"
    save_wikitext(folder, {"validation": ARTICLES["validation"], "test": ARTICLES["test"]})
    with pytest.raises(DataError, match="no non-empty train split"):
        load_splits(DataConfig(source=f"hf:{folder}"))


def test_standin_wikitext_layout_reads_back_as_articles(tmp_path):
    import datasets

    docs = [(f"doc{i}", f"First paragraph {i}.\n\nSecond paragraph {i}.") for i in range(60)]
    rows = wikitext_rows(docs)
    folder = tmp_path / "standin"
    datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}
    ).save_to_disk(str(folder))
    splits = load_splits(DataConfig(source=f"hf:{folder}"))
    assert sum(len(v) for v in splits.values()) == 60 and splits["validation"] and splits["test"]
    assert all(
        text.startswith("= doc") and "Second paragraph" in text for _, text in splits["train"]
    )


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(f"Text file {i}. " * 5)
    (folder / "sub" / "notes.md").write_text("# Notes\n\nA markdown document.")
    (folder / "rows.jsonl").write_text(
        "\n".join(json.dumps({"text": f"json row {i}"}) for i in range(10)) + "\n"
    )
    return folder


def test_text_folder_splits_by_document_hash(tmp_path, text_folder):
    data = DataConfig(source=f"text:{text_folder}", split={"validation": 0.25, "test": 0.25})
    splits = load_splits(data)
    ids = [doc_id for docs in splits.values() for doc_id, _ in docs]
    assert len(ids) == len(set(ids)) == 41  # 30 .txt + 1 .md + 10 jsonl rows
    assert all(splits[s] for s in ("train", "validation", "test"))
    assert load_splits(data) == splits  # deterministic


def test_text_prepare_records_sha256(tmp_path, text_folder):
    profile = profile_for(tmp_path, f"text:{text_folder}", split={"validation": 0.25, "test": 0.25})
    bundle = prepare(profile, lambda _: None)
    assert bundle.sha256 == corpus_sha256(load_splits(profile.data))
    stats = json.loads((bundle.folder / "corpus.json").read_text())
    assert stats["sha256"] == bundle.sha256 and stats["source"].startswith("text:")
    assert sum(v["documents"] for v in stats["splits"].values()) == 41
    (text_folder / "doc00.txt").write_text("changed")
    assert corpus_sha256(load_splits(profile.data)) != bundle.sha256


def test_text_jsonl_without_the_field_names_the_line(tmp_path, text_folder):
    (text_folder / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no 'text' field"):
        load_splits(DataConfig(source=f"text:{text_folder}"))
