"""`make eval`'s API path: lm-eval's `local-completions` model through the served
`/v1/completions` (echo + logprobs) scores the generated tasks exactly as its `hf` model does
in process on the same weights."""

from __future__ import annotations

import importlib.util
import random

import pytest
from serve_helpers import TEXTS

from bench.eval_report import compare
from bench.eval_run import api_model_args, hf_model_args, run_lm_eval
from bench.eval_tasks import TaskSpec, write_tasks
from slimserve.tokenizer import load_tokenizer

# The timeout covers the package's Serve start when this file runs alone (4 min on a busy
# 2-core machine); the test itself takes seconds.
pytestmark = pytest.mark.timeout(480)


def test_lm_eval_through_the_api_agrees_with_in_process(serve_urls, tmp_path):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[eval]')")
    folder = serve_urls.store / "student"
    tok = load_tokenizer(folder)
    words = " ".join(TEXTS).split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(150)) for _ in range(3)]
    spec = TaskSpec(items=10, choices=3, context_tokens=40, answer_words=3, chunk_tokens=60,
                    ppl_tokens=300)  # fmt: skip
    files = write_tasks(tmp_path / "tasks", corpus, spec, tok.encode)
    args = api_model_args(serve_urls.main, "student", folder, 128, concurrent=4)
    api = run_lm_eval("local-completions", args, files)
    local = run_lm_eval("hf", hf_model_args(folder, folder, 128), files, batch_size=4)
    row = compare(api, local)
    assert row["agree"] and row["same_pick"] == "10/10", row
    assert row["max_abs_ll_diff"] < 1e-3, row
