"""CTranslate2 as the in-process floor: a clean reason when it is missing, and (where the
optional extra `slimserve[peers]` is installed) a real measurement on a tiny model."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from bench import peer_ct2
from bench.peer_vllm import PeerError


def _tiny_builder():
    """`build_tiny_model` from tests/slimserve/conftest.py, loaded under a private name."""
    path = Path(__file__).resolve().parents[1] / "slimserve" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_slimserve_tiny_fixtures_ct2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    before = torch.get_num_threads()  # the engine sets torch's (process-wide) thread count
    yield _tiny_builder()(tmp_path_factory.mktemp("ct2-tiny"))
    torch.set_num_threads(before)


@pytest.fixture
def no_ctranslate2(monkeypatch):
    """ctranslate2 cannot be imported, whether or not it is installed here."""
    real = importlib.import_module

    def fake(name: str, *args):
        if name == "ctranslate2":
            raise ImportError("No module named 'ctranslate2'")
        return real(name, *args)

    monkeypatch.setattr(peer_ct2.importlib, "import_module", fake)


def test_missing_ctranslate2_is_a_reason(no_ctranslate2, tmp_path):
    with pytest.raises(PeerError, match=r"not installed \(pip install -e '\.\[peers\]'"):
        peer_ct2.measure(tmp_path, cache=tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()  # nothing converted


@pytest.mark.timeout(240)
def test_floor_without_ctranslate2_keeps_the_engine_and_says_why(no_ctranslate2, tiny_dir):
    rows = peer_ct2.floor(tiny_dir, max_tokens=4, batch=2, repeats=1, install=False)
    engine, ct2 = rows
    assert engine["engine"].startswith("slimserve engine (torch")
    assert engine["one_ms_per_token"] > 0 and engine["batch_tok_s"] > 0 and engine["batch"] == 2
    assert ct2["engine"] == "CTranslate2" and "not installed" in ct2["status"]
    assert len(rows) == 2  # the int8 attempt is not repeated once the package is missing


@pytest.mark.timeout(240)
def test_ctranslate2_measures_the_same_folder(tiny_dir, tmp_path):
    pytest.importorskip("ctranslate2", reason="the optional extra slimserve[peers]")
    for quantization in (None, "int8"):
        row = peer_ct2.measure(
            tiny_dir, quantization=quantization, max_tokens=8, batch=3, repeats=1,
            threads=1, cache=tmp_path,
        )  # fmt: skip
        assert row["engine"].endswith(f"({quantization or 'float32'})")
        assert row["tokens_per_request"] == 8  # min_length = max_length: exactly 8 each
        assert row["one_ms_per_token"] > 0 and row["batch_tok_s"] > 0 and row["threads"] == 1
        assert (tmp_path / f"{tiny_dir.name}-{quantization or 'float32'}" / "model.bin").is_file()


def test_ctranslate2_greedy_matches_hf(tiny_dir, tmp_path):
    """The converted model is the same model: greedy ids equal HF generate's."""
    ct2 = pytest.importorskip("ctranslate2", reason="the optional extra slimserve[peers]")
    from transformers import GPT2LMHeadModel

    from slimserve.tokenizer import load_tokenizer

    path = peer_ct2.convert(ct2, tiny_dir, tmp_path / "f32", None)
    generator = ct2.Generator(str(path), device="cpu", compute_type="float32", intra_threads=1)
    tok = load_tokenizer(tiny_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_dir).eval()
    for prompt in ("the river", "café 東京 model"):
        ids = tok.encode(prompt)
        start = [tok.tokenizer.id_to_token(i) for i in ids]
        got = generator.generate_batch(
            [start], max_length=6, min_length=6, include_prompt_in_result=False
        )[0].sequences_ids[0]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
        assert got == out[0, len(ids) :].tolist(), prompt
