"""The GPT-2 smoke profile: derived from configs/gpt2.yaml in nothing but its sources and token
budgets (fast, in `make test`), the stand-in tokenizer's fill-up (fast), and the whole smoke
run (`make smoke-gpt2`, marker `gpt2_smoke`, skipped by `make test`: ~25 min on 2 cores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from bench.gpt2_standins import _fill_merges
from slimserve.catalogue import load_profile

ROOT = Path(__file__).resolve().parents[2]
# What the smoke profile may change: where data, tokenizer and checkpoint come from, and how
# many tokens each budget spends (training, validation, calibration, evaluation).
SOURCES = {("data", "source"), ("tokenizer", "pretrained"), ("name",), ("description",)}
BUDGET_KEYS = {
    "tokens",
    "warmup_tokens",
    "recovery_tokens",
    "eval_blocks",
    "calibration_blocks",
    "max_tokens",
    "pretrained",
    "recovery",
}


def _flatten(raw, prefix=()):
    if isinstance(raw, dict):
        for k, v in raw.items():
            yield from _flatten(v, (*prefix, k))
    else:
        yield prefix, raw


def test_smoke_profile_is_gpt2_with_sources_and_budgets_swapped():
    real = yaml.safe_load((ROOT / "configs/gpt2.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs/gpt2-smoke.yaml").read_text())
    a, b = dict(_flatten(real)), dict(_flatten(smoke))
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    unexpected = sorted(k for k in changed if k not in SOURCES and not BUDGET_KEYS.intersection(k))
    assert not unexpected, f"the smoke profile differs from gpt2.yaml in {unexpected}"
    assert real["variants"].keys() == smoke["variants"].keys()
    for name, v in real["variants"].items():
        assert smoke["variants"][name]["step"] == v["step"]
        assert smoke["variants"][name].get("from") == v.get("from")
    profile = load_profile(ROOT / "configs/gpt2-smoke.yaml")
    for name in profile.variants:
        tokens = getattr(profile.step_params(name), "tokens", None)
        assert tokens is None or tokens <= 8192, (name, tokens)
    assert profile.block_size == 512 and profile.data.source.startswith("hf:")


def test_fill_merges_reaches_the_vocabulary_size():
    from tokenizers import Tokenizer

    from slimserve.tokenizer import train_bpe

    tok = train_bpe(["hello world, hello there"] * 5, 400)
    filled = Tokenizer.from_str(json.dumps(_fill_merges(json.loads(tok.to_str()), 400)))
    assert filled.get_vocab_size(with_added_tokens=True) == 400
    text = "hello world ünïcödé"
    assert filled.decode(filled.encode(text).ids) == text
    assert filled.encode("hello").ids == tok.encode("hello").ids  # trained merges still first


@pytest.mark.gpt2_smoke
@pytest.mark.timeout(1800)
def test_gpt2_smoke_run():
    """Every CPU variant of the GPT-2 profile built, served and probed; report written."""
    from bench.gpt2_smoke import run_smoke

    result = run_smoke()
    assert not result["problems"], result["problems"]
    rows = {r["variant"]: r for r in result["rows"]}
    profile = load_profile(ROOT / "configs/gpt2-smoke.yaml")
    cpu = [n for n in profile.variants if profile.variants[n].step != "build-trt"]
    for name in cpu:
        assert rows[name]["status"] == "built", rows[name]
        assert math.isfinite(rows[name]["perplexity"]) and rows[name]["wall_s"] is not None
        assert rows[name]["artifact_mb"] and rows[name]["peak_rss_mb"]
        served = result["serving"]["variants"][name]
        assert served["completion_ok"] and served["chat_stream_ok"] and served["compare_ok"]
    onnx = rows["student-onnx"]
    assert onnx["max_abs_logit_diff"] <= 1e-3 and onnx["greedy_identical"] is True
    assert all((ROOT / "reports" / f"gpt2_smoke.{ext}").is_file() for ext in ("json", "md"))
